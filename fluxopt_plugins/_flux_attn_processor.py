"""diffusers' ``FluxAttnProcessor`` (0.42.1) with its attention step left to a subclass: the same
q, k, v projections (fused or not), the text stream of a joint block, the output layers; in
between, the subclass's :meth:`FluxAttnProcessorBase.attend`. The backends that change how FLUX's
attention is computed (``fp8_attention``; ``attention`` with ``fused_qk``) swap the processors for
subclasses, so everything around the attention stays diffusers' arithmetic (their tests check each
against diffusers' processor), and the swap is undone by the stack's pipeline snapshot.

Also the helpers those backends share: which modules are FLUX attentions, and whether their q and k
norms can go through the fused RMSNorm + rotary kernels (:mod:`fluxopt_plugins._rms_norm_rope_fp8`).
"""

from __future__ import annotations

from typing import Any

import torch

Streams = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class FluxAttnProcessorBase:
    """A FLUX attention processor whose attention step is :meth:`attend`."""

    # set by diffusers' ``set_attention_backend`` / context parallelism, read by ``dispatch_attention_fn``
    _attention_backend = None
    _parallel_config = None

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: Streams | None,
               rotary: tuple[torch.Tensor, torch.Tensor] | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The attention output, (batch, tokens, heads, head_dim), from q, k, v as projected (not yet
        normed or rotated), ``streams`` the text stream's (q, k, v) of a joint block (its tokens come
        first in the output), ``rotary`` the (cos, sin) tables over all tokens."""
        raise NotImplementedError

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        streams = None
        if attn.added_kv_proj_dim is not None:
            streams = tuple(x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
        hidden_states = self.attend(attn, query, key, value, streams, image_rotary_emb, attention_mask)
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def normed_rotated(attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: Streams | None,
                   rotary: tuple[torch.Tensor, torch.Tensor] | None) -> Streams:
    """q, k, v as diffusers' processor hands them to the attention kernel: q and k normed (the text
    stream's with its own norms, put first), then rotated."""
    from diffusers.models.embeddings import apply_rotary_emb

    query, key = attn.norm_q(query), attn.norm_k(key)
    if streams is not None:
        text_q, text_k, text_v = streams
        query = torch.cat([attn.norm_added_q(text_q), query], dim=1)
        key = torch.cat([attn.norm_added_k(text_k), key], dim=1)
        value = torch.cat([text_v, value], dim=1)
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    return query, key, value


def qk_segments(attn: Any, query: torch.Tensor, key: torch.Tensor, streams: Streams | None
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, float]]:
    """For q, then k: (image stream, its norm's weight, text stream or None, its norm's weight or
    None, epsilon): the arguments the fused RMSNorm + rotary ops take besides the rotary tables."""
    text_q, text_k = (streams[0], streams[1]) if streams is not None else (None, None)
    segments = []
    for x, norm, text, text_norm in ((query, attn.norm_q, text_q, "norm_added_q"), (key, attn.norm_k, text_k, "norm_added_k")):
        weight, eps = norm_weight_and_eps(norm, x)
        text_weight = norm_weight_and_eps(getattr(attn, text_norm), x)[0] if text is not None else None
        segments.append((x, weight, text, text_weight, eps))
    return segments


def norm_weight_and_eps(norm: torch.nn.RMSNorm, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """An RMSNorm's weight (ones where it has none) and its epsilon as torch applies it to ``x``."""
    weight = norm.weight if norm.weight is not None else torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return weight, norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps


def fusable_qk(attn: Any) -> bool:
    """Whether q and k of ``attn`` can take the fused RMSNorm + rotary ops: every norm on them an RMSNorm, one epsilon."""
    names = ["norm_q", "norm_k"] + (["norm_added_q", "norm_added_k"] if attn.added_kv_proj_dim is not None else [])
    norms = [getattr(attn, name, None) for name in names]
    return all(isinstance(n, torch.nn.RMSNorm) for n in norms) and len({n.eps for n in norms}) == 1


def flux_attention_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every attention module of a FLUX transformer (those holding a ``FluxAttnProcessor``)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, FluxAttention)]


def foreign_processors(modules: list[tuple[str, torch.nn.Module]]) -> list[str]:
    """The class names of processors in ``modules`` other than diffusers' own ``FluxAttnProcessor``:
    a backend that swaps processors must not silently replace another library's."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    return sorted({type(m.processor).__name__ for _, m in modules if type(m.processor) is not FluxAttnProcessor})
