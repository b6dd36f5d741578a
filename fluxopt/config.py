"""The configuration schema, registered in Hydra's ConfigStore.

Every group is a typed dataclass, so Hydra rejects a misspelt key or a wrong type. Each
registered backend's options dataclass is stored as the config node ``backend/<name>`` (package
``backend.<name>``): ``+backend=<name>`` selects it and ``backend.<name>.<option>=...`` sets an
option, for built-in and third-party backends alike, with no YAML file.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from fluxopt import plugins

RUN_ID_RESOLVER = "fluxopt_run_id"


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: Optional[str] = None  # local directory or hub id overriding the spec's source
    revision: Optional[str] = None
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU


@dataclass
class BenchConfig:
    """What is measured. ``None`` means the model's own default."""

    name: str = "quick"
    prompts: Optional[list[str]] = None  # None: the model's own prompts, else fluxopt's defaults
    seed: int = 0
    steps: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    guidance_scale: Optional[float] = None
    max_sequence_length: Optional[int] = None
    warmup: int = 1
    iterations: int = 3
    # torch.profiler trace of one denoising step per stack (profiles/<stack>.json) and a breakdown
    # (GEMM, attention, quantize, norm/elementwise, other, GPU idle, % of the analytic floor)
    profile: bool = False


@dataclass
class FidelityConfig:
    """Thresholds per metric; the worst prompt must meet them. Metrics not listed are reported only."""

    lossless: dict[str, float] = field(default_factory=lambda: {"psnr": 30.0, "ssim": 0.95, "latent_rel_l2": 0.05})
    lossy: dict[str, float] = field(default_factory=lambda: {"psnr": 20.0, "ssim": 0.75, "latent_rel_l2": 0.25})


@dataclass
class CacheConfig:
    dir: Optional[str] = None  # default: $FLUXOPT_CACHE_DIR or ~/.cache/fluxopt


@dataclass
class SearchConfig:
    """What ``hydra/sweeper=fluxopt_search`` looks for: the fastest stack (speedup against the
    baseline of its own job) that passes its fidelity gate and these limits."""

    backends: Optional[list[str]] = None  # the backends to combine; None: every one this machine can run
    min_psnr: Optional[float] = None  # dB, worst prompt; None: the fidelity gate only
    max_memory_gib: Optional[float] = None  # peak memory while generating; None: no limit


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    backend: dict[str, Any] = field(default_factory=dict)  # selected backends -> their options
    device: str = "auto"
    save_images: bool = True
    # Skip a job whose output directory already holds a complete, passing result for the same
    # measurement config (rerun a sweep in its directory to finish it); false re-measures.
    resume: bool = True
    verbose: bool = False  # library warnings and compiler logs on the console too (always in the log file)
    # Apply and build each stack (with its warm-up generation) and measure nothing: the artifact
    # cache keeps what the build made (compiled kernels, tuning results, exported packages, engines),
    # so a later run builds in seconds. An interrupted build, run again, reuses what was kept.
    build_only: bool = False
    # Run the command in a background process of its own session (it outlives the terminal); print
    # its output directory and pid, and return at once. Its console output: <output dir>/fluxopt.out.
    detach: bool = False


# Settings that decide what is measured; resume compares these only (not output paths, resume, verbosity).
MEASUREMENT_KEYS = ("model", "bench", "fidelity", "backend", "device", "build_only")


def measurement_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in MEASUREMENT_KEYS}


def run_id() -> str:
    """Unique per process: two runs started in the same second never share an output directory."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


def register_configs() -> None:
    """Put the schemas, every backend's options and every preset into Hydra's ConfigStore (idempotent)."""
    if not OmegaConf.has_resolver(RUN_ID_RESOLVER):
        OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, use_cache=True)
    cs = ConfigStore.instance()
    cs.store(name="fluxopt_run_schema", node=RunConfig)
    backends = plugins.backends()
    for name, backend in backends.items():
        cs.store(group="backend", name=name, node=backend.options_class, package=f"backend.{name}")
    for name, preset in plugins.presets().items():
        # each backend typed like +backend=<backend> (so its other options can be overridden);
        # one not installed stays a plain mapping and build_stack names it as unknown
        node = {b: OmegaConf.merge(OmegaConf.structured(backends[b].options_class), dict(o)) if b in backends
                else dict(o) for b, o in preset.backends.items()}
        cs.store(group="backend", name=name, node=node, package="backend")
