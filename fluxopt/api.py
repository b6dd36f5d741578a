"""The Python API for serving code: apply the stack a bake-off picked to your own FluxPipeline,
and take it off again.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")
    with fluxopt.apply_stack(pipe, {"compile": {"regional": True}, "fbcache": {}}) as applied:
        image = pipe("a cat").images[0]
    # here the pipeline is exactly as it was
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fluxopt import plugins
from fluxopt.apply import AppliedStack, apply_to_pipeline, check_pipeline
from fluxopt.artifacts import default_cache_dir
from fluxopt.context import StackContext
from fluxopt.environment import DeviceInfo, detect_device
from fluxopt.errors import ConfigError, UnavailableError
from fluxopt.models import load_pipeline, resolve_dtype
from fluxopt.shapes import Shapes
from fluxopt.stack import build_stack

__all__ = ["AppliedStack", "apply_stack", "available_backends", "load_model"]


def _pipe_device(pipe: Any) -> DeviceInfo:
    return detect_device("cuda" if pipe.transformer.device.type == "cuda" else "cpu")


def available_backends(device: str = "auto") -> dict[str, str | None]:
    """Every registered backend and why it cannot run on ``device`` (None: it can)."""
    info = detect_device(device)
    return {name: b.unmet_requirement(b.options_class(), info) for name, b in sorted(plugins.backends().items())}


def load_model(name: str = "tiny", device: str = "auto", dtype: str = "auto", path: str | None = None) -> Any:
    """A FluxPipeline for a registered model (``tiny``, ``flux-mini``, ``flux-dev``, ``flux-dev-random``...)."""
    info = detect_device(device)
    return load_pipeline(plugins.model(name), info.torch_device, resolve_dtype(dtype, info.is_gpu), default_cache_dir(),
                         path=path)


def _shapes(height: Any, width: Any, steps: Any, guidance_scale: Any, max_sequence_length: Any) -> Shapes:
    for name, value in (("height", height), ("width", width), ("steps", steps),
                        ("max_sequence_length", max_sequence_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}={value!r} must be a positive integer")
    if height % 16 or width % 16:
        raise ConfigError(f"height and width must be multiples of 16 (FLUX packs 2x2 latent patches of an 8x VAE); "
                          f"got {height}x{width}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
            or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(f"guidance_scale={guidance_scale!r} must be a finite number >= 0")
    return Shapes(height=height, width=width, steps=steps, guidance_scale=float(guidance_scale),
                  max_sequence_length=max_sequence_length)


def apply_stack(pipe: Any, backends: str | Sequence[str] | Mapping[str, Mapping[str, Any] | None], *,
                height: int = 1024, width: int = 1024, steps: int = 28, guidance_scale: float = 3.5,
                max_sequence_length: int = 512, build: bool = True,
                cache_dir: str | Path | None = None, restorable: bool = True) -> AppliedStack:
    """Apply backends (a name, names, or names -> options) to ``pipe`` in stage order and
    return the :class:`AppliedStack`, a context manager whose ``close()`` undoes everything.

    The shapes are those you will serve: graph backends specialise on them. With ``build``,
    ahead-of-time work (compilation, export, engine build) happens now, with one warm-up
    generation, instead of on your first request. ``restorable=False`` keeps no copy of
    weights a backend replaces (less host memory); ``close()`` then restores structure and
    process-wide state but not those weights.

    Everything is validated before the pipeline is touched; a failure while applying rolls
    the pipeline back before the error is raised.
    """
    if backends is None:
        raise ConfigError("backends is None: name at least one backend, e.g. apply_stack(pipe, ['compile'])")
    stack = build_stack(backends)
    shapes = _shapes(height, width, steps, guidance_scale, max_sequence_length)
    check_pipeline(pipe)
    device = _pipe_device(pipe)
    unmet = stack.unmet_requirements(device)
    if unmet:
        raise UnavailableError(f"stack '{stack.name}' cannot run here: " + "; ".join(unmet))

    def run_once() -> None:
        with torch.inference_mode():
            pipe(prompt="warm-up", height=height, width=width, num_inference_steps=steps,
                 guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent")

    ctx = StackContext(device=device, dtype=pipe.transformer.dtype, model=None, shapes=shapes,
                       cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
                       prompts=("warm-up",), run_once=run_once, stack=stack)
    return apply_to_pipeline(pipe, stack, ctx, build=build, restorable=restorable)
