"""Built-in presets: published recipes under one name (``+backend=<name>``).

``flux_fast`` is the recipe of huggingface/flux-fast as far as this machine allows, with each
difference stated in ``deviations``; ``fp8_max`` is fluxopt's own fastest stack that passes the
lossy gate on the H100 (docs/results/), so the two can be measured side by side:
``python -m fluxopt -m +backend=flux_fast,fp8_max``; ``fp8_graphs`` is the portable fp8 stack
(no calibration, no cuDNN fp8 attention); ``lossless_max`` is the fastest stack that passes the
lossless gate.
"""

from __future__ import annotations

from fluxopt import Preset, hookimpl

FLUX_FAST = Preset(
    name="flux_fast",
    description=("flux-fast's recipe: fused QKV, channels_last VAE, torchao fp8 dynamic quantization (per row), "
                 "torch.export + AOTInductor (transformer and VAE decoder) + CUDA graphs"),
    backends={
        "fuse_qkv": {"transformer": True, "vae": True},
        "channels_last": {},
        "torchao_fp8": {"granularity": "row"},
        "aoti": {"max_autotune": False, "tuning_flags": False, "cuda_graphs": True, "weights": "embedded",
                 "vae": True},
    },
    source="https://github.com/huggingface/flux-fast (utils/pipeline_utils.py: optimize)",
    deviations=(
        "attention: Flash Attention 3 with fp8 inputs has no installable wheel here; SDPA's default runs "
        "instead (cuDNN on the H100, the fastest bf16 kernel fluxopt measured at FLUX's shape)",
        "GEMM autotuning is off (backend.aoti.max_autotune=true for the original): on the H100 "
        "none of Inductor's candidates beat cuBLAS for any fp8 GEMM shape, at ~96 s of autotuning per shape "
        "(docs/results/2026-11-25-h100-issue15h.md)",
        "Inductor's tuning flags are off (backend.aoti.tuning_flags=true for the original): with them the "
        "package took 752 s to compile on the H100, and coordinate descent gained 1.1 % per step on the H200 "
        "(docs/results/2026-12-03-h200-cd-tuning/)",
        "fp8 quantization of the transformer only; flux-fast also quantizes the VAE's Linear layers",
        "channels_last on the VAE only; flux-fast also sets it on the transformer, whose Linear layers have "
        "no channel dimension to reorder",
    ),
)

FP8_GRAPHS = Preset(
    name="fp8_graphs",
    description="torchao fp8 (per row) + regional torch.compile + CUDA graphs: fp8 matmuls only, no calibration, "
                "any fp8 GPU (1.80x on the H100, docs/results/)",
    backends={"torchao_fp8": {"granularity": "row"}, "compile": {"regional": True, "cuda_graphs": True}},
    source="fluxopt's H100 bake-offs (docs/results/2026-11-25-h100-issue15h.md)",
)

FP8_MAX = Preset(
    name="fp8_max",
    description="static fp8 linears (calibrated) + fp8 attention (cuDNN, fused q/k prologue) + regional "
                "torch.compile with sigmoid GELUs + CUDA graphs: fluxopt's fastest stack that passes the lossy "
                "gate (2.10x on the H200, docs/results/); needs sm 9.0+ and fluxopt[cudnn]. Inductor's "
                "coordinate-descent tuning is off: on the H200 it gained 1.1 % per step for 20-90 s of every "
                "build (its results are re-tuned in each process); torchao_fp8_static.inductor_tuning=true adds it",
    backends={"torchao_fp8_static": {"inductor_tuning": False}, "fp8_attention": {},
              "compile": {"regional": True, "cuda_graphs": True, "sigmoid_gelu": True}},
    source="fluxopt's H100 and H200 bake-offs (docs/results/2026-11-26-h100-issue15q.md, "
           "docs/results/2026-12-03-h200-cd-tuning/)",
)

LOSSLESS_MAX = Preset(
    name="lossless_max",
    description="regional torch.compile + CUDA graphs, with q's and k's RMSNorm and rotary embedding in one Triton "
                "kernel each (attention.fused_qk): fluxopt's fastest stack that passes the lossless gate (1.34x on "
                "the H200, 2 % faster a step than without fused_qk, docs/results/); any CUDA GPU with Triton",
    backends={"attention": {"fused_qk": True}, "compile": {"regional": True, "cuda_graphs": True}},
    source="fluxopt's H200 bake-off (docs/results/2026-12-04-h200-lossless-fused-qk/)",
)


@hookimpl
def fluxopt_presets() -> list[Preset]:
    return [FLUX_FAST, FP8_GRAPHS, FP8_MAX, LOSSLESS_MAX]
