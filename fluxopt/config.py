"""The configuration schema, registered in Hydra's ConfigStore.

Every group is a typed dataclass, so Hydra rejects a misspelt key or a wrong type. Each
registered backend's options dataclass is stored as the config node ``backend/<name>`` (package
``backend.<name>``): ``+backend=<name>`` selects it and ``backend.<name>.<option>=...`` sets an
option, for built-in and third-party backends alike, with no YAML file.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fluxopt import plugins
from fluxopt.errors import ConfigError, did_you_mean
from fluxopt.models import DEV_DEFAULTS

DEVICES = ("auto", "cpu", "cuda")
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; each prompt adds one
MAX_SIDE = 8192  # FLUX.1 is trained up to ~2 MP; larger sides are refused outright
MAX_SEQUENCE_LENGTH = 512  # T5's limit in FluxPipeline
SIDE_RULE = f"a multiple of 16 between 16 and {MAX_SIDE} (FLUX packs 2x2 latent patches of an 8x VAE)"


def check_int(setting: str, value: Any, minimum: int, allowed: str, maximum: int | None = None) -> int:
    """``value`` as an int in [minimum, maximum], else ConfigError naming the setting and the rule."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (
            maximum is not None and value > maximum):
        raise ConfigError(f"{setting}={value!r} is not allowed: {allowed}")
    return value


def check_seconds(setting: str, value: Any, when_null: str) -> float | None:
    """``value`` as a duration in seconds (finite, > 0) or None, else ConfigError naming the
    setting, the rule and what null means (``when_null``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not math.isfinite(value) or value <= 0):
        raise ConfigError(f"{setting}={value!r} is not allowed: seconds, a finite number > 0 (or null: {when_null})")
    return value


def check_fraction(setting: str, value: Any, when_null: str) -> float | None:
    """``value`` as a fraction strictly between 0 and 1, or None, else ConfigError naming the
    setting, the rule and what null means (``when_null``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not 0 < value < 1):
        raise ConfigError(f"{setting}={value!r} is not allowed: a fraction between 0 and 1, e.g. 0.005 "
                          f"(or null: {when_null})")
    return value


def check_side(setting: str, value: Any) -> int:
    value = check_int(setting, value, 16, SIDE_RULE, MAX_SIDE)
    if value % 16:
        raise ConfigError(f"{setting}={value} is not allowed: {SIDE_RULE}")
    return value


def check_guidance(setting: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{setting}={value!r} is not allowed: a finite number >= 0")
    return float(value)


def check_sequence_length(setting: str, value: Any) -> int:
    return check_int(setting, value, 1, f"an integer between 1 and {MAX_SEQUENCE_LENGTH} (T5's limit in FluxPipeline)",
                     MAX_SEQUENCE_LENGTH)


def check_prompts(setting: str, prompts: Any) -> tuple[str, ...]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError(f"{setting}={prompts!r} is not allowed: a non-empty list of strings")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"{setting} has {p!r}: every prompt must be a non-empty string")
    return tuple(prompts)

RUN_ID_RESOLVER = "fluxopt_run_id"


@dataclass
class ModelConfig:
    name: str = "tiny"
    path: Optional[str] = None  # local directory or hub id overriding the spec's source
    revision: Optional[str] = None
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU

    def __post_init__(self) -> None:
        if self.path is not None:
            check_model_path(self.path)


