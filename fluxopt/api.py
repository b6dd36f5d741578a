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
from fluxopt.result import RESULT_FILE, UnreadableResult, load_result
from fluxopt.shapes import Shapes
from fluxopt.stack import build_stack

__all__ = ["AppliedStack", "apply_stack", "available_backends", "load_model"]


def pipeline_device(pipe: Any) -> DeviceInfo:
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


def check_shapes(height: Any, width: Any, steps: Any, guidance_scale: Any, max_sequence_length: Any) -> Shapes:
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


def stack_from_result(path: str | Path, stack: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """The backends and options of the stack named ``stack`` (e.g. ``"torchao_fp8+compile"``) in a
    bake-off's result.json, or in any result.json below a directory, and the shapes it was measured at."""
    path = Path(path)
    files = sorted(path.rglob(RESULT_FILE)) if path.is_dir() else [path]
    seen = []
    for file in files:
        try:
            data = load_result(file)
        except UnreadableResult as exc:
            raise ConfigError(str(exc)) from None
        if data is None:
            raise ConfigError(f"{file}: no such result file")
        for record in data.get("stacks") or []:
            seen.append(record.get("stack"))
            if record.get("stack") == stack:
                options = record.get("options") or {}
                return {name: options.get(name) or {} for name in record.get("backends") or []}, data.get("shapes") or {}
    raise ConfigError(f"stack={stack!r} is not in {path}; stacks there: {', '.join(sorted(set(map(str, seen)))) or 'none'}")


def apply_stack(pipe: Any, backends: str | Path | Sequence[str] | Mapping[str, Mapping[str, Any] | None], *,
                stack: str | None = None,
                height: int | None = None, width: int | None = None, steps: int | None = None,
                guidance_scale: float | None = None, max_sequence_length: int = 512, build: bool = True,
                cache_dir: str | Path | None = None, restorable: bool = True) -> AppliedStack:
    """Apply backends (a name, names, or names -> options) to ``pipe`` in stage order and
    return the :class:`AppliedStack`, a context manager whose ``close()`` undoes everything.

    ``backends`` may also be a :class:`pathlib.Path` to a bake-off's result.json (or a sweep
    directory) with ``stack`` naming one of its stacks: that stack's backends and options are
    applied, at the shapes it was measured at unless given here. Default shapes: 1024x1024,
    28 steps, guidance 3.5.

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
    measured: dict[str, Any] = {}
    if isinstance(backends, Path):
        if stack is None:
            raise ConfigError("apply_stack(pipe, Path(...)) needs stack=<name> (e.g. stack='torchao_fp8+compile')")
        backends, measured = stack_from_result(backends, stack)
    elif stack is not None:
        raise ConfigError("stack= names a stack of a result file: pass the file as a pathlib.Path")

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else measured.get(key, default)

    height, width = pick(height, "height", 1024), pick(width, "width", 1024)
    steps, guidance_scale = pick(steps, "steps", 28), pick(guidance_scale, "guidance_scale", 3.5)
    built = build_stack(backends)
    shapes = check_shapes(height, width, steps, guidance_scale, max_sequence_length)
    check_pipeline(pipe)
    device = pipeline_device(pipe)
    unmet = built.unmet_requirements(device)
    if unmet:
        raise UnavailableError(f"stack '{built.name}' cannot run here: " + "; ".join(unmet))

    def run_once() -> None:
        with torch.inference_mode():
            pipe(prompt="warm-up", height=height, width=width, num_inference_steps=steps,
                 guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent")

    ctx = StackContext(device=device, dtype=pipe.transformer.dtype, model=None, shapes=shapes,
                       cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
                       prompts=("warm-up",), run_once=run_once, stack=built)
    return apply_to_pipeline(pipe, built, ctx, build=build, restorable=restorable)
