"""Model ``flux-mini``: a small FluxPipeline trained by fluxopt (fluxopt/flux_mini), shipped as
bf16 safetensors inside the package and loaded offline with ``FluxPipeline.from_pretrained``.

It is a *trained* model (images follow their captions, consecutive denoising steps change
little), so caching and fidelity numbers on it mean something, unlike ``tiny`` or
``flux-dev-random``; and it runs on a CPU. See docs/flux-mini.md.
"""

from __future__ import annotations

from typing import Any

import torch

from fluxopt.hookspecs import hookimpl
from fluxopt.models import GenerationDefaults, ModelSpec


def _load_shipped(device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import FluxPipeline

    from fluxopt.errors import ModelLoadError
    from fluxopt.flux_mini import WEIGHTS_DIR

    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise ModelLoadError(f"flux-mini weights are missing from {WEIGHTS_DIR} (an installation without "
                             "package data?); retrain with scripts/flux_mini.sh or pass model.path=<dir>")
    return FluxPipeline.from_pretrained(str(WEIGHTS_DIR), dtype=dtype).to(device)


FLUX_MINI = ModelSpec(
    name="flux-mini",
    description="small FluxPipeline (2+4 blocks, 256 wide, 16-channel VAE) trained by fluxopt on procedural "
                "captioned shapes at 128x128; shipped (26 MB), offline, CPU-fast, images follow captions",
    # Held-out captions: combinations the transformer never saw in training.
    defaults=GenerationDefaults(steps=28, guidance_scale=3.5, height=128, width=128, max_sequence_length=32,
                                prompts=("a small red circle at the top on a black background",
                                         "a large red circle on the right on a white background")),
    factory=_load_shipped,
    trained=True,
)


@hookimpl
def fluxopt_models() -> list[ModelSpec]:
    return [FLUX_MINI]
