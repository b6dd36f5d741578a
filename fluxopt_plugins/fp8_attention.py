"""Backend ``fp8_attention``: FLUX's attention with q, k, v and the softmax probabilities in float8.

On an H100 attention is about a quarter of an fp8-quantized step (bf16 cuDNN attention ran at
566 TFLOP/s, the fp8 matmuls at ~1300). This backend swaps every FLUX attention processor for
one that quantizes q, k and v per tensor (after their norms and rotary embedding) and calls an
fp8 kernel (:mod:`fluxopt_plugins._fp8_attention_kernels`): cuDNN's, FlashAttention-3's (Hopper),
or a plain-torch reference with the same roundings that runs anywhere (slowly) so a CPU run can
judge the image. Lossy.

Scales: measuring each call's amax costs a pass over q, k and v before the cast (about 2 ms of
an H100 step once Inductor has fused the rest). ``scales=static`` needs none: q and k come out of
an RMSNorm, so no element can exceed sqrt(head_dim) x the norm's largest weight
(``x_i^2 <= sum x^2 = head_dim x rms^2``), and the rotary embedding rotates pairs, which keeps
that bound; v's scale is ``v_margin`` x the largest magnitude seen per layer while calibrating
on prompts of its own, saturating beyond. Per call, static and dynamic scales err alike; over a
whole generation static ones cost more on some prompts (flux-mini: worst PSNR 36 against 45,
docs/results/2026-11-26-h100-issue15o.md), so ``scales=dynamic`` is there for when that matters.

Processors rather than diffusers' attention dispatcher: the dispatcher's backends are a closed
enum, and the kernel needs the float8 scales, which belong to the processor. The processor
swap is undone by the stack's pipeline snapshot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl
from fluxopt_plugins._flux_attn_processor import (FluxAttnProcessorBase, Streams, flux_attention_modules,
                                                  foreign_processors, fusable_qk, normed_rotated, qk_segments)
from fluxopt_plugins._calibration import (CALIBRATION_PROMPTS, cached_calibration, calibration_key, run_calibration,
                                          validate_prompts)

CUDNN_FRONTEND = Package("cudnn", "pip install 'fluxopt[cudnn]' (nvidia-cudnn-frontend)")
FA3_FWD = Package("fa3_fwd_interface", "pip install 'fluxopt[fa3]' (fa3-fwd, FlashAttention-3's forward kernels)")
KERNEL_REQUIREMENTS = {
    "cudnn": Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(CUDNN_FRONTEND,)),
    # FlashAttention-3's kernels are built for Hopper (sm90a) alone
    "fa3": Requirements(nvidia=True, min_compute_capability=(9, 0), max_compute_capability=(9, 0),
                        packages=(FA3_FWD,)),
    "reference": Requirements(),
}


SCALES = ("static", "dynamic")


@dataclass
class Fp8AttentionOptions:
    # cudnn (fused, Hopper and newer) | fa3 (FlashAttention-3, Hopper) | reference (same roundings in
    # plain torch, any device)
    kernel: str = "cudnn"
    scales: str = "static"  # static (q, k bounded by their norms, v calibrated) | dynamic (each call's amax)
    calibration_prompts: list[str] = field(default_factory=lambda: list(CALIBRATION_PROMPTS))  # scales=static
    # scales=static: v's scale covers this many times the largest |v| calibration saw, so prompts
    # with larger values are not clipped (headroom is nearly free: float8's relative precision is the
    # same over its normal range; only values below 1/448 of the range reach its subnormals)
    v_margin: float = 4.0
    calibration_seed: int = 1234  # generator seed of the calibration generations
    # scales=static: q and k's RMSNorm, rotary embedding and float8 cast in one Triton kernel
    # (fluxopt::rms_norm_rope_fp8; plain torch off CUDA) instead of the kernel Inductor fuses them into
    fused_qk: bool = True


class Fp8FluxAttnProcessor(FluxAttnProcessorBase):
    """diffusers' ``FluxAttnProcessor`` (0.42.1) with the attention itself in float8: the same
    projections, norms, rotary embedding and output layers (tests check it against diffusers'
    processor), then :func:`attention_fp8` instead of the dispatcher."""

    def __init__(self, kernel: str, amax: tuple[torch.Tensor | None, ...] = (None, None, None),
                 fused_qk: bool = False):
        self.kernel = kernel
        self.amax = amax  # fixed largest magnitudes of q, k, v (None: each call's own)
        # q and k normed, rotated and cast in one kernel (fluxopt::rms_norm_rope_fp8); needs their amax fixed
        self.fused_qk = fused_qk
        self.observe = False  # calibrating: record v's largest magnitude in observed_v_amax
        self.observed_v_amax: torch.Tensor | None = None

    def _observe(self, value: torch.Tensor) -> None:
        if self.observe:
            seen = value.detach().abs().amax().float()
            self.observed_v_amax = seen if self.observed_v_amax is None else torch.maximum(self.observed_v_amax, seen)

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: Streams | None,
               rotary: tuple[torch.Tensor, torch.Tensor] | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("fp8_attention: FLUX attention with an attention mask is not supported "
                             "(the fp8 kernels take no mask)")
        if self.fused_qk and rotary is not None:
            return self.attend_fused(attn, query, key, value, streams, rotary)
        return self.attend_fp8(*normed_rotated(attn, query, key, value, streams, rotary))

    def attend_fp8(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """fp8 attention of q, k, v as diffusers hands them to its kernel."""
        from fluxopt_plugins._fp8_attention_kernels import attention_fp8

        self._observe(value)
        return attention_fp8(query, key, value, self.kernel, self.amax)

    def attend_fused(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     streams: Streams | None, rotary: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Attention of un-normed q and k (and the text ``streams`` of a joint block, put first):
        q and k go to float8 through :func:`rms_norm_rope_fp8` with their fixed scales."""
        from fluxopt_plugins._fp8_attention_kernels import attention_fp8_qk, descale
        from fluxopt_plugins._rms_norm_rope_fp8 import rms_norm_rope_fp8

        quantized = []
        for (x, weight, text, text_weight, eps), amax in zip(qk_segments(attn, query, key, streams), self.amax[:2]):
            quantized += [rms_norm_rope_fp8(x, weight, text, text_weight, *rotary, amax, eps), descale(amax)]
        if streams is not None:
            value = torch.cat([streams[2], value], dim=1)
        self._observe(value)
        return attention_fp8_qk(*quantized, value, self.kernel, self.amax[2], query.dtype)


