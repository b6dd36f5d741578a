"""Backend ``attention``: pick the attention kernel through diffusers' attention dispatcher
(``transformer.set_attention_backend(kernel)``, diffusers.models.attention_dispatch).

Not purely per-module: besides setting each attention processor's ``_attention_backend``,
diffusers also sets the process-wide active backend (``_AttentionBackendRegistry``), which every
later-loaded model whose processors have no backend of their own would use. The previous
active backend is restored through the stack's exit stack so it cannot leak into the next
stack. Kernels that quantize (SageAttention's int8 QK / fp8 PV) are lossy; the others are
exact attention up to float noise. diffusers 0.42.1 has no plain ``aiter`` kernel: AMD's
kernel is ``aiter_fa2_hub`` (downloaded from the Hub by the ``kernels`` package).

``fused_qk`` computes q's and k's RMSNorm and rotary embedding in one Triton kernel per tensor
(``fluxopt::rms_norm_rope``, the 16-bit twin of ``fp8_attention``'s prologue) before the chosen
kernel: Inductor fuses those steps into a reduction that ran at a fraction of the memory bandwidth
(about 130 us for q and k of a single block on the H200, against some 30 us to read and write
them). It keeps the arithmetic in fp32 with one rounding at the end, as Inductor does, so the stack
stays lossless. It swaps FLUX's attention processors for ones that call the op and then the
dispatcher with the same kernel (the swap is undone by the stack's pipeline snapshot).

``kernel=auto`` measures instead of guessing: every lossless kernel this machine can run is
timed at the model's own attention shape (batch x image+text tokens x heads x head dim, in the
run's dtype) and checked against SDPA's math kernel; the fastest one within ``max_rel_error``
is used. Every kernel's time, TFLOP/s, error or failure goes into ``stats.attention_benchmark``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl
from fluxopt_plugins._flux_attn_processor import (FluxAttnProcessorBase, Streams, flux_attention_modules,
                                                  foreign_processors, fusable_qk, normed_rotated, qk_segments)


FLASH = Package("flash_attn", "pip install flash-attn --no-build-isolation")
FLASH3 = Package("flash_attn_interface", "build FlashAttention-3 (hopper/) from github.com/Dao-AILab/flash-attention")
SAGE = Package("sageattention", "pip install sageattention")
XFORMERS = Package("xformers", "pip install xformers")
KERNELS = Package("kernels", "pip install 'kernels>=0.12' (the kernel is downloaded from the Hugging Face Hub)")

# kernel -> (requirements, lossless)
KERNELS_TABLE: dict[str, tuple[Requirements, bool]] = {
    "native": (Requirements(), True),
    "_native_math": (Requirements(), True),
    "_native_efficient": (Requirements(gpu=True), True),
    "_native_flash": (Requirements(gpu=True), True),
    "_native_cudnn": (Requirements(nvidia=True), True),
    "flex": (Requirements(gpu=True), True),
    "flash": (Requirements(gpu=True, packages=(FLASH,)), True),
    "flash_varlen": (Requirements(gpu=True, packages=(FLASH,)), True),
    "_flash_3": (Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(FLASH3,)), True),
    "_flash_varlen_3": (Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(FLASH3,)), True),
    "flash_hub": (Requirements(nvidia=True, packages=(KERNELS,)), True),
    "flash_varlen_hub": (Requirements(nvidia=True, packages=(KERNELS,)), True),
    "_flash_3_hub": (Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(KERNELS,)), True),
    "_flash_3_varlen_hub": (Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(KERNELS,)), True),
    "flash_4_hub": (Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(KERNELS,)), True),
    "aiter_fa2_hub": (Requirements(rocm=True, packages=(KERNELS,)), True),
    "xformers": (Requirements(gpu=True, packages=(XFORMERS,)), True),
    "sage": (Requirements(nvidia=True, packages=(SAGE,)), False),
    "sage_varlen": (Requirements(nvidia=True, packages=(SAGE,)), False),
    "_sage_qk_int8_pv_fp16_cuda": (Requirements(nvidia=True, min_compute_capability=(8, 0), packages=(SAGE,)), False),
    "_sage_qk_int8_pv_fp16_triton": (Requirements(nvidia=True, packages=(SAGE,)), False),
    "_sage_qk_int8_pv_fp8_cuda": (Requirements(nvidia=True, min_compute_capability=(8, 9), packages=(SAGE,)), False),
    "_sage_qk_int8_pv_fp8_cuda_sm90": (Requirements(nvidia=True, min_compute_capability=(9, 0), packages=(SAGE,)), False),
    "sage_hub": (Requirements(nvidia=True, packages=(KERNELS,)), False),
    "sage_blackwell_hub": (Requirements(nvidia=True, min_compute_capability=(10, 0), packages=(KERNELS,)), False),
}


AUTO = "auto"
REFERENCE = "_native_math"  # SDPA's math kernel: what every other kernel is checked against


@dataclass
class AttentionOptions:
    kernel: str = "_native_cudnn"  # a diffusers AttentionBackendName value (see KERNELS_TABLE), or auto
    max_rel_error: float = 2e-2  # auto: largest relative L2 error against the math kernel (bf16 noise ~4e-3)
    iterations: int = 10  # auto: timed calls per kernel (after one warm-up call)
    # q and k normed and rotated in one kernel (fluxopt::rms_norm_rope) before the attention kernel
    fused_qk: bool = False


class FusedQKFluxAttnProcessor(FluxAttnProcessorBase):
    """diffusers' ``FluxAttnProcessor`` (0.42.1) with q's and k's norms and rotary embedding in
    :func:`rms_norm_rope`, then the dispatcher with the processor's attention backend."""

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, streams: Streams | None,
               rotary: tuple[torch.Tensor, torch.Tensor] | None, attention_mask: torch.Tensor | None) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        from fluxopt_plugins._rms_norm_rope_fp8 import rms_norm_rope

        if rotary is None:
            query, key, value = normed_rotated(attn, query, key, value, streams, rotary)
        else:
            query, key = (rms_norm_rope(x, weight, text, text_weight, *rotary, eps)
                          for x, weight, text, text_weight, eps in qk_segments(attn, query, key, streams))
            if streams is not None:
                value = torch.cat([streams[2], value], dim=1)
        return dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                     parallel_config=self._parallel_config)


Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def attention_flops(batch: int, tokens: int, heads: int, head_dim: int) -> float:
    """QK^T and PV: two matmuls of 2 x tokens^2 x head_dim multiply-adds per head."""
    return 4.0 * batch * heads * tokens * tokens * head_dim


