"""Model ``flux-mini``: a small FluxPipeline trained by fluxopt (fluxopt/zoo/flux_mini), shipped as
bf16 safetensors inside the package and loaded offline with ``FluxPipeline.from_pretrained``.

It is a *trained* model (images follow their captions, consecutive denoising steps change
little), so caching and fidelity numbers on it mean something, unlike ``tiny`` or
``flux-dev-random``; and it runs on a CPU. See docs/flux-mini.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fluxopt import GenerationDefaults, ModelLoadError, ModelSpec, file_sha256, hookimpl, verify_checksums

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CHECKSUMS = "checksums.json"  # sha256 of every weight file, written when the weights are shipped



def _load_shipped(device: torch.device, dtype: torch.dtype) -> Any:
    from diffusers import FluxPipeline

    checksums = json.loads((WEIGHTS_DIR / CHECKSUMS).read_text()) if (WEIGHTS_DIR / CHECKSUMS).is_file() else None
    if not checksums:
        raise ModelLoadError(f"flux-mini weights are incomplete in {WEIGHTS_DIR} (no {CHECKSUMS}: an installation "
                             "without package data?); reinstall fluxopt or pass model.path=<dir>")
    verify_checksums(WEIGHTS_DIR, checksums, "flux-mini weights")
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


def write_checksums() -> None:
    """Record the sha256 of every shipped weight file (scripts/flux_mini.sh ship runs this)."""
    sums = {p.relative_to(WEIGHTS_DIR).as_posix(): file_sha256(p)
            for p in sorted(WEIGHTS_DIR.rglob("*")) if p.is_file() and p.name != CHECKSUMS}
    (WEIGHTS_DIR / CHECKSUMS).write_text(json.dumps(sums, indent=2, sort_keys=True) + "\n")


@hookimpl
def fluxopt_models() -> list[ModelSpec]:
    return [FLUX_MINI]
