"""The model zoo: fluxopt's built-in models, registered through ``fluxopt_models`` like a
plugin's. ``tiny`` (embedded, offline, CPU-fast), the FLUX.1 checkpoints from the Hub, and
full-size FLUX.1 shapes with random weights made on the device (``*-random``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxopt.hookspecs import hookimpl
from fluxopt.models import DEV_DEFAULTS, SCHNELL_DEFAULTS, GenerationDefaults, ModelSpec


def _build_tiny(directory: Path) -> None:
    from fluxopt.zoo.tiny import save_tiny_pipeline

    save_tiny_pipeline(directory)


def _flux_dev_random(device: torch.device, dtype: torch.dtype):
    from fluxopt.zoo.random_flux import build_random_flux

    return build_random_flux(device, dtype, guidance_embeds=True)


def _flux_schnell_random(device: torch.device, dtype: torch.dtype):
    from fluxopt.zoo.random_flux import build_random_flux

    return build_random_flux(device, dtype, guidance_embeds=False)


def _tiny_version() -> int:
    from fluxopt.zoo.tiny import TINY_FORMAT_VERSION

    return TINY_FORMAT_VERSION


BUILTIN_MODELS = (
    ModelSpec(
        name="tiny",
        description="embedded offline FluxPipeline with tiny random weights (CPU-fast, for tests and CI)",
        defaults=GenerationDefaults(steps=4, guidance_scale=3.5, height=64, width=64, max_sequence_length=128),
        local_builder=_build_tiny, local_version=_tiny_version(), trained=False),
    ModelSpec(
        name="flux-dev",
        description="black-forest-labs/FLUX.1-dev (gated; needs a Hugging Face login and download)",
        defaults=DEV_DEFAULTS, hub_id="black-forest-labs/FLUX.1-dev"),
    ModelSpec(
        name="flux-schnell",
        description="black-forest-labs/FLUX.1-schnell (timestep-distilled, 4 steps, no guidance)",
        defaults=SCHNELL_DEFAULTS, hub_id="black-forest-labs/FLUX.1-schnell"),
    ModelSpec(
        name="flux-dev-random",
        description="FLUX.1-dev shapes (19+38 blocks, 3072 wide) with random weights made on the device: "
                    "real cost per step, no download, meaningless images",
        defaults=DEV_DEFAULTS, factory=_flux_dev_random, trained=False),
    ModelSpec(
        name="flux-schnell-random",
        description="FLUX.1-schnell shapes (no guidance embedding; 4 steps, guidance 0, 256 text tokens) with "
                    "random weights made on the device",
        defaults=SCHNELL_DEFAULTS, factory=_flux_schnell_random, trained=False),
)




@hookimpl
def fluxopt_models() -> list[ModelSpec]:
    return list(BUILTIN_MODELS)
