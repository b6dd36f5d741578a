"""The run plan: a composed configuration checked and resolved before anything heavy happens.

Every setting is validated here (bench shapes and counts, device, dtype, model, stacks and
their options, output and cache directories, whether the images can fit in memory), so a
bad value fails in well under a second with one line naming the setting, the value and what
is allowed, and no model is ever loaded for a doomed run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from fluxopt import plugins
from fluxopt.artifacts import default_cache_dir
from fluxopt.config import (BenchConfig, RunConfig, check_guidance, check_int, check_prompts, check_sequence_length,
                            check_side, run_config)
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
    config: RunConfig
    detach: bool = False  # run the command in the background (fluxopt.scale.detach)
    max_time_s: float | None = None  # the warm-up's and the timing's time limit (bench.max_time_s)
    target_rse: float | None = None  # the precision that ends the timing early (bench.target_rse)


def selected_backends(cfg: Any) -> dict[str, Any]:
    """``cfg.backend`` as a plain dict: backend name -> options (empty: no stack selected)."""
    node = cfg.get("backend")
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node or {})


def resolve_shapes(bench: BenchConfig, d: GenerationDefaults) -> Shapes:
    """The bench settings, each defaulting to the model's own (``d``), checked by the same rules."""
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return Shapes(height=check_side("bench.height", pick(bench.height, d.height)),
                  width=check_side("bench.width", pick(bench.width, d.width)),
                  steps=check_int("bench.steps", pick(bench.steps, d.steps), 1, "an integer >= 1"),
                  guidance_scale=check_guidance("bench.guidance_scale", pick(bench.guidance_scale, d.guidance_scale)),
                  max_sequence_length=check_sequence_length("bench.max_sequence_length",
                                                            pick(bench.max_sequence_length, d.max_sequence_length)))


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


def plan_run(cfg: Any, stacks: list[Stack] | None = None, check_memory: bool = True,
             check_requirements: bool = True, spec: ModelSpec | None = None, device: DeviceInfo | None = None,
             dtype: torch.dtype | None = None, explicit: bool = False) -> RunPlan:
    """Validate and resolve a run configuration (composed by Hydra, or a mapping of the same
    settings from the Python API) through :func:`fluxopt.config.run_config`; nothing is loaded.

    ``stacks`` replaces the stacks the config selects (``explicit``: the user named them, so one
    that cannot run here fails the run); ``spec``, ``device`` and ``dtype`` describe
    a pipeline the caller already has (``fluxopt.benchmark``) instead of a registered model.
    Raises ConfigError (bad value) or UnavailableError (an explicitly requested stack cannot run
    on this machine)."""
    config = run_config(cfg)
    device = device or detect_device(config.device)
    spec = spec or plugins.model(config.model.name)
    dtype = dtype or resolve_dtype(config.model.dtype, device.is_gpu)
    defaults = checkpoint_defaults(spec, config.model.path)
    shapes = resolve_shapes(config.bench, defaults)
    if check_memory:
        check_fits(shapes, device)
    prompts = check_prompts("bench.prompts", config.bench.prompts or defaults.prompts or DEFAULT_PROMPTS)
    cache_setting = "cache.dir" if config.cache.dir else "the cache directory ($FLUXOPT_CACHE_DIR, " \
                                                        "$XDG_CACHE_HOME or $HOME/.cache)"
    cache_dir = Path(config.cache.dir).expanduser() if config.cache.dir else default_cache_dir()
    check_writable_dir(cache_setting, cache_dir)
    selection = selected_backends(cfg)
    if stacks is not None:
        chosen = tuple(stacks)
    elif config.stacks is not None:
        chosen, explicit = tuple(build_stack(entry) for entry in config.stacks), True
    elif selection:
        chosen, explicit = (build_stack(selection),), True
    else:
        chosen, explicit = tuple(build_stack([name]) for name in sorted(plugins.backends())), False
    plan = RunPlan(device=device, spec=spec, dtype=dtype, shapes=shapes, prompts=prompts, seed=config.bench.seed,
                   warmup=config.bench.warmup, iterations=config.bench.iterations, stacks=chosen, explicit=explicit,
                   cache_dir=cache_dir, config=config, detach=config.detach, max_time_s=config.bench.max_time_s,
                   target_rse=config.bench.target_rse)
    if check_requirements:
        check_runnable(plan)
    return plan


def check_runnable(plan: RunPlan) -> None:
    """Explicitly requested stacks must be runnable here: say which is not and why, before loading."""
    if plan.explicit:
        refused = [f"stack '{s.name}' cannot run here: " + "; ".join(unmet) for s in plan.stacks
                   if (unmet := s.unmet_requirements(plan.device))]
        if refused:
            raise UnavailableError("; ".join(refused))
