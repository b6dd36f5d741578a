"""Backend ``fp8_attention``: FLUX's attention with q, k, v and the softmax probabilities in float8.

On an H100 attention is about a quarter of an fp8-quantized step (bf16 cuDNN attention ran at
566 TFLOP/s, the fp8 matmuls at ~1300). This backend swaps every FLUX attention processor for
one that quantizes q, k and v per tensor (after their norms and rotary embedding) and calls an
fp8 kernel (:mod:`fluxopt_plugins._fp8_attention_kernels`): cuDNN's, or a plain-torch reference
with the same roundings that runs anywhere (slowly) so a CPU run can judge the image. Lossy.

Processors rather than diffusers' attention dispatcher: the dispatcher's backends are a closed
enum, and the kernel needs the float8 scales, which belong to the processor. The processor
swap is undone by the stack's pipeline snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl

CUDNN_FRONTEND = Package("cudnn", "pip install 'fluxopt[cudnn]' (nvidia-cudnn-frontend)")
KERNEL_REQUIREMENTS = {
    "cudnn": Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(CUDNN_FRONTEND,)),
    "reference": Requirements(),
}


@dataclass
class Fp8AttentionOptions:
    kernel: str = "cudnn"  # cudnn (fused, Hopper and newer) | reference (same roundings in plain torch, any device)


class Fp8FluxAttnProcessor:
    """diffusers' ``FluxAttnProcessor`` (0.42.1) with the attention itself in float8: the same
    projections, norms, rotary embedding and output layers (tests check it against diffusers'
    processor), then :func:`attention_fp8` instead of the dispatcher."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, kernel: str):
        self.kernel = kernel

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        from fluxopt_plugins._fp8_attention_kernels import attention_fp8

        return attention_fp8(query, key, value, self.kernel)

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: torch.Tensor | None = None) -> Any:
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections

        if attention_mask is not None:
            raise ValueError("fp8_attention: FLUX attention with an attention mask is not supported "
                             "(the fp8 kernels take no mask)")
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query, key, value = (x.unflatten(-1, (-1, attn.head_dim)) for x in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            encoder_query, encoder_key, encoder_value = (
                x.unflatten(-1, (-1, attn.head_dim)) for x in (encoder_query, encoder_key, encoder_value))
            encoder_query, encoder_key = attn.norm_added_q(encoder_query), attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        hidden_states = self.attend(query, key, value).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return hidden_states
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states


def flux_attention_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every attention module of a FLUX transformer (those holding a ``FluxAttnProcessor``)."""
    from diffusers.models.transformers.transformer_flux import FluxAttention

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, FluxAttention)]


class Fp8AttentionBackend(Backend):
    name = "fp8_attention"
    description = "FLUX attention in float8 (per-tensor q/k/v scales, fp8 probabilities): cuDNN's fused kernel"
    options_class = Fp8AttentionOptions
    stage = Stage.ATTENTION
    lossless = False
    conflicts = {
        "attention": "both choose the kernel of FLUX's attention",
        "context_parallel": "the fp8 processors do not split attention across GPUs",
        "aoti": "an AOTInductor package cannot call the cuDNN kernel (a Python custom op)",
        "trt_fp8": "a TensorRT engine replaces the transformer, and its attention with it",
    }

    def validate_options(self, options: Fp8AttentionOptions) -> None:
        if options.kernel not in KERNEL_REQUIREMENTS:
            raise ConfigError(f"backend.fp8_attention.kernel={options.kernel!r} is not one of "
                              f"{', '.join(KERNEL_REQUIREMENTS)}")

    def unmet_requirement(self, options: Fp8AttentionOptions, device: Any) -> str | None:
        unmet = KERNEL_REQUIREMENTS[options.kernel].unmet(device)
        if unmet or options.kernel != "cudnn":
            return unmet
        from fluxopt_plugins._fp8_attention_kernels import MIN_CUDNN, cudnn_frontend_version

        frontend, library = cudnn_frontend_version()
        if library is None:
            return f"needs the cuDNN library loadable by nvidia-cudnn-frontend {frontend}"
        if library < MIN_CUDNN:
            return f"needs cuDNN >= {MIN_CUDNN} for fp8 attention; this machine has {library}"
        return None

    def apply(self, pipe: Any, options: Fp8AttentionOptions, ctx: StackContext) -> None:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        modules = flux_attention_modules(pipe.transformer)
        others = sorted({type(m.processor).__name__ for _, m in modules if type(m.processor) is not FluxAttnProcessor})
        if not modules or others:
            raise ConfigError("fp8_attention replaces FLUX's own attention processors; this transformer has "
                              + (f"other processors ({', '.join(others)})" if others else "no FLUX attention"))
        for _, module in modules:
            module.set_processor(Fp8FluxAttnProcessor(options.kernel))
        ctx.stats["fp8_attention"] = {"kernel": options.kernel, "layers": len(modules)}
        ctx.stats.setdefault("compute_precision", {})["attention"] = "fp8"
        if options.kernel == "cudnn":
            from fluxopt_plugins._fp8_attention_kernels import cudnn_frontend_version

            frontend, library = cudnn_frontend_version()
            ctx.stats["fp8_attention"].update(cudnn_frontend=frontend, cudnn=library)


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [Fp8AttentionBackend()]
