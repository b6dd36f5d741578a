"""Can a Triton fp8 attention beat cuDNN's at FLUX.1-dev's attention shape (1024x1024: 4096 image +
512 text tokens, 24 heads of 128)? The last attention lever of the fp8 stack that had not been
measured: cuDNN's and FlashAttention-3's fp8 kernels take the same time (about 310 us a call on the
H200 under its power limit, 68 % of the fp8 matmul rate), so a third kernel is worth adopting only
if it is faster than both at this shape.

    python benchmarks/triton_fp8_attention_bench.py OUT.json

The kernel is a plain FlashAttention-2 forward written for this comparison: per program a tile of
``BLOCK_M`` queries of one head, the keys in tiles of ``BLOCK_N``, scores from the e4m3 q and k in
fp32, an online softmax in base 2, the probabilities scaled by ``P_SCALE`` and rounded to e4m3
before their product with v (the roundings of ``fp8_attention``'s kernels), the output
dequantized to bf16. Hopper's fp8 tensor-core instructions read their second operand K-major, so
v is timed both in FLUX's (batch, tokens, heads, head_dim) layout and pre-transposed to
(batch, heads, head_dim, tokens), the layout a fused v-quantization kernel could write; the
transpose itself is timed on its own.

Rows, each one call's GPU time in a CUDA graph of 20 calls (as a stack's step replays them: the
host's launch overhead excluded; the warm-up call before capture autotunes the Triton tile sizes), with its relative L2 error against SDPA's math kernel in fp32 and its rate in TFLOP/s:
cuDNN fp8 (kernel only, output dequantized), the Triton kernel in each v layout, and the
transpose of v. The SM clock and power while timing are recorded too: the H200 throttles under
its 700 W limit, so rates compare only within one run.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from attention_fp8_bench import print_rows  # benchmarks/ is the script's directory

from fluxopt.files import write_json_atomic
from fluxopt.profile import gpu_clock
from fluxopt_plugins._fp8_attention_kernels import P_SCALE, cudnn_fp8_attention, quantize_per_tensor
from fluxopt_plugins._rms_norm_rope_fp8 import FP8

SHAPE = (1, 4608, 24, 128)
LOG2E = 1.4426950408889634
CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
           for m, n, w, s in ((128, 128, 8, 2), (128, 128, 8, 3), (128, 128, 8, 4), (128, 64, 4, 3), (128, 64, 8, 3),
                              (128, 128, 4, 3), (64, 128, 4, 3), (128, 256, 8, 2), (256, 128, 8, 2))]


@triton.autotune(CONFIGS, key=["tokens", "HEAD_DIM", "V_T"])
@triton.jit
def _attention_fp8(q_ptr, k_ptr, v_ptr, out_ptr, score_scale, out_scale, tokens, heads,
                   stride_b, stride_s, stride_h, stride_vb, stride_vh, stride_vd, stride_vs,
                   HEAD_DIM: tl.constexpr, V_T: tl.constexpr, P_SCALE_C: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One tile of queries of one head. ``score_scale``: q and k's descales x the softmax scale x
    log2(e); ``out_scale``: v's descale / ``P_SCALE``. ``V_T``: v laid out (batch, heads, head_dim,
    tokens) (its strides are ``stride_v*``), else as q and k."""
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = batch_head // heads
    head = batch_head % heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    base = batch * stride_b + head * stride_h
    q = tl.load(q_ptr + base + offs_m[:, None] * stride_s + offs_d[None, :], mask=offs_m[:, None] < tokens, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = k_ptr + base + offs_d[:, None] + offs_n[None, :] * stride_s  # (head_dim, keys): K-major for the dot
    if V_T:
        v_base = v_ptr + batch * stride_vb + head * stride_vh + offs_d[None, :] * stride_vd + offs_n[:, None] * stride_vs
    else:
        v_base = v_ptr + base + offs_n[:, None] * stride_s + offs_d[None, :]
    for start_n in range(0, tokens, BLOCK_N):
        in_range = (start_n + offs_n) < tokens
        k = tl.load(k_base + start_n * stride_s, mask=in_range[None, :], other=0.0)
        scores = tl.dot(q, k) * score_scale
        scores = tl.where(in_range[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        p = tl.math.exp2(scores - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if V_T:
            v = tl.load(v_base + start_n * stride_vs, mask=in_range[:, None], other=0.0)
        else:
            v = tl.load(v_base + start_n * stride_s, mask=in_range[:, None], other=0.0)
        acc = tl.dot((p * P_SCALE_C).to(tl.float8e4nv), v, acc * alpha[:, None])
        m_i = m_new
    out = acc * (out_scale / l_i[:, None])
    tl.store(out_ptr + base + offs_m[:, None] * stride_s + offs_d[None, :], out.to(tl.bfloat16),
             mask=offs_m[:, None] < tokens)


def triton_fp8_attention(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, q_descale: float, k_descale: float,
                         v_descale: float, softmax_scale: float, v_transposed: bool) -> torch.Tensor:
    """The kernel on (batch, tokens, heads, head_dim) e4m3 q and k; v likewise, or
    (batch, heads, head_dim, tokens) where ``v_transposed``; the output in bf16, dequantized. The
    descales are host floats, so that a CUDA graph can capture the call."""
    batch, tokens, heads, head_dim = q8.shape
    out = torch.empty(q8.shape, dtype=torch.bfloat16, device=q8.device)
    v_strides = v8.stride() if v_transposed else (0, 0, 0, 0)

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)

    _attention_fp8[grid](q8, k8, v8, out, q_descale * k_descale * softmax_scale * LOG2E, v_descale / P_SCALE,
                         tokens, heads, q8.stride(0), q8.stride(1), q8.stride(2), *v_strides, HEAD_DIM=head_dim,
                         V_T=v_transposed, P_SCALE_C=P_SCALE)
    return out


def timed_ms(fn, calls: int = 20, repeats: int = 10) -> float:
    """One call's GPU time: ``calls`` calls captured in one CUDA graph (after a warm-up call, which
    autotunes and builds outside the capture), the median of ``repeats`` replays timed with CUDA
    events, over ``calls``. The graph keeps the host's launch overhead (Python, cuDNN's variant pack,
    Triton's launcher) out of the figure, as it is in a stack's CUDA-graph step."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def main(out_path: str) -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(*SHAPE, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(x.float().transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    (q8, dq), (k8, dk), (v8, dv) = quantize_per_tensor(q), quantize_per_tensor(k), quantize_per_tensor(v)
    v8_t = v8.permute(0, 2, 3, 1).contiguous()
    descales = [float(d) for d in (dq, dk, dv)]
    scale = SHAPE[-1] ** -0.5
    flops = 4 * SHAPE[0] * SHAPE[2] * SHAPE[1] ** 2 * SHAPE[3]
    rows = {
        "cudnn fp8 (kernel, dequantized)": lambda: cudnn_fp8_attention(q8, k8, v8, dq, dk, dv, scale).float() * dv,
        "cudnn fp8 (kernel only)": lambda: cudnn_fp8_attention(q8, k8, v8, dq, dk, dv, scale),
        "triton fp8, v as (b, s, h, d)": lambda: triton_fp8_attention(q8, k8, v8, *descales, scale, False),
        "triton fp8, v as (b, h, d, s)": lambda: triton_fp8_attention(q8, k8, v8_t, *descales, scale, True),
    }
    results: dict[str, dict] = {}
    for name, fn in rows.items():
        try:
            out = fn()
            error = None
            if out.dtype != FP8:
                error = float((out.float() - reference).norm() / reference.norm())
            with gpu_clock.sampled() as clock:
                ms = timed_ms(fn)
            results[name] = {"ms": ms, "tflops": flops / ms / 1e9, "rel_error": error, "clock": clock.summary()}
            best = getattr(_attention_fp8, "best_config", None)
            if name.startswith("triton") and best is not None:
                results[name]["config"] = str(best)
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile here is an answer
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    results["transpose of v, (b, s, h, d) -> (b, h, d, s)"] = {
        "ms": timed_ms(lambda: v8.permute(0, 2, 3, 1).contiguous())}
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "shape": list(SHAPE), "flops_per_call": flops, "kernels": results}
    write_json_atomic(Path(out_path), record)
    print_rows(results, width=48)


if __name__ == "__main__":
    main(sys.argv[1])