def _time_ms(fn: Callable[[], Any], iterations: int, device: torch.device) -> float:
    """Median milliseconds of one call, after one warm-up call."""
    fn()
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)[len(times) // 2]


def benchmark_kernels(kernels: Mapping[str, Kernel], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      reference: torch.Tensor, iterations: int, max_rel_error: float) -> dict[str, dict[str, Any]]:
    """Each kernel's median time, TFLOP/s and relative L2 error against ``reference`` on
    ``(batch, tokens, heads, head_dim)`` inputs; a kernel that raises is recorded with its error."""
    batch, tokens, heads, head_dim = q.shape
    flops = attention_flops(batch, tokens, heads, head_dim)
    results: dict[str, dict[str, Any]] = {}
    for name, kernel in kernels.items():
        try:
            with torch.no_grad():
                out = kernel(q, k, v)
                err = float((out.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-12))
                ms = _time_ms(lambda: kernel(q, k, v), iterations, q.device) if err <= max_rel_error else None
        except Exception as exc:  # noqa: BLE001 - a kernel that cannot run this shape is a result, not a crash
            results[name] = {"correct": False, "error": f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"}
            continue
        results[name] = {"correct": err <= max_rel_error, "rel_error": err, "ms": ms,
                         "tflops": flops / (ms * 1e9) if ms else None}
    return results


def fastest_correct(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    timed = {name: r["ms"] for name, r in results.items() if r.get("correct") and r.get("ms") is not None}
    return min(timed, key=timed.__getitem__) if timed else None


def _dispatch(kernel: str) -> Kernel:
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return lambda q, k, v: dispatch_attention_fn(q, k, v, backend=kernel)


class AttentionBackend(Backend):
    name = "attention"
    description = "attention kernel through diffusers' dispatcher (cuDNN, flash, FA3, sage, flex, aiter...)"
    options_class = AttentionOptions
    stage = Stage.ATTENTION

    def validate_options(self, options: AttentionOptions) -> None:
        if options.kernel != AUTO and options.kernel not in KERNELS_TABLE:
            raise ConfigError(f"backend.attention.kernel={options.kernel!r} is not one of "
                              f"{AUTO}, {', '.join(KERNELS_TABLE)}")
        if not 0 < options.max_rel_error < 1:
            raise ConfigError(f"backend.attention.max_rel_error={options.max_rel_error} must be between 0 and 1")
        if options.iterations < 1:
            raise ConfigError(f"backend.attention.iterations={options.iterations} must be at least 1")

    def unmet_requirement(self, options: AttentionOptions, device: Any) -> str | None:
        entry = KERNELS_TABLE.get(options.kernel)
        return entry[0].unmet(device) if entry else None

    def incompatibility(self, options: AttentionOptions, others: Sequence[Any]) -> str | None:
        if options.fused_qk:
            for other in others:
                if other.name in ("aoti", "trt_fp8"):
                    return (f"fused_qk=true calls a Python custom op that {other.name}'s compiled engine cannot "
                            "hold; use backend.attention.fused_qk=false")
        return None

    def is_lossless(self, options: AttentionOptions) -> bool:
        if options.kernel == AUTO:  # picks among lossless kernels only
            return True
        entry = KERNELS_TABLE.get(options.kernel)
        return bool(entry and entry[1])

    def choose_kernel(self, pipe: Any, options: AttentionOptions, ctx: StackContext) -> str:
        """kernel=auto: the fastest lossless kernel that runs here and matches the math kernel."""
        config = pipe.transformer.config
        shapes = ctx.shapes
        device = next(pipe.transformer.parameters()).device
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(shapes.batch_size, shapes.latent_tokens + shapes.max_sequence_length,
                               config.num_attention_heads, config.attention_head_dim, generator=gen
                               ).to(device, ctx.dtype) for _ in range(3))
        candidates = [name for name, (req, lossless) in KERNELS_TABLE.items()
                      if lossless and req.unmet(ctx.device) is None]
        with torch.no_grad():
            reference = _dispatch(REFERENCE)(q.float(), k.float(), v.float())
        results = benchmark_kernels({name: _dispatch(name) for name in candidates}, q, k, v, reference,
                                    options.iterations, options.max_rel_error)
        ctx.stats["attention_benchmark"] = {"shape": list(q.shape), "dtype": str(ctx.dtype), "kernels": results}
        chosen = fastest_correct(results)
        if chosen is None:
            raise ConfigError("backend.attention.kernel=auto: no attention kernel matched the math kernel within "
                              f"max_rel_error={options.max_rel_error} ({results})")
        return chosen

    def apply(self, pipe: Any, options: AttentionOptions, ctx: StackContext) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        kernel = self.choose_kernel(pipe, options, ctx) if options.kernel == AUTO else options.kernel
        previous = _AttentionBackendRegistry._active_backend
        ctx.callback("attention: active attention backend", lambda: _AttentionBackendRegistry.set_active_backend(previous))
        pipe.transformer.set_attention_backend(kernel)
        ctx.note(f"attention: the transformer's attention backend set to {kernel}")
        ctx.stats["attention_kernel"] = kernel
        if options.fused_qk:
            self.fuse_qk(pipe)
            ctx.note("attention: FLUX's attention processors swapped for ones with q and k normed and rotated in "
                     "one kernel (fluxopt::rms_norm_rope)")

    @staticmethod
    def fuse_qk(pipe: Any) -> None:
        """Every FLUX attention processor replaced by a :class:`FusedQKFluxAttnProcessor` with the
        attention backend and parallel config diffusers set on the one it replaces."""
        modules = flux_attention_modules(pipe.transformer)
        others = foreign_processors(modules)
        unfusable = [name for name, m in modules if not fusable_qk(m)]
        if not modules or others or unfusable:
            raise ConfigError("backend.attention.fused_qk=true replaces FLUX's own attention processors, whose q and k "
                              "norms are RMSNorms; this transformer has "
                              + (f"other processors ({', '.join(others)})" if others else
                                 f"other norms in {', '.join(unfusable)}" if unfusable else "no FLUX attention"))
        for _, module in modules:
            processor = FusedQKFluxAttnProcessor()
            processor._attention_backend = module.processor._attention_backend
            processor._parallel_config = module.processor._parallel_config
            module.set_processor(processor)


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [AttentionBackend()]
