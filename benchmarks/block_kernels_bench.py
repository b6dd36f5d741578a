"""Where one FLUX block's non-GEMM time goes on the fp8 stack, and what rewrites shorten it
(the producers that write the fp8 GEMM and attention inputs ran at 1.3-1.7 TB/s on the H100).

    python benchmarks/block_kernels_bench.py OUT_DIR [VARIANT ...]

One full-size FLUX.1-dev single block and one double block (random weights, 4096 image + 512
text tokens) quantized as ``torchao_fp8_static`` does (observers, one calibration pass, convert),
attention through ``fp8_attention``'s cuDNN kernel with static scales, compiled whole with
torchao's Inductor flags, captured in a CUDA graph. Per variant: the replay time (median of 20,
CUDA events) and every kernel's time from torch.profiler over the replays. Variants:

- ``product``: as fluxopt builds it today.
- ``gelu_sigmoid``: tanh-GELU computed as ``x * sigmoid(2 * inner)`` (the same function).
- ``quant_mul``: torchao's float8 quantization multiplies by the reciprocal scale instead of dividing.
- ``rope_pairs``: the rotary embedding written on (real, imaginary) pairs instead of diffusers'
  unbind/stack.
- ``pointwise_autotune``: Inductor's ``max_autotune_pointwise``.
- ``all``: every rewrite above together.
- ``fused_qk``: q and k normed, rotated and cast by ``fluxopt::rms_norm_rope_fp8`` (Triton).
- ``fused_qk_gelu``: ``fused_qk`` and ``gelu_sigmoid`` (fp8_max's block).
- ``gemm_autotune``: ``fused_qk_gelu`` with Inductor's ``max_autotune_gemm`` over ATen and Triton:
  Triton templates of ``_scaled_mm`` that take the producers into their prologue and the consumers
  into their epilogue compete with cuBLAS, and the faster is kept.

Writes OUT_DIR/block_kernels.json and the generated code of ``product`` (OUT_DIR/code-*.py).
"""

from __future__ import annotations

import contextlib
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from fluxopt.files import write_json_atomic, write_text_atomic
from fluxopt_plugins._sigmoid_gelu import SigmoidGelu, sigmoid_gelu
from fluxopt_plugins.fp8_attention import Fp8FluxAttnProcessor, qk_bounds
from fluxopt_plugins.torchao_quant import TORCHAO_INDUCTOR_FLAGS

IMG, TXT, DIM, HEADS, HEAD_DIM = 4096, 512, 3072, 24, 128
VARIANTS = ("product", "gelu_sigmoid", "quant_mul", "rope_pairs", "pointwise_autotune", "all", "fused_qk",
            "fused_qk_gelu", "gemm_autotune")
REWRITES = {"all": {"gelu_sigmoid", "quant_mul", "rope_pairs"}, "fused_qk_gelu": {"fused_qk", "gelu_sigmoid"},
            "gemm_autotune": {"fused_qk", "gelu_sigmoid"}}
# the variants measured on a double block too; the rest on a single block only, which keeps a run short
DOUBLE_BLOCK_VARIANTS = ("product", "all", "fused_qk", "fused_qk_gelu", "gemm_autotune")
INDUCTOR_FLAGS = {"pointwise_autotune": {"max_autotune_pointwise": True},
                  "gemm_autotune": {"max_autotune_gemm": True, "max_autotune_gemm_backends": "ATEN,TRITON"}}


def rope_pairs(x: torch.Tensor, freqs_cis: tuple[torch.Tensor, torch.Tensor], sequence_dim: int = 1,
               **_: Any) -> torch.Tensor:
    """diffusers' ``apply_rotary_emb`` (use_real, interleaved pairs) on (real, imaginary) pairs."""
    cos, sin = freqs_cis  # (tokens, head_dim), each value repeated for the two members of a pair
    c = cos[:, 0::2].float()[None, :, None, :]
    s = sin[:, 0::2].float()[None, :, None, :]
    pairs = x.float().unflatten(-1, (-1, 2))
    re, im = pairs[..., 0], pairs[..., 1]
    return torch.stack((re * c - im * s, im * c + re * s), dim=-1).flatten(-2).to(x.dtype)


def quantize_mul(tensor: torch.Tensor, scale: torch.Tensor, float8_dtype: torch.dtype = torch.float8_e4m3fn):
    from torchao.quantization.quant_primitives import _maybe_expand_scale_to_tensor_shape, _RoundToFloat8

    scaled = tensor.to(torch.float32) * _maybe_expand_scale_to_tensor_shape(scale, tensor.shape).reciprocal()
    limit = torch.finfo(float8_dtype).max
    return _RoundToFloat8.apply(scaled.clamp(min=-limit, max=limit), float8_dtype)


