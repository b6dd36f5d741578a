"""Example fluxopt plugin: decode latents in tiles (and batch slices) to bound VAE memory.

Tiling trades a little speed and exactness at tile seams for a much smaller VAE activation
peak at high resolutions; it is declared lossy for that reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxopt.backend import Backend, Stage, StackContext
from fluxopt.errors import ConfigError
from fluxopt.hookspecs import hookimpl


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
            raise ConfigError("backend.vae_tiling.tile_size must be a multiple of 8, at least 64")

    def apply(self, pipe: Any, options: VaeTilingOptions, ctx: StackContext) -> None:
        if options.tiling:
            pipe.vae.enable_tiling()
            pipe.vae.tile_sample_min_size = options.tile_size
            pipe.vae.tile_latent_min_size = options.tile_size // 8
        if options.slicing:
            pipe.vae.enable_slicing()


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [VaeTilingBackend()]


@hookimpl
def fluxopt_config_path() -> str:
    return "pkg://fluxopt_example.conf"