def check_model_path(path: str) -> None:
    """A ``model.path`` that names a local directory must be a diffusers FLUX checkpoint (its
    ``model_index.json`` names a Flux pipeline); anything else that is not a hub id (``owner/name``)
    is refused."""
    local = Path(path).expanduser()
    looks_local = path.startswith(("/", ".", "~")) or local.exists() or path.count("/") != 1
    if not looks_local:
        return
    if not local.exists():
        raise ConfigError(f"model.path={path} does not exist (a local checkpoint directory, or a hub id "
                          "owner/name)")
    if not local.is_dir():
        raise ConfigError(f"model.path={path} is a file; it must be a diffusers checkpoint directory "
                          "(holding model_index.json)")
    if not (local / "model_index.json").is_file():
        raise ConfigError(f"model.path={path} is not a diffusers checkpoint: it has no model_index.json "
                          "(save one with pipe.save_pretrained(DIR))")
    try:
        pipeline_class = json.loads((local / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"model.path={path}: its model_index.json cannot be read as a diffusers index") from None
    if not isinstance(pipeline_class, str) or not pipeline_class.startswith("Flux"):
        raise ConfigError(f"model.path={path} is a {pipeline_class} checkpoint, not a FLUX one (fluxopt optimizes "
                          "FluxPipeline and its variants)")


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
    # Seconds the warm-up, and then the timed calls, may each spend: once spent, no further call
    # starts (pytest-benchmark's max_time). A stack many times slower than the baseline is then
    # timed on fewer calls, never fewer than one warm-up and two timed (a spread needs two), so a
    # bake-off's length is set by its fast stacks. None: every call runs.
    max_time_s: Optional[float] = None
    # The timing stops early once the mean latency is known to this relative standard error
    # (std / sqrt(n) / mean, after at least 3 timed calls), as torch.utils.benchmark's
    # adaptive_autorange stops on a precision target: a steady stack is timed on fewer calls, a
    # noisy one on all of them. None: every timed call runs.
    target_rse: Optional[float] = None
    # torch.profiler trace of one denoising step per stack (profiles/<stack>.json) and a breakdown
    # (GEMM, attention, quantize, norm/elementwise, other, GPU idle, % of the analytic floor)
    profile: bool = False

    def __post_init__(self) -> None:
        """Every rule that needs no model; the model's own defaults are checked by the plan."""
        if self.prompts is not None:
            self.prompts = list(check_prompts("bench.prompts", self.prompts))
        check_int("bench.seed", self.seed, 0, f"an integer between 0 and {MAX_SEED}", MAX_SEED)
        check_int("bench.warmup", self.warmup, 0, "an integer >= 0 (untimed calls before timing)")
        check_int("bench.iterations", self.iterations, 1, "an integer >= 1 (timed calls)")
        check_seconds("bench.max_time_s", self.max_time_s, "every warm-up and timed call runs")
        check_fraction("bench.target_rse", self.target_rse, "every timed call runs")
        if self.steps is not None:
            check_int("bench.steps", self.steps, 1, "an integer >= 1")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_side(f"bench.{name}", getattr(self, name))
        if self.guidance_scale is not None:
            check_guidance("bench.guidance_scale", self.guidance_scale)
        if self.max_sequence_length is not None:
            check_sequence_length("bench.max_sequence_length", self.max_sequence_length)


@dataclass
class FidelityConfig:
    """Thresholds per metric; the worst prompt must meet them. Metrics not listed are reported only."""

    lossless: dict[str, float] = field(default_factory=lambda: {"psnr": 30.0, "ssim": 0.95, "latent_rel_l2": 0.05})
    lossy: dict[str, float] = field(default_factory=lambda: {"psnr": 20.0, "ssim": 0.75, "latent_rel_l2": 0.25})

    def __post_init__(self) -> None:
        known = plugins.metrics()
        for kind in ("lossless", "lossy"):
            thresholds = getattr(self, kind)
            if not isinstance(thresholds, Mapping):
                raise ConfigError(f"fidelity.{kind}={thresholds!r} is not allowed: a mapping of metric -> threshold")
            for name, value in thresholds.items():
                if name not in known:
                    raise ConfigError(f"fidelity.{kind}.{name}: unknown metric.{did_you_mean(name, known)} "
                                      f"Known metrics: {', '.join(sorted(known))}")
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ConfigError(f"fidelity.{kind}.{name}={value!r} is not allowed: a finite number")
                why = known[name].impossible_threshold(value)
                if why:
                    raise ConfigError(f"fidelity.{kind}.{name}={value!r} is not allowed: {why}")


@dataclass
class BudgetConfig:
    """Wall-clock limits: a stack over ``stack_s`` (load, build, measurement) is stopped and
    recorded as over budget with the phase it reached; once the run has spent ``run_s`` (baseline
    included), the stacks left are recorded as not run. None: no limit."""

    stack_s: Optional[float] = None
    run_s: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("stack_s", "run_s"):
            check_seconds(f"budget.{name}", getattr(self, name), "no limit")


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
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    backend: dict[str, Any] = field(default_factory=dict)  # selected backends -> their options
    # Several stacks measured against one baseline in one process: a list (each a backend or
    # preset name, a list of names, or a mapping name -> options) or a YAML file holding one
    # under ``stacks:``. Read once here; the record holds the list itself.
    stacks: Any = None
    device: str = "auto"  # auto | cpu | cuda
    # Plugins whose event hooks this run skips, by registered name (fluxopt.report: no report.md or
    # console table; fluxopt.profile: no profiling; a third-party event writer by its entry point)
    disabled_plugins: list[str] = field(default_factory=list)
    # The results store every finished run is added to (fluxopt-report compare / history): a SQLite
    # file path; None: $FLUXOPT_STORE, else fluxopt.sqlite in the working directory; off: none.
    store: Optional[str] = None
    label: Optional[str] = None  # a name for this run in the store (``fluxopt-report compare LABEL ...``)

    def __post_init__(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r} is not one of {', '.join(DEVICES)}")
        for name in ("store", "label"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{name}={value!r} is not a non-empty string ({'a file path or off' if name == 'store' else 'a name'})")
        if self.store is not None and Path(self.store).expanduser().is_dir():
            raise ConfigError(f"store={self.store} is a directory; give a file path for the SQLite store, or store=off")
        if self.stacks is not None:
            if self.backend:
                raise ConfigError("stacks= and +backend= both choose what is measured; use one (a single stack is "
                                  "+backend=[a,b], several against one baseline stacks=[...])")
            self.stacks = read_stack_list(self.stacks)
        plugins.check_disabled(self.disabled_plugins)
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


STACK_ENTRY_RULE = "a backend or preset name, a list of names, or a mapping name -> options"


def read_stack_list(value: Any) -> list[dict[str, dict[str, Any]]]:
    """``stacks=`` as a list of mappings backend name -> options (names and options are checked when
    the stacks are built): from the list given, or from the YAML file it names."""
    setting = "stacks"
    if isinstance(value, str):
        path = Path(value).expanduser()
        setting = f"stacks={value}"
        if not path.is_file():
            raise ConfigError(f"{setting}: no such file (a YAML file with a list under 'stacks:', or a list "
                              "stacks=[a,[b,c]])")
        import yaml

        try:
            loaded = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ConfigError(f"{setting} cannot be read as YAML: {str(exc).splitlines()[0]}") from None
        value = loaded.get("stacks") if isinstance(loaded, dict) else loaded
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{setting}={value!r} is not allowed: a non-empty list, each entry {STACK_ENTRY_RULE}")
    entries = []
    for item in value:
        if isinstance(item, str):
            item = {item: {}}
        elif isinstance(item, (list, tuple)) and item and all(isinstance(n, str) for n in item):
            item = {n: {} for n in item}
        if not isinstance(item, Mapping) or not item or not all(
                isinstance(k, str) and (v is None or isinstance(v, Mapping)) for k, v in item.items()):
            raise ConfigError(f"{setting} has {item!r}: each entry is {STACK_ENTRY_RULE}")
        entries.append({k: dict(v or {}) for k, v in item.items()})
    return entries


def run_config(source: DictConfig | Mapping[str, Any]) -> RunConfig:
    """The one way to a validated :class:`RunConfig`, for the CLI (a config Hydra composed) and the
    Python API (a plain mapping of the same settings) alike: merged onto the schema (unknown keys
    and wrong types refused) and built, so every ``__post_init__`` check runs. Raises ConfigError
    with one line naming the setting."""
    data = source if isinstance(source, DictConfig) else OmegaConf.create(dict(source))
    keys = [k for k in data if k != "hydra"]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), {k: data[k] for k in keys})
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{key}: {detail}" if key and key not in detail else detail) from None
    assert isinstance(config, RunConfig)
    return config