def rms_norm_bound(attn: Any, *norm_names: str) -> torch.Tensor | None:
    """The largest magnitude the outputs of ``attn``'s RMSNorms ``norm_names`` can have (also after
    the rotary embedding): sqrt(head_dim) x the largest norm weight; None if one is not an RMSNorm."""
    norms = [getattr(attn, name) for name in norm_names]
    if not all(isinstance(n, torch.nn.RMSNorm) for n in norms):
        return None
    weights = [n.weight.detach().abs().max().float() for n in norms if n.weight is not None]
    largest = torch.stack(weights).max() if weights else torch.tensor(1.0)
    return math.sqrt(attn.head_dim) * largest


def qk_bounds(attn: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Bounds of q and k of one FLUX attention; a joint block's q and k also hold the text
    stream's, normed by ``norm_added_q`` / ``norm_added_k``."""
    joint = attn.added_kv_proj_dim is not None
    return (rms_norm_bound(attn, "norm_q", *(["norm_added_q"] if joint else [])),
            rms_norm_bound(attn, "norm_k", *(["norm_added_k"] if joint else [])))


class Fp8AttentionBackend(Backend):
    name = "fp8_attention"
    description = "FLUX attention in float8 (per-tensor q/k/v scales, fp8 probabilities): cuDNN's fused kernel"
    options_class = Fp8AttentionOptions
    stage = Stage.ATTENTION
    lossless = False
    conflicts = {
        "attention": "both choose the kernel of FLUX's attention",
        "context_parallel": "the fp8 processors do not split attention across GPUs",
        "aoti": "an AOTInductor package cannot call the fp8 kernels (Python custom ops)",
        "trt_fp8": "a TensorRT engine replaces the transformer, and its attention with it",
    }

    def validate_options(self, options: Fp8AttentionOptions) -> None:
        if options.kernel not in KERNEL_REQUIREMENTS:
            raise ConfigError(f"backend.fp8_attention.kernel={options.kernel!r} is not one of "
                              f"{', '.join(KERNEL_REQUIREMENTS)}")
        if options.scales not in SCALES:
            raise ConfigError(f"backend.fp8_attention.scales={options.scales!r} is not one of {', '.join(SCALES)}")
        if not options.v_margin >= 1:
            raise ConfigError(f"backend.fp8_attention.v_margin={options.v_margin} must be at least 1")
        problem = validate_prompts("backend.fp8_attention.calibration_prompts", options.calibration_prompts)
        if options.scales == "static" and problem:
            raise ConfigError(problem)

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
        modules = flux_attention_modules(pipe.transformer)
        others = foreign_processors(modules)
        if not modules or others:
            raise ConfigError("fp8_attention replaces FLUX's own attention processors; this transformer has "
                              + (f"other processors ({', '.join(others)})" if others else "no FLUX attention"))
        processors = []
        for _, module in modules:
            q_bound, k_bound = qk_bounds(module) if options.scales == "static" else (None, None)
            fused = options.fused_qk and q_bound is not None and k_bound is not None and fusable_qk(module)
            processors.append(Fp8FluxAttnProcessor(options.kernel, (q_bound, k_bound, None), fused_qk=fused))
            module.set_processor(processors[-1])
        stats = ctx.stats["fp8_attention"] = {"kernel": options.kernel, "scales": options.scales, "layers": len(modules),
                                              "fused_qk_layers": sum(p.fused_qk for p in processors)}
        ctx.stats.setdefault("compute_precision", {})["attention"] = "fp8"
        if options.scales == "static":
            stats.update(self.calibrate(pipe, processors, [name for name, _ in modules], options, ctx))
        if options.kernel == "cudnn":
            from fluxopt_plugins._fp8_attention_kernels import cudnn_frontend_version, release_cudnn_graphs

            ctx.callback("fp8_attention: free the cuDNN graphs, their buffers and handles", release_cudnn_graphs)
            frontend, library = cudnn_frontend_version()
            ctx.stats["fp8_attention"].update(cudnn_frontend=frontend, cudnn=library)


    @staticmethod
    def calibrate(pipe: Any, processors: list[Fp8FluxAttnProcessor], names: list[str], options: Fp8AttentionOptions,
                  ctx: StackContext) -> dict[str, Any]:
        """Fix every layer's v scale at ``v_margin`` x the largest |v| its calibration generations
        produced (measured once per transformer, prompts and seed: later builds load it from the cache)."""
        def observe() -> dict[str, torch.Tensor]:
            for processor in processors:
                processor.observe = True
            with ctx.timed("calibrate"):
                run_calibration(pipe, options.calibration_prompts, options.calibration_seed, ctx.shapes)
            if any(p.observed_v_amax is None for p in processors):
                raise ConfigError("fp8_attention: an attention layer never ran during calibration, "
                                  "so its v scale is unknown")
            found = {name: p.observed_v_amax for name, p in zip(names, processors)}
            for processor in processors:
                processor.observe, processor.observed_v_amax = False, None
            return found

        key = calibration_key(pipe, ctx, "fp8_attention", options.calibration_prompts, options.calibration_seed)
        v_amax, cached = cached_calibration(ctx, "fp8_attention", key, names, observe)
        device = next(pipe.transformer.parameters()).device
        for name, processor in zip(names, processors):
            processor.amax = (*processor.amax[:2], v_amax[name].to(device) * options.v_margin)
        bounds = {name: [float(p.amax[i]) for p in processors if p.amax[i] is not None]
                  for i, name in enumerate(("q", "k", "v"))}
        return {"amax_range": {name: [min(v), max(v)] for name, v in bounds.items() if v},
                "calibration": "cached" if cached else "measured"}


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [Fp8AttentionBackend()]
