"""para-attn's first-block cache on diffusers 0.42's FLUX transformer (not a plugin: the
leading underscore keeps it out of plugin discovery).

para-attn 0.3.38's FLUX adapter (``apply_cache_on_pipe``) was written when FLUX's single blocks
took one concatenated text+image hidden state; diffusers 0.42's
``FluxSingleTransformerBlock.forward(hidden_states, encoder_hidden_states, temb, ...)`` takes both
streams and returns ``(encoder_hidden_states, hidden_states)``, so the adapter fails with a missing
argument. Here para-attn's cache itself is kept (its context, residual buffers and threshold test,
``para_attn.first_block_cache.utils``) and only the remaining blocks are called as diffusers 0.42
calls them. It is also undoable: para-attn patches ``FluxPipeline.__call__`` on the class to open
its cache context and never restores it; here the transformer's own forward opens a fresh context
at each new generation (the scheduler's timesteps are set anew), installed through the stack's
context.
"""

from __future__ import annotations

import unittest.mock
from typing import Any

import torch

from fluxopt import StackContext


def cached_blocks_class() -> type:
    """para-attn's CachedTransformerBlocks calling diffusers 0.42's FLUX blocks."""
    from para_attn.first_block_cache.utils import CachedTransformerBlocks

    class FluxCachedBlocks(CachedTransformerBlocks):
        def call_remaining_transformer_blocks(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                                              *args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
            original_hidden, original_encoder = hidden_states, encoder_hidden_states
            for block in [*self.transformer_blocks[1:], *self.single_transformer_blocks]:
                encoder_hidden_states, hidden_states = block(hidden_states, encoder_hidden_states, *args, **kwargs)
            return (hidden_states, encoder_hidden_states, hidden_states - original_hidden,
                    encoder_hidden_states - original_encoder)

    return FluxCachedBlocks


def apply_first_block_cache(pipe: Any, residual_diff_threshold: float, ctx: StackContext) -> None:
    """Run ``pipe.transformer``'s blocks through para-attn's first-block cache until the stack closes."""
    from para_attn.first_block_cache import utils

    transformer, scheduler = pipe.transformer, pipe.scheduler
    cached = torch.nn.ModuleList([cached_blocks_class()(
        transformer.transformer_blocks, transformer.single_transformer_blocks, transformer=transformer,
        return_hidden_states_first=False)])
    no_blocks = torch.nn.ModuleList()
    original = transformer.forward
    generation: dict[str, Any] = {"timesteps": None, "context": None}

    def forward(*args: Any, **kwargs: Any) -> Any:
        if scheduler.timesteps is not generation["timesteps"]:  # set_timesteps: a new generation
            generation["timesteps"] = scheduler.timesteps
            generation["context"] = utils.create_cache_context(residual_diff_threshold=residual_diff_threshold)
        with unittest.mock.patch.object(transformer, "transformer_blocks", cached), \
                unittest.mock.patch.object(transformer, "single_transformer_blocks", no_blocks), \
                utils.cache_context(generation["context"]):
            return original(*args, **kwargs)

    ctx.set_attr("fbcache: para-attn first-block cache", transformer, "forward", forward)
