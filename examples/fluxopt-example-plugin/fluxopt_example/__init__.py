"""Example third-party fluxopt plugin: a backend, a model, a metric and an event hook.

* backend ``vae_tiling``: decode latents in tiles (and batch slices) to bound VAE memory;
  lossy, since tile seams are blended;
* model ``tiny-square``: fluxopt's embedded tiny pipeline with generation defaults of its own
  (32x32, 2 steps), selectable as ``model=tiny-square``;
* metric ``max_abs_diff``: the largest per-pixel difference to the baseline image (reported;
  gates the verdict only if ``fidelity.lossy.max_abs_diff`` sets a threshold);
* event hook: appends one line per finished stack to ``<run dir>/example-events.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import fluxopt
from fluxopt import (Backend, ConfigError, GenerationDefaults, Metric, ModelSpec, Sample, StackContext, StackRecord,
                     Stage, hookimpl)


@dataclass
class VaeTilingOptions:
    tiling: bool = True
    slicing: bool = True
    tile_size: int = 512  # pixels; the VAE decodes tiles of this size (blended at the seams)


class VaeTilingBackend(Backend):
    name = "vae_tiling"
    description = "VAE tiled and sliced decoding (diffusers enable_tiling/enable_slicing)"
    options_class = VaeTilingOptions
    stage = Stage.PLACEMENT
    lossless = False

    def validate_options(self, options: VaeTilingOptions) -> None:
        if options.tile_size < 64 or options.tile_size % 8:
            raise ConfigError(f"backend.vae_tiling.tile_size={options.tile_size} must be a multiple of 8, at least 64")

    def apply(self, pipe: Any, options: VaeTilingOptions, ctx: StackContext) -> None:
        # A library call's change to the pipeline is undone by the stack's snapshot; naming it puts it
        # in the journal (applied.changes) with the rest.
        if options.tiling:
            pipe.vae.enable_tiling()
            pipe.vae.tile_sample_min_size = options.tile_size
            pipe.vae.tile_latent_min_size = options.tile_size // 8
            ctx.note(f"vae_tiling: tiled VAE decoding, {options.tile_size} px tiles")
        if options.slicing:
            pipe.vae.enable_slicing()
            ctx.note("vae_tiling: sliced VAE decoding")


def max_abs_diff(reference: Sample, candidate: Sample) -> float:
    return float(np.abs(reference.image - candidate.image).max())


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [VaeTilingBackend()]


def _tiny_square(device: Any, dtype: Any) -> Any:
    return fluxopt.load_model("tiny", device=str(device.type), dtype=str(dtype).removeprefix("torch."))


@hookimpl
def fluxopt_models() -> list[ModelSpec]:
    return [ModelSpec(name="tiny-square", description="fluxopt's tiny pipeline at 32x32, 2 steps",
                      defaults=GenerationDefaults(steps=2, guidance_scale=3.5, height=32, width=32,
                                                  max_sequence_length=64),
                      factory=_tiny_square, trained=False)]


@hookimpl
def fluxopt_metrics() -> list[Metric]:
    return [Metric("max_abs_diff", max_abs_diff, higher_is_better=False,
                   description="largest per-pixel difference to the baseline image (0 = identical)")]


@hookimpl
def fluxopt_stack_finished(result: StackRecord, output_dir: str) -> None:
    with open(Path(output_dir) / "example-events.csv", "a") as handle:
        handle.write(f"{result.stack},{result.status},{result.speedup}\n")
