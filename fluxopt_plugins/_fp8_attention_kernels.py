"""The attention kernels of ``fp8_attention``: q, k and v in float8 (e4m3) with one scale per
tensor, the softmax probabilities rounded to float8 before they multiply v, fp32 accumulation,
and the output written in float8 too: on Hopper cuDNN's fp8 attention writes only float8
(a 16-bit output is Blackwell-only). The output needs no measured scale: each output row is a
convex combination of rows of v, so ``|out| <= max|v|`` and v's own scale never overflows it.

``cudnn`` is cuDNN's fused fp8 flash attention (Hopper and newer) through the cuDNN frontend's
Python graph API, wrapped as the custom op ``fluxopt::cudnn_fp8_attention`` so torch.compile
sees one opaque node (no graph break) and CUDA graphs can capture it: the cuDNN graph and plan
are built once per shape, outside any capture, and every call runs on torch's current stream.

``fa3`` is FlashAttention-3's fp8 forward (Hopper only), from the ``fa3-fwd`` wheel: a build of
FlashAttention-3's forward kernels against torch's stable C ABI, so one wheel loads on any torch
of that ABI. It takes one descale per (batch, head) and writes the output in bf16, already
dequantized; its probabilities are offset into e4m3's range the way ``P_SCALE`` does here.

``reference`` does the same roundings in plain torch, on any device: it is how the cuDNN kernel's
numerics are checked, and how a CPU run judges what fp8 attention does to an image. It rounds the
probabilities against each row's maximum; cuDNN rounds them against a running maximum over tiles
of keys, so the two agree to float8 noise, not bit for bit.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import torch

from fluxopt_plugins._rms_norm_rope_fp8 import FP8, FP8_MAX, fp8_scale

# Softmax probabilities lie in [0, 1] (exp of a score minus its row maximum): scaled by this they
# use e4m3's whole range, so small probabilities keep their mantissa instead of flushing to zero.
P_SCALE = FP8_MAX

# (query, key, value, q_descale, k_descale, v_descale, softmax_scale) -> the output, either in float8
# scaled like v (its descale is v_descale) or already dequantized in 16 bits: all (batch, tokens,
# heads, head_dim)
Kernel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float],
                  torch.Tensor]


def quantize_per_tensor(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in float8 scaled so that ``amax`` (default: ``x``'s largest magnitude, an extra pass
    over ``x``) maps to e4m3's largest value, saturating beyond it, and the descale (1 / scale,
    shape (1, 1, 1, 1), fp32) that undoes it. Plain torch ops, so torch.compile fuses them into
    the kernels that produce ``x``: with a given ``amax`` the producer writes float8 directly."""
    if amax is None:
        amax = x.detach().abs().amax().float()
    scale = fp8_scale(amax)
    x8 = (x.float() * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x8, descale(amax)


def descale(amax: torch.Tensor) -> torch.Tensor:
    """The (1, 1, 1, 1) fp32 factor that undoes the cast of a tensor quantized for ``amax``."""
    return (1.0 / fp8_scale(amax)).reshape(1, 1, 1, 1)


def reference_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_descale: torch.Tensor,
                        k_descale: torch.Tensor, v_descale: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """fp8 attention in plain torch on ``(batch, tokens, heads, head_dim)`` float8 inputs: scores
    and row sums in fp32 from the dequantized q and k, probabilities rounded to e4m3 (scaled by
    ``P_SCALE``) before the product with v, the output rounded to e4m3 with v's scale. One head
    at a time, to bound the score matrix."""
    q = query.float().transpose(1, 2) * q_descale.float()
    k = key.float().transpose(1, 2) * k_descale.float()
    v = value.float().transpose(1, 2) * v_descale.float()
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=torch.float32, device=q.device)
    for h in range(q.shape[1]):
        scores = (q[:, h] @ k[:, h].transpose(-1, -2)) * softmax_scale
        p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        p8 = (p * P_SCALE).to(FP8).float() / P_SCALE
        out[:, h] = (p8 @ v[:, h]) / p.sum(dim=-1, keepdim=True)
    return (out.transpose(1, 2) / v_descale.float()).clamp(-FP8_MAX, FP8_MAX).to(FP8)


