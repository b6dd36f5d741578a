"""Backend ``attention``: pick the attention kernel through diffusers' attention dispatcher
(``transformer.set_attention_backend(kernel)``, diffusers.models.attention_dispatch).

Not purely per-module: besides setting each attention processor's ``_attention_backend``,
diffusers also sets the process-wide active backend (``_AttentionBackendRegistry``), which every
later-loaded model whose processors have no backend of their own would use. The previous
active backend is restored through the stack's exit stack so it cannot leak into the next
stack. Kernels that quantize (SageAttention's int8 QK / fp8 PV) are lossy; the others are
exact attention up to float noise. diffusers 0.42.1 has no plain ``aiter`` kernel: AMD's
kernel is ``aiter_fa2_hub`` (downloaded from the Hub by the ``kernels`` package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl


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


@dataclass
class AttentionOptions:
    kernel: str = "_native_cudnn"  # a diffusers AttentionBackendName value (see KERNELS_TABLE)


class AttentionBackend(Backend):
    name = "attention"
    description = "attention kernel through diffusers' dispatcher (cuDNN, flash, FA3, sage, flex, aiter...)"
    options_class = AttentionOptions
    stage = Stage.ATTENTION

    def validate_options(self, options: AttentionOptions) -> None:
        if options.kernel not in KERNELS_TABLE:
            raise ConfigError(f"backend.attention.kernel={options.kernel!r} is not one of "
                              f"{', '.join(KERNELS_TABLE)}")

    def unmet_requirement(self, options: AttentionOptions, device: Any) -> str | None:
        entry = KERNELS_TABLE.get(options.kernel)
        return entry[0].unmet(device) if entry else None

    def is_lossless(self, options: AttentionOptions) -> bool:
        entry = KERNELS_TABLE.get(options.kernel)
        return bool(entry and entry[1])

    def apply(self, pipe: Any, options: AttentionOptions, ctx: StackContext) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        previous = _AttentionBackendRegistry._active_backend
        ctx.callback("attention: active attention backend", lambda: _AttentionBackendRegistry.set_active_backend(previous))
        pipe.transformer.set_attention_backend(options.kernel)
        ctx.stats["attention_kernel"] = options.kernel


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [AttentionBackend()]
