"""The run plan: a composed configuration checked and resolved before anything heavy happens.

Every setting is validated here (bench shapes and counts, device, dtype, model, stacks and
their options, output and cache directories, whether the images can fit in memory), so a
bad value fails in well under a second with one line naming the setting, the value and what
is allowed, and no model is ever loaded for a doomed run.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from fluxopt import plugins
from fluxopt.artifacts import default_cache_dir
from fluxopt.environment import DeviceInfo, detect_device
from fluxopt.errors import ConfigError, UnavailableError
from fluxopt.models import GenerationDefaults, ModelSpec, checkpoint_defaults, resolve_dtype
from fluxopt.shapes import Shapes
from fluxopt.stack import Stack, build_stack

DEFAULT_PROMPTS = (
    "a red circle above a blue square on a white background",
    "an astronaut standing next to a giant lemon, photograph",
)
# Peak bytes per output pixel of a FLUX VAE decode (128 channels at full resolution, a few live
# activations of 4 bytes): a floor on what one image needs, used to refuse what cannot fit.
VAE_BYTES_PER_PIXEL = 128 * 4 * 3
MAX_SIDE = 8192  # FLUX.1 is trained up to ~2 MP; larger sides are refused outright


@dataclass(frozen=True)
class RunPlan:
    device: DeviceInfo
    spec: ModelSpec
    dtype: torch.dtype
    shapes: Shapes
    prompts: tuple[str, ...]
    seed: int
    warmup: int
    iterations: int
    stacks: tuple[Stack, ...]
    explicit: bool  # the user named the stack (else: a bake-off of every backend)
    cache_dir: Path
    detach: bool = False  # run the command in the background (fluxopt.detach)


def _int(setting: str, value: Any, minimum: int, allowed: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{setting}={value!r} is not allowed: {allowed}")
    return value


def selected_backends(cfg: Any) -> dict[str, Any]:
    """``cfg.backend`` as a plain dict: backend name -> options (empty: no stack selected)."""
    node = cfg.get("backend")
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node or {})


def resolve_shapes(bench: Mapping[str, Any], d: GenerationDefaults) -> Shapes:
    """The bench settings, each defaulting to the model's own (``d``)."""
    def pick(key: str, default: Any) -> Any:
        value = bench.get(key)
        return default if value is None else value

    side = f"a multiple of 16 between 16 and {MAX_SIDE} (FLUX packs 2x2 latent patches of an 8x VAE)"
    height = _int("bench.height", pick("height", d.height), 16, side)
    width = _int("bench.width", pick("width", d.width), 16, side)
    for name, value in (("bench.height", height), ("bench.width", width)):
        if value % 16 or value > MAX_SIDE:
            raise ConfigError(f"{name}={value} is not allowed: {side}")
    steps = _int("bench.steps", pick("steps", d.steps), 1, "an integer >= 1")
    seq = _int("bench.max_sequence_length", pick("max_sequence_length", d.max_sequence_length), 1,
               "an integer between 1 and 512 (T5's limit in FluxPipeline)")
    if seq > 512:
        raise ConfigError(f"bench.max_sequence_length={seq} is not allowed: an integer between 1 and 512 "
                          "(T5's limit in FluxPipeline)")
    guidance = pick("guidance_scale", d.guidance_scale)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance) \
            or guidance < 0:
        raise ConfigError(f"bench.guidance_scale={guidance!r} is not allowed: a finite number >= 0")
    return Shapes(height=height, width=width, steps=steps, guidance_scale=float(guidance), max_sequence_length=seq)


def check_fits(shapes: Shapes, device: DeviceInfo) -> None:
    """Refuse images whose decode alone cannot fit the device's memory, with the estimate."""
    need = shapes.height * shapes.width * VAE_BYTES_PER_PIXEL * shapes.batch_size
    if device.is_gpu:
        have, where = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory, device.name
    else:
        have, where = psutil.virtual_memory().total, "this machine's RAM"
    if need > have:
        raise ConfigError(f"bench.height={shapes.height} bench.width={shapes.width} needs an estimated "
                          f"{need / 2**30:.0f} GiB for the VAE decode alone, more than {where} has "
                          f"({have / 2**30:.0f} GiB); use a smaller resolution")


