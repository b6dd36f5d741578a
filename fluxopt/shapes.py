"""The generation settings a backend may specialise on (export, engines, calibration, profiles):
the shapes, representative transformer inputs at those shapes, and the dtypes fluxopt accepts."""

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


def transformer_inputs(transformer: torch.nn.Module, shapes: Shapes, device: torch.device,
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Representative transformer inputs, as FluxPipeline builds them at these shapes."""
    config = transformer.config
    batch, tokens, seq = shapes.batch_size, shapes.latent_tokens, shapes.max_sequence_length
    gen = torch.Generator().manual_seed(0)

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    inputs = {
        "hidden_states": rand(batch, tokens, config.in_channels),
        "encoder_hidden_states": rand(batch, seq, config.joint_attention_dim),
        "pooled_projections": rand(batch, config.pooled_projection_dim),
        "timestep": torch.full((batch,), 0.5, device=device, dtype=dtype),
        "img_ids": rand(tokens, 3),
        "txt_ids": torch.zeros(seq, 3, device=device, dtype=dtype),
    }
    if config.guidance_embeds:  # the pipeline passes guidance in float32 whatever the model dtype
        inputs["guidance"] = torch.full((batch,), shapes.guidance_scale, device=device, dtype=torch.float32)
    return inputs
