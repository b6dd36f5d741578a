"""Example third-party fluxopt plugin: a backend, a metric and an event hook.

* backend ``vae_tiling``: decode latents in tiles (and batch slices) to bound VAE memory;
  lossy, since tile seams are blended;
* metric ``max_abs_diff``: the largest per-pixel difference to the baseline image (reported;
  gates the verdict only if ``fidelity.lossy.max_abs_diff`` sets a threshold);
* event hook: appends one line per finished stack to ``<run dir>/example-events.csv``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fluxopt import Backend, ConfigError, Metric, Sample, StackContext, StackRecord, Stage, hookimpl


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
        # Changes to the pipeline need no bookkeeping: the stack's snapshot undoes them on close.
        if options.tiling:
            pipe.vae.enable_tiling()
            pipe.vae.tile_sample_min_size = options.tile_size
            pipe.vae.tile_latent_min_size = options.tile_size // 8
        if options.slicing:
            pipe.vae.enable_slicing()


def max_abs_diff(reference: Sample, candidate: Sample) -> float:
    return float(np.abs(reference.image - candidate.image).max())


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [VaeTilingBackend()]


@hookimpl
def fluxopt_metrics() -> list[Metric]:
    return [Metric("max_abs_diff", max_abs_diff, higher_is_better=False,
                   description="largest per-pixel difference to the baseline image (0 = identical)")]


@hookimpl
def fluxopt_stack_finished(result: StackRecord, output_dir: str) -> None:
    with open(Path(output_dir) / "example-events.csv", "a") as handle:
        handle.write(f"{result.stack},{result.status},{result.speedup}\n")
