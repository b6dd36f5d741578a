"""The Python API for serving code: apply the stack a bake-off picked to your own FluxPipeline.

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", dtype=torch.bfloat16).to("cuda")
    applied = fluxopt.apply_stack(pipe, {"compile": {"regional": True}, "fbcache": {}})
    image = pipe("a cat").images[0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxopt import plugins
from fluxopt.artifacts import default_cache_dir
from fluxopt.backend import Shapes, StackContext
from fluxopt.environment import detect_device
from fluxopt.errors import UnavailableError
from fluxopt.stack import Stack, build_stack


@dataclass
class AppliedStack:
    """A stack applied to a pipeline. Global state it changed (Inductor flags...) stays in force
    until ``close()``, which a server normally never calls."""

    stack: Stack
    pipe: Any
    stats: dict[str, Any]
    _exit_stack: contextlib.ExitStack

    def close(self) -> None:
        self._exit_stack.close()


def _pipe_device(pipe: Any) -> str:
    return "cuda" if pipe.transformer.device.type == "cuda" else "cpu"


def available_backends(device: str = "auto") -> dict[str, str | None]:
    """Every registered backend and why it cannot run on ``device`` (None: it can)."""
    info = detect_device(device)
    return {name: b.unmet_requirement(b.options_class(), info) for name, b in sorted(plugins.backends().items())}


def load_model(name: str = "tiny", device: str = "auto", dtype: str = "auto", path: str | None = None) -> Any:
    """A FluxPipeline for a registered model spec (``tiny``, ``flux-dev``, ``flux-dev-random``...)."""
    from fluxopt.models import load_pipeline
    from fluxopt.runner import resolve_dtype, resolve_model

    info = detect_device(device)
    return load_pipeline(resolve_model(name), info.torch_device, resolve_dtype(dtype, info), default_cache_dir(),
                         path=path)


def apply_stack(pipe: Any, backends: Sequence[str] | Mapping[str, Mapping[str, Any] | None], *,
                height: int = 1024, width: int = 1024, steps: int = 28, guidance_scale: float = 3.5,
                max_sequence_length: int = 512, build: bool = True, cache_dir: str | Path | None = None) -> AppliedStack:
    """Apply backends (names, or names -> options) to ``pipe`` in stage order.

    The shapes are those you will serve: graph backends specialise on them. With ``build``,
    ahead-of-time work (compilation, export, engine build) happens now, with one warm-up
    generation, instead of on your first request.
    """
    stack = build_stack(backends)
    device = detect_device(_pipe_device(pipe))
    unmet = stack.unmet_requirements(device)
    if unmet:
        raise UnavailableError(f"stack '{stack.name}' cannot run here: " + "; ".join(unmet))
    shapes = Shapes(height=height, width=width, steps=steps, guidance_scale=guidance_scale,
                    max_sequence_length=max_sequence_length)
    exit_stack = contextlib.ExitStack()

    def run_once() -> None:
        with torch.inference_mode():
            pipe(prompt="warm-up", height=height, width=width, num_inference_steps=steps,
                 guidance_scale=guidance_scale, max_sequence_length=max_sequence_length,
                 generator=torch.Generator("cpu").manual_seed(0), output_type="latent")

    ctx = StackContext(device=device, dtype=pipe.transformer.dtype, model=None, shapes=shapes,
                       cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(), exit_stack=exit_stack,
                       prompts=("warm-up",), run_once=run_once, stack=stack)
    for entry in stack.entries:
        entry.backend.apply(pipe, entry.options, ctx)
    if build:
        for entry in stack.entries:
            entry.backend.build(pipe, entry.options, ctx)
    return AppliedStack(stack=stack, pipe=pipe, stats=ctx.stats, _exit_stack=exit_stack)
