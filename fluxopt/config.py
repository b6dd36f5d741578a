"""Structured configs (typed schemas) behind the YAML files in ``conf/``.

Hydra validates every config against these, so a misspelt key or a wrong type fails at
start. Each registered backend's options dataclass becomes the schema
``fluxopt_schema/backend/<name>``, which its ``backend/<name>.yaml`` extends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from fluxopt import plugins

DEFAULT_PROMPTS = [
    "a red circle above a blue square on a white background",
    "an astronaut standing next to a giant lemon, photograph",
]


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
    prompts: Optional[list[str]] = None  # None: the model's own prompts, else DEFAULT_PROMPTS
    seed: int = 0
    steps: Optional[int] = None
    height: Optional[int] = None
    width: Optional[int] = None
    guidance_scale: Optional[float] = None
    max_sequence_length: Optional[int] = None
    warmup: int = 1
    iterations: int = 3


@dataclass
class FidelityConfig:
    """Thresholds per metric; the worst prompt must meet them. Metrics not listed are reported only."""

    lossless: dict[str, float] = field(default_factory=lambda: {"psnr": 30.0, "ssim": 0.95, "latent_rel_l2": 0.05})
    lossy: dict[str, float] = field(default_factory=lambda: {"psnr": 20.0, "ssim": 0.75, "latent_rel_l2": 0.25})


@dataclass
class CacheConfig:
    dir: Optional[str] = None  # default: $FLUXOPT_CACHE_DIR or ~/.cache/fluxopt


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    fidelity: FidelityConfig = field(default_factory=FidelityConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    backend: dict[str, Any] = field(default_factory=dict)  # selected backends -> their options
    device: str = "auto"
    save_images: bool = True
    resume: bool = True  # skip a job whose output dir already has a complete result for this config


def register_configs() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="fluxopt_run_schema", node=RunConfig)
    for name, backend in plugins.backends().items():
        cs.store(group="fluxopt_schema/backend", name=name, node=backend.options_class)


def selected_backends(cfg: Any) -> dict[str, Any]:
    """``cfg.backend`` as a plain dict: backend name -> options (empty: no stack selected)."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg.get("backend")
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node or {})