@contextlib.contextmanager
def rewrites(names: set[str]):
    """Patch in the rewrites named (module-level functions, for this process only)."""
    import diffusers.models.embeddings as embeddings
    import torchao.prototype.quantization.float8_static_quant.prototype_float8_tensor as static_tensor
    import torchao.quantization.quant_primitives as primitives

    patches = []
    if "rope_pairs" in names:
        patches.append((embeddings, "apply_rotary_emb", rope_pairs))
    if "quant_mul" in names:
        patches += [(primitives, "_quantize_affine_float8", quantize_mul),
                    (static_tensor, "_quantize_affine_float8", quantize_mul)]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
    for owner, attr, value in patches:
        setattr(owner, attr, value)
    try:
        yield
    finally:
        for owner, attr, value in saved:
            setattr(owner, attr, value)


def build(kind: str, names: set[str]) -> tuple[torch.nn.Module, dict[str, Any]]:
    from diffusers.models.transformers.transformer_flux import (FluxPosEmbed, FluxSingleTransformerBlock,
                                                                FluxTransformerBlock)
    from torchao.prototype.quantization.quant_api import Float8ObservedLinear
    from torchao.quantization import Float8StaticActivationFloat8WeightConfig, quantize_

    torch.manual_seed(0)
    block_class = FluxSingleTransformerBlock if kind == "single" else FluxTransformerBlock
    block = block_class(DIM, HEADS, HEAD_DIM).to("cuda", torch.bfloat16).eval()
    if "gelu_sigmoid" in names:
        if kind == "single":
            block.act_mlp = SigmoidGelu()
        else:
            for ff in (block.ff, block.ff_context):
                ff.net[0].gelu = sigmoid_gelu  # diffusers' GELU module: proj, then self.gelu(gate)
    ids = torch.cat([torch.zeros(TXT, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(64.0),
                                                                     torch.arange(64.0), indexing="ij"), -1).reshape(-1, 3)])
    rotary = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids.cuda())
    inputs = {"hidden_states": torch.randn(1, IMG, DIM, device="cuda", dtype=torch.bfloat16),
              "encoder_hidden_states": torch.randn(1, TXT, DIM, device="cuda", dtype=torch.bfloat16),
              "temb": torch.randn(1, DIM, device="cuda", dtype=torch.bfloat16), "image_rotary_emb": rotary}
    quantize_(block, Float8StaticActivationFloat8WeightConfig(step="prepare", set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear))  # every Linear of a block, as the stack
    processor = Fp8FluxAttnProcessor("cudnn", fused_qk="fused_qk" in names)
    q_bound, k_bound = qk_bounds(block.attn)
    processor.amax, processor.observe = (q_bound, k_bound, None), True
    block.attn.set_processor(processor)
    with torch.no_grad():
        block(**inputs)
    processor.amax, processor.observe = (q_bound, k_bound, processor.observed_v_amax * 4), False
    quantize_(block, Float8StaticActivationFloat8WeightConfig(step="convert", set_inductor_config=False),
              filter_fn=lambda m, fqn: isinstance(m, Float8ObservedLinear))
    return block, inputs


def kernel_times(run, replays: int = 5) -> dict[str, float]:
    """Microseconds per replay of every kernel and memset, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            run()
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:120]] += event.device_time / replays
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def measure(kind: str, variant: str, out_dir: Path) -> dict[str, Any]:
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    names = REWRITES.get(variant, {variant})
    flags = {**TORCHAO_INDUCTOR_FLAGS, **INDUCTOR_FLAGS.get(variant, {})}
    torch._dynamo.reset()
    with rewrites(names), inductor_config.patch(flags), torch.no_grad():
        block, inputs = build(kind, names)
        compiled = torch.compile(block, fullgraph=True)
        _, code = run_and_get_code(lambda: compiled(**inputs))
        if variant in ("product", "all"):
            for i, source in enumerate(code):
                write_text_atomic(out_dir / f"code-{kind}-{variant}-{i}.py", source)
        for _ in range(2):
            compiled(**inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            compiled(**inputs)
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    kernels = kernel_times(graph.replay)
    # cuBLAS's kernels, and Inductor's GEMM templates (triton_tem_*) with what they fused
    gemm = sum(t for n, t in kernels.items() if n.startswith("nvjet") or "gemm" in n.lower() or "_tem_" in n)
    attention = sum(t for n, t in kernels.items() if "sdpa" in n or "flash" in n)
    del graph, compiled, block
    torch.cuda.empty_cache()
    return {"replay_us": sorted(times)[len(times) // 2] * 1e3, "gemm_us": gemm, "attention_us": attention,
            "other_us": sum(kernels.values()) - gemm - attention, "kernels_us": kernels}


def main(out_dir: str, variants: list[str]) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": {}}
    plan = [("single", v) for v in variants] + [("double", v) for v in variants if v in DOUBLE_BLOCK_VARIANTS]
    for kind, variant in plan:
        try:
            result = measure(kind, variant, out)
        except Exception as exc:  # noqa: BLE001 - one variant's failure is recorded, the rest still run
            result = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        record["results"][f"{kind}/{variant}"] = result
        write_json_atomic(out / "block_kernels.json", record)
        summary = {k: round(v, 1) for k, v in result.items() if k.endswith("_us") and isinstance(v, float)}
        print(kind, variant, summary or result, flush=True)
        if "kernels_us" in result:
            for name, us in list(result["kernels_us"].items())[:12]:
                print(f"    {us:8.1f} {name}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or list(VARIANTS))