# Settings that decide what is measured; resume compares these only (not output paths, resume, verbosity).
MEASUREMENT_KEYS = ("model", "bench", "fidelity", "backend", "stacks", "device", "build_only", "budget")


def measurement_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in MEASUREMENT_KEYS}


def recorded_config(cfg: DictConfig, config: RunConfig) -> dict[str, Any]:
    """The configuration a record holds: the composed settings as given (resolved, without Hydra's
    own), with ``stacks`` as the list measured, not the file that held it."""
    data = OmegaConf.to_container(cfg, resolve=True)
    data.pop("hydra", None)
    if config.stacks is not None:
        data["stacks"] = config.stacks
    return data


def run_id() -> str:
    """Unique per process: two runs started in the same second never share an output directory."""
    return f"{os.getpid()}-{secrets.token_hex(2)}"


# The bench presets (``bench=<name>``); a setting not given here is the model's own default.
BENCHES = {
    "quick": BenchConfig(name="quick"),  # the model's steps and resolution: a smoke test
    # published numbers: FLUX.1-dev's 1024x1024 and 28 steps, more timed calls; a stack slower than
    # 6 s an image (a datacenter GPU's bf16 baseline takes about 5) is timed on fewer of them, and so
    # is one whose mean is known to 0.5 % after 3 (on a datacenter GPU most stacks are). One warm-up
    # call: the first call is the one that differs (lazy initialisation, compilation, capture); a
    # stack still settling at its second call shows as spread, which keeps its timing going, and
    # speedups compare medians, which one slow call does not move.
    "full": BenchConfig(name="full", height=DEV_DEFAULTS.height, width=DEV_DEFAULTS.width, steps=DEV_DEFAULTS.steps,
                        warmup=1, iterations=5, max_time_s=30.0, target_rse=0.005),
}


def register_configs() -> None:
    """Put every config group into Hydra's ConfigStore (idempotent): the run schema, the bench
    presets, the default fidelity thresholds, every model (``model=<name>``, a plugin's included),
    every backend's options and every preset."""
    if not OmegaConf.has_resolver(RUN_ID_RESOLVER):
        OmegaConf.register_new_resolver(RUN_ID_RESOLVER, run_id, use_cache=True)
    plugins.hook().fluxopt_register_configs()
    cs = ConfigStore.instance()
    cs.store(name="fluxopt_run_schema", node=RunConfig)
    for name, bench in BENCHES.items():
        cs.store(group="bench", name=name, node=bench)
    cs.store(group="fidelity", name="default", node=FidelityConfig)
    for name in plugins.models():
        cs.store(group="model", name=name, node=ModelConfig(name=name))
    backends = plugins.backends()
    for name, backend in backends.items():
        cs.store(group="backend", name=name, node=backend.options_class, package=f"backend.{name}")
    for name, preset in plugins.presets().items():
        # each backend typed like +backend=<backend> (so its other options can be overridden);
        # one not installed stays a plain mapping and build_stack names it as unknown
        node = {b: OmegaConf.merge(OmegaConf.structured(backends[b].options_class), dict(o)) if b in backends
                else dict(o) for b, o in preset.backends.items()}
        cs.store(group="backend", name=name, node=node, package="backend")
