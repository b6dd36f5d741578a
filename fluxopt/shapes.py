"""The generation settings a backend may specialise on (export, engines, calibration), and the
dtypes fluxopt accepts by name."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Shapes:
    height: int
    width: int
    steps: int
    guidance_scale: float
    max_sequence_length: int
    batch_size: int = 1

    @property
    def latent_tokens(self) -> int:
        """Packed image tokens the FLUX transformer sees (8x VAE, 2x2 patches)."""
        return (self.height // 16) * (self.width // 16)
