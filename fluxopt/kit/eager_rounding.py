"""Eager's rounding of FLUX's scaled timestep and guidance, kept by whole-graph compilation.

FLUX multiplies the timestep and the guidance by 1000 in the model dtype, then embeds them with
sinusoids of up to 1000 radians. Eager rounds the product to bf16 (0.7 -> 700.0); a fused
Inductor kernel keeps it in fp32 (699.2), so a whole-graph compiled or exported transformer embeds
another timestep, which a deep transformer amplifies: on flux-dev-random at 1024x1024 (H100),
whole-graph compile without it scores PSNR 21.7 against eager, the same as the AOTI package
that first showed it. Inductor's ``emulate_precision_casts`` keeps every such rounding but made
the whole-graph step ~15 ms slower there; rounding only these two inputs, with integer ops
Inductor cannot fold away, is free. Regional compile never saw it: the embeddings stay eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# explicit mantissa bits of the dtypes whose rounding eager applies (float32 needs none)
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def round_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the nearest ``dtype`` value (ties to even), returned in float32, computed
    on float32's bits so that no compiler can treat it as a no-op cast pair. Only ``dtype``'s
    normal range is handled (no subnormals or overflow; timesteps and guidance x 1000 lie inside it)."""
    shift = 23 - _MANTISSA_BITS[dtype]
    bits = x.float().view(torch.int32)
    bits = bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)
    return (bits & -(1 << shift)).view(torch.float32)


class EagerRoundedTimesteps(torch.nn.Module):
    """Wraps FLUX's ``time_proj`` (diffusers ``Timesteps``): its input is rounded to the dtype it
    nominally has, as eager computes it, before the sinusoidal projection."""

    def __init__(self, time_proj: torch.nn.Module):
        super().__init__()
        self.time_proj = time_proj

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        if timesteps.dtype in _MANTISSA_BITS:
            timesteps = round_like(timesteps, timesteps.dtype)
        return self.time_proj(timesteps)


def keep_eager_timestep_rounding(transformer: torch.nn.Module) -> Callable[[], None] | None:
    """Install ``EagerRoundedTimesteps`` on a FLUX transformer and return the function that puts
    the original ``time_proj`` back (register it on the stack's context); None, changing nothing,
    when the transformer has no ``time_text_embed.time_proj`` or already has the wrapper."""
    embed = getattr(transformer, "time_text_embed", None)
    time_proj = getattr(embed, "time_proj", None)
    if time_proj is None or isinstance(time_proj, EagerRoundedTimesteps):
        return None
    embed.time_proj = EagerRoundedTimesteps(time_proj)
    return lambda: setattr(embed, "time_proj", time_proj)