# ---------------------------------------------------------------------------------------- cuDNN
MIN_CUDNN = 91000  # fp8 attention forward on Hopper with a float8 output: cuDNN 9.x (the H100 machine: 9.19)


def cudnn_frontend_version() -> tuple[str | None, int | None]:
    """(cudnn-frontend version, the cuDNN library version it loaded as an int such as 91400), or
    Nones where the frontend is not installed or cannot load cuDNN."""
    try:
        import cudnn
        return cudnn.__version__, int(cudnn.backend_version())
    except Exception:  # noqa: BLE001 - absent or unloadable: the backend's requirement says which
        return None, None


class _CudnnGraphs:
    """One built cuDNN fp8 attention graph per (shape, softmax scale, device), with its constant
    scale buffers, and one cuDNN handle per device. Built on first use, which is a warm-up call:
    never during a CUDA graph capture."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.graphs: dict[tuple, tuple[Any, dict[str, Any], dict[str, torch.Tensor]]] = {}
        self.handles: dict[int, Any] = {}

    def handle(self, device: torch.device) -> Any:
        import cudnn

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self.handles:
            with torch.cuda.device(index):
                self.handles[index] = cudnn.create_handle()
        handle = self.handles[index]
        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(index).cuda_stream)
        return handle

    def get(self, batch: int, tokens: int, heads: int, head_dim: int, softmax_scale: float,
            device: torch.device) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
        key = (batch, tokens, heads, head_dim, softmax_scale, device)
        with self.lock:
            if key not in self.graphs:
                try:
                    self.graphs[key] = self._build(*key, handle=self.handle(device))
                except Exception as exc:
                    raise RuntimeError(f"cuDNN {cudnn_frontend_version()[1]} has no fp8 attention for (batch, tokens, "
                                       f"heads, head_dim)=({batch}, {tokens}, {heads}, {head_dim}): "
                                       f"{type(exc).__name__}: {exc}") from exc
            return self.graphs[key]

    def release(self) -> None:
        """Drop every built graph with its GPU buffers (workspace, scales) and destroy the handles:
        run when the stack that used them closes."""
        with self.lock:
            self.graphs.clear()
            if self.handles:
                import cudnn

                for handle in self.handles.values():
                    cudnn.destroy_handle(handle)
                self.handles.clear()

    @staticmethod
    def _build(batch: int, tokens: int, heads: int, head_dim: int, softmax_scale: float,
               device: torch.device, handle: Any) -> tuple[Any, dict[str, Any], dict[str, torch.Tensor]]:
        """The graph, its tensors by name and the constants it runs with. Built in each process:
        on the H200 the build takes 0.3 s, so a serialized plan is not worth caching
        (docs/results/2026-12-04-h200-cudnn-plan-probe.json)."""
        import cudnn

        graph = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                              compute_data_type=cudnn.data_type.FLOAT, handle=handle)
        # logical (batch, heads, tokens, head_dim) over diffusers' (batch, tokens, heads, head_dim) memory
        dim = (batch, heads, tokens, head_dim)
        stride = (tokens * heads * head_dim, head_dim, heads * head_dim, 1)
        t = {name: graph.tensor(name=name, dim=dim, stride=stride, data_type=cudnn.data_type.FP8_E4M3)
             for name in ("q", "k", "v")}
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            t[name] = graph.tensor(name=name, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=cudnn.data_type.FLOAT)
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=t["q"], k=t["k"], v=t["v"], descale_q=t["descale_q"], descale_k=t["descale_k"],
            descale_v=t["descale_v"], descale_s=t["descale_s"], scale_s=t["scale_s"], scale_o=t["scale_o"],
            generate_stats=False, attn_scale=softmax_scale, use_causal_mask=False)
        o.set_output(True).set_dim(dim).set_stride(stride).set_data_type(cudnn.data_type.FP8_E4M3)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(cudnn.data_type.FLOAT)
        t.update(o=o, amax_s=amax_s, amax_o=amax_o)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        one = lambda value: torch.full((1, 1, 1, 1), value, dtype=torch.float32, device=device)  # noqa: E731
        constants = {"scale_s": one(P_SCALE), "descale_s": one(1.0 / P_SCALE), "amax_s": one(0.0), "amax_o": one(0.0),
                     "workspace": torch.empty(graph.get_workspace_size(), dtype=torch.uint8, device=device)}
        return graph, t, constants


_GRAPHS = _CudnnGraphs()


def release_cudnn_graphs() -> None:
    """Free what the cuDNN kernel built (``fp8_attention`` registers this with its stack)."""
    _GRAPHS.release()


@torch.library.custom_op("fluxopt::cudnn_fp8_attention", mutates_args=())
def cudnn_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_descale: torch.Tensor,
                        k_descale: torch.Tensor, v_descale: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """cuDNN's fp8 attention on contiguous ``(batch, tokens, heads, head_dim)`` e4m3 tensors; the
    e4m3 output is scaled like v (its descale is ``v_descale``)."""
    batch, tokens, heads, head_dim = query.shape
    graph, t, constants = _GRAPHS.get(batch, tokens, heads, head_dim, softmax_scale, query.device)
    out = torch.empty(query.shape, dtype=FP8, device=query.device)
    pack = {t["q"]: query.contiguous(), t["k"]: key.contiguous(), t["v"]: value.contiguous(),
            t["descale_q"]: q_descale, t["descale_k"]: k_descale, t["descale_v"]: v_descale,
            t["descale_s"]: constants["descale_s"], t["scale_s"]: constants["scale_s"],
            t["scale_o"]: (1.0 / v_descale), t["o"]: out, t["amax_s"]: constants["amax_s"],
            t["amax_o"]: constants["amax_o"]}
    graph.execute(pack, constants["workspace"], handle=_GRAPHS.handle(query.device))
    return out


@cudnn_fp8_attention.register_fake
def _(query, key, value, q_descale, k_descale, v_descale, softmax_scale):
    return torch.empty(query.shape, dtype=FP8, device=query.device)


# ------------------------------------------------------------------------------ FlashAttention-3


def fa3_fp8_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_descale: torch.Tensor,
                      k_descale: torch.Tensor, v_descale: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """FlashAttention-3's fp8 forward on ``(batch, tokens, heads, head_dim)`` e4m3 tensors; the
    output in bf16, dequantized. Its op (``fa3_fwd::_flash_attn_forward``) is a torch custom op
    with a fake implementation, so torch.compile keeps it as one node and CUDA graphs capture it."""
    from fa3_fwd_interface import _flash_attn_forward

    batch, heads = query.shape[0], key.shape[2]

    def per_head(d: torch.Tensor) -> torch.Tensor:  # FA3 takes a (batch, kv heads) fp32 descale
        return d.float().reshape(1, 1).expand(batch, heads).contiguous()

    return _flash_attn_forward(query, key, value, q_descale=per_head(q_descale), k_descale=per_head(k_descale),
                               v_descale=per_head(v_descale), softmax_scale=softmax_scale)[0]


KERNELS: dict[str, Kernel] = {"cudnn": cudnn_fp8_attention, "fa3": fa3_fp8_attention,
                              "reference": reference_attention}


def attention_fp8(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel: str,
                  amax: tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None] = (None, None, None)
                  ) -> torch.Tensor:
    """Attention of 16-bit ``(batch, tokens, heads, head_dim)`` tensors through ``kernel``, after
    quantizing each of q, k and v to float8 with its own scale (from ``amax``, fixed magnitudes
    for q, k, v, or each tensor's own where None); the result in the inputs' dtype (the
    dequantization, like the quantization, is plain torch for torch.compile to fuse)."""
    q8, q_descale = quantize_per_tensor(query, amax[0])
    k8, k_descale = quantize_per_tensor(key, amax[1])
    return attention_fp8_qk(q8, q_descale, k8, k_descale, value, kernel, amax[2], query.dtype)


def attention_fp8_qk(q8: torch.Tensor, q_descale: torch.Tensor, k8: torch.Tensor, k_descale: torch.Tensor,
                     value: torch.Tensor, kernel: str, v_amax: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """:func:`attention_fp8` on q and k already in float8 (with their descales): v quantized with
    ``v_amax`` (None: its own), the result dequantized to ``dtype``."""
    v8, v_descale = quantize_per_tensor(value, v_amax)
    out = KERNELS[kernel](q8, k8, v8, q_descale, k_descale, v_descale, 1.0 / math.sqrt(q8.shape[-1]))
    return (out.float() * v_descale).to(dtype) if out.dtype == FP8 else out.to(dtype)