def check_writable_dir(setting: str, path: Path) -> None:
    """``path`` exists as a writable directory or can be created: else one line naming the setting."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ConfigError(f"{setting}={path} is not usable: {probe} is a file, not a directory")
    try:  # the only reliable test (os.access is wrong for root, read-only mounts, /proc...)
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as exc:
        raise ConfigError(f"{setting}={path} is not usable: cannot create anything in {probe} "
                          f"({exc.strerror})") from None


def check_prompts(prompts: Any) -> tuple[str, ...]:
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ConfigError(f"bench.prompts={prompts!r} is not allowed: a non-empty list of strings")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"bench.prompts has {p!r}: every prompt must be a non-empty string")
    return tuple(prompts)


def plan_run(cfg: Any, stacks: list[Stack] | None = None, check_memory: bool = True,
             check_requirements: bool = True) -> RunPlan:
    """Validate and resolve a composed run configuration; nothing is loaded.

    ``stacks`` replaces the stacks the config selects (benchmark scripts compare a chosen list).
    Raises ConfigError (bad value) or UnavailableError (an explicitly requested stack cannot run
    on this machine)."""
    device = detect_device(cfg.get("device", "auto"))
    spec = plugins.model(cfg.model.name)
    dtype = resolve_dtype(cfg.model.get("dtype", "auto"), device.is_gpu)
    bench = cfg.bench
    defaults = checkpoint_defaults(spec, cfg.model.get("path"))
    shapes = resolve_shapes(bench, defaults)
    if check_memory:
        check_fits(shapes, device)
    prompts = bench.get("prompts")
    prompts = check_prompts(list(prompts) if prompts is not None else (defaults.prompts or DEFAULT_PROMPTS))
    seed = _int("bench.seed", bench.get("seed", 0), 0, "an integer >= 0")
    warmup = _int("bench.warmup", bench.get("warmup", 1), 0, "an integer >= 0 (untimed calls before timing)")
    iterations = _int("bench.iterations", bench.get("iterations", 3), 1, "an integer >= 1 (timed calls)")
    for kind in ("lossless", "lossy"):
        thresholds = cfg.fidelity.get(kind) or {}
        known = plugins.metrics()
        for name, value in thresholds.items():
            if name not in known:
                raise ConfigError(f"fidelity.{kind}.{name}: unknown metric; known metrics: {', '.join(sorted(known))}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"fidelity.{kind}.{name}={value!r} is not allowed: a finite number")
    cache_setting = "cache.dir" if cfg.cache.get("dir") else "the cache directory ($FLUXOPT_CACHE_DIR, " \
                                                               "$XDG_CACHE_HOME or $HOME/.cache)"
    cache_dir = Path(cfg.cache.dir).expanduser() if cfg.cache.get("dir") else default_cache_dir()
    check_writable_dir(cache_setting, cache_dir)
    selection = selected_backends(cfg)
    if stacks is not None:
        chosen, explicit = tuple(stacks), False
    elif selection:
        chosen, explicit = (build_stack(selection),), True
    else:
        chosen, explicit = tuple(build_stack([name]) for name in sorted(plugins.backends())), False
    plan = RunPlan(device=device, spec=spec, dtype=dtype, shapes=shapes, prompts=prompts, seed=seed,
                   warmup=warmup, iterations=iterations, stacks=chosen, explicit=explicit, cache_dir=cache_dir,
                   detach=bool(cfg.get("detach", False)))
    if check_requirements:
        check_runnable(plan)
    return plan


def check_runnable(plan: RunPlan) -> None:
    """An explicitly requested stack must be runnable here: say why not, before loading."""
    if plan.explicit:
        unmet = plan.stacks[0].unmet_requirements(plan.device)
        if unmet:
            raise UnavailableError(f"stack '{plan.stacks[0].name}' cannot run here: " + "; ".join(unmet))
