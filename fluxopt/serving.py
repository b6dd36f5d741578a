"""The Python API for serving code: apply the stack a bake-off picked to your own FluxPipeline,
and take it off again.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")
    with fluxopt.apply_stack(pipe, {"compile": {"regional": True}, "fbcache": {}}) as applied:
        image = pipe("a cat").images[0]
    # here the pipeline is exactly as it was
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fluxopt import plugins
from fluxopt.apply import AppliedStack, apply_to_pipeline, check_pipeline
from fluxopt.artifacts import default_cache_dir
from fluxopt.config import BenchConfig
from fluxopt.context import StackContext
from fluxopt.environment import DeviceInfo, detect_device
from fluxopt.errors import ConfigError, UnavailableError
from fluxopt.models import DEV_DEFAULTS, load_pipeline, resolve_dtype
from fluxopt.record import RESULT_FILE, RunRecord, StackRecord, UnreadableRecord, read_record
from fluxopt.selection import Limits, ineligible
from fluxopt.shapes import Shapes
from fluxopt.stack import build_stack

__all__ = ["AppliedStack", "apply_stack", "available_backends", "load_model"]
log = logging.getLogger("fluxopt")


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


def stack_from_result(path: str | Path, stack: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any], str]:
    """The backends and options of the stack named ``stack`` (e.g. ``"torchao_fp8+compile"``) as
    measured in a result.json, or in any result.json below a directory, the shapes it was measured
    at, and which record that was. Only a measurement that ran whole, passed its fidelity gate and
    was not edited counts (read through the one reader); of several, the fastest."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such result file or directory")
    files = sorted(path.rglob(RESULT_FILE)) if path.is_dir() else [path]
    candidates: list[tuple[float, StackRecord, RunRecord]] = []
    seen: dict[str, str] = {}
    for file in files:
        try:
            record = read_record(file)
        except UnreadableRecord as exc:
            raise ConfigError(str(exc)) from None
        if record is None:
            raise ConfigError(f"{file}: no such result file")
        for s in record.stacks:
            why = ineligible(s, Limits(), record)
            seen.setdefault(s.stack, why or "usable")
            if s.stack == stack and why is None:
                candidates.append((s.speedup, s, record))
            elif s.stack == stack:
                seen[s.stack] = why
    if not candidates:
        if stack in seen:
            raise ConfigError(f"stack={stack!r} in {path} cannot be applied: {seen[stack]}")
        raise ConfigError(f"stack={stack!r} is not in {path}; stacks there: {', '.join(sorted(seen)) or 'none'}")
    _, chosen, record = max(candidates, key=lambda c: c[0])
    options = {name: (chosen.options or {}).get(name) or {} for name in chosen.backends}
    return options, dict(record.shapes), f"{record.path} ({chosen.stack}, {chosen.speedup:.2f}x)"


def apply_stack(pipe: Any, backends: str | Path | Sequence[str] | Mapping[str, Mapping[str, Any] | None], *,
                stack: str | None = None,
                height: int | None = None, width: int | None = None, steps: int | None = None,
                guidance_scale: float | None = None, max_sequence_length: int | None = None, build: bool = True,
                cache_dir: str | Path | None = None, restorable: bool = True) -> AppliedStack:
    """Apply backends (a name, names, or names -> options) to ``pipe`` in stage order and
    return the :class:`AppliedStack`, a context manager whose ``close()`` undoes everything.

    ``backends`` may also be a :class:`pathlib.Path` to a bake-off's result.json (or a sweep
    directory) with ``stack`` naming one of its stacks: that stack's backends and options are
    applied, at the shapes it was measured at (max_sequence_length included) unless given here;
    only a measurement that ran whole and passed its gate is applied, and ``applied.source`` names
    it. Default shapes: FLUX.1-dev's (1024x1024, 28 steps, guidance 3.5, 512 text tokens).

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
    source = None
    if isinstance(backends, Path):
        if stack is None:
            raise ConfigError("apply_stack(pipe, Path(...)) needs stack=<name> (e.g. stack='torchao_fp8+compile')")
        backends, measured, source = stack_from_result(backends, stack)
        log.info("apply_stack: applying %s", source)
    elif stack is not None:
        raise ConfigError("stack= names a stack of a result file: pass the file as a pathlib.Path")

    def pick(value: Any, key: str, default: Any) -> Any:
        return value if value is not None else measured.get(key, default)

    d = DEV_DEFAULTS
    bench = BenchConfig(height=pick(height, "height", d.height), width=pick(width, "width", d.width),
                        steps=pick(steps, "steps", d.steps), guidance_scale=pick(guidance_scale, "guidance_scale",
                                                                                d.guidance_scale),
                        max_sequence_length=pick(max_sequence_length, "max_sequence_length", d.max_sequence_length))
    built = build_stack(backends)
    shapes = Shapes(height=bench.height, width=bench.width, steps=bench.steps,
                    guidance_scale=float(bench.guidance_scale), max_sequence_length=bench.max_sequence_length)
    check_pipeline(pipe)
    device = pipeline_device(pipe)
    unmet = built.unmet_requirements(device)
    if unmet:
        raise UnavailableError(f"stack '{built.name}' cannot run here: " + "; ".join(unmet))

    def run_once() -> None:
        with torch.inference_mode():
            pipe(prompt="warm-up", height=shapes.height, width=shapes.width, num_inference_steps=shapes.steps,
                 guidance_scale=shapes.guidance_scale, max_sequence_length=shapes.max_sequence_length,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent")

    ctx = StackContext(device=device, dtype=pipe.transformer.dtype, model=None, shapes=shapes,
                       cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
                       prompts=("warm-up",), run_once=run_once, stack=built)
    applied = apply_to_pipeline(pipe, built, ctx, build=build, restorable=restorable)
    applied.source = source
    return applied
