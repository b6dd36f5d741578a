"""q or k of FLUX attention in one pass: RMSNorm over each head, the rotary embedding, and either
the per-tensor float8 (e4m3) cast (the custom op ``fluxopt::rms_norm_rope_fp8``, fp8_attention's
prologue) or one rounding to the input's 16-bit dtype (``fluxopt::rms_norm_rope``, the ``attention``
backend's ``fused_qk``: q and k for a 16-bit attention kernel).

Why a kernel of its own: Inductor fuses these three steps into one reduction kernel, but on the
H100 it ran at about a third of the memory bandwidth (70-100 us for q and k of a single block,
against ~25 us to read them in bf16 and write float8: it loops over each head three times and
reloads each element's partner for the rotation). Here one Triton program holds a tile of tokens
of a group of heads: the rotary tables' rows once, then per head in registers the sum of squares,
scale, rotation of the (even, odd) pairs, cast and store. The tile sizes are autotuned per shape
on first use (a warm-up call, never inside a CUDA graph capture).

A joint block's q is its text stream (normed by ``norm_added_q``) followed by its image stream
(``norm_q``); the op takes both, each with its weight, and writes them into one tensor in that
order, rotated with the rows of the rotary tables that belong to them (the tables cover the
concatenated sequence). Everything is computed in fp32 from the bf16 input, as Inductor's fused
kernel does (no bf16 rounding between the steps).

On CUDA with Triton the kernel runs; elsewhere (the CPU) the same arithmetic in plain torch, so a
CPU run takes the same path through the processor. Both ops run one kernel body, specialised on
the output (the 16-bit one skips the scale and the clamp), under two kernel names, so that a
profile counts the fp8 one with the casts and the 16-bit one with the norms.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)
_TINY = torch.finfo(torch.float32).tiny


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The factor that maps ``amax`` onto e4m3's largest value (as :func:`quantize_per_tensor`)."""
    return FP8_MAX / amax.float().clamp_min(_TINY)


def _torch_segment(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   scale: torch.Tensor | None, eps: float) -> torch.Tensor:
    """One segment in plain torch: ``x`` (batch, tokens, heads, head_dim), ``cos``/``sin`` its
    (tokens, head_dim) rows of the rotary tables (each value repeated for both members of a pair);
    cast to e4m3 with ``scale``, or (None) rounded once to ``x``'s dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps) * weight.float()
    pairs = y.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    out = y * cos.float()[None, :, None, :] + rotated * sin.float()[None, :, None, :]
    if scale is None:
        return out.to(x.dtype)
    return (out * scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def _segments(x: torch.Tensor, weight: torch.Tensor, prefix: torch.Tensor | None, prefix_weight: torch.Tensor | None):
    """(tensor, weight, first row) of each stream, in output order: the text stream first."""
    if prefix is None:
        return [(x, weight, 0)]
    return [(prefix, prefix_weight, 0), (x, weight, prefix.shape[1])]


@torch.library.custom_op("fluxopt::rms_norm_rope_fp8", mutates_args=())
def rms_norm_rope_fp8(x: torch.Tensor, weight: torch.Tensor, prefix: torch.Tensor | None,
                      prefix_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                      amax: torch.Tensor, eps: float) -> torch.Tensor:
    """``cat([prefix, x], dim=1)``, each stream RMS-normed over ``head_dim`` with its own weight,
    rotated by ``cos``/``sin`` (rows = the concatenated tokens), cast to e4m3 with the scale that
    maps ``amax`` to 448. Inputs (batch, tokens, heads, head_dim), 16-bit; output float8."""
    scale = fp8_scale(amax)
    return torch.cat([_torch_segment(seg, w, cos[row:row + seg.shape[1]], sin[row:row + seg.shape[1]], scale, eps)
                      for seg, w, row in _segments(x, weight, prefix, prefix_weight)], dim=1)


@rms_norm_rope_fp8.register_fake
def _(x, weight, prefix, prefix_weight, cos, sin, amax, eps):
    tokens = x.shape[1] + (prefix.shape[1] if prefix is not None else 0)
    return x.new_empty((x.shape[0], tokens, *x.shape[2:]), dtype=FP8)


@torch.library.custom_op("fluxopt::rms_norm_rope", mutates_args=())
def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, prefix: torch.Tensor | None,
                  prefix_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm_rope_fp8` without the cast: the result rounded once to ``x``'s dtype (diffusers
    rounds the normed values to it before the rotation too; this op, like Inductor, does not). Its
    memory is laid out (batch, heads, tokens, head_dim), as SDPA's kernels take q and k after the
    dispatcher's transpose: in (batch, tokens, heads, head_dim) order Inductor copies them again."""
    out = torch.cat([_torch_segment(seg, w, cos[row:row + seg.shape[1]], sin[row:row + seg.shape[1]], None, eps)
                     for seg, w, row in _segments(x, weight, prefix, prefix_weight)], dim=1)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


def _heads_major(x: torch.Tensor, tokens: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An empty (batch, tokens, heads, head_dim) tensor over (batch, heads, tokens, head_dim) memory."""
    return x.new_empty((x.shape[0], x.shape[2], tokens, x.shape[3]), dtype=dtype or x.dtype).transpose(1, 2)


@rms_norm_rope.register_fake
def _(x, weight, prefix, prefix_weight, cos, sin, eps):
    return _heads_major(x, x.shape[1] + (prefix.shape[1] if prefix is not None else 0))


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


if triton_available():
    import triton
    import triton.language as tl

    # (tokens per program, heads per program, warps): a program reads its tokens' rows of the
    # rotary tables once for all its heads (per head, those reads cost more than q itself)
    _CONFIGS = [(8, 1, 2), (16, 1, 4), (32, 1, 4), (8, 4, 2), (16, 4, 4), (32, 4, 4), (8, 8, 4), (16, 8, 4),
                (32, 8, 8), (16, 24, 4), (32, 24, 8), (64, 24, 8)]

    @triton.jit
    def _rms_norm_rope_body(x_ptr, w_ptr, cos_ptr, sin_ptr, amax_ptr, out_ptr, tokens, heads, first_row,
                stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, eps,
                HEAD_DIM: tl.constexpr, FP8_OUT: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_H: tl.constexpr):
        """``FP8_OUT``: cast with the scale of ``amax_ptr``'s value, else store in ``out_ptr``'s dtype
        (``amax_ptr`` unread)."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        batch = tl.program_id(2)
        d = tl.arange(0, HEAD_DIM)
        rows = first_row + t
        token_ok = (t < tokens)[:, None]
        cos = tl.load(cos_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=token_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=token_ok, other=0.0).to(tl.float32)
        weight = tl.load(w_ptr + d).to(tl.float32)[None, :]
        if FP8_OUT:
            scale = 448.0 / tl.maximum(tl.load(amax_ptr).to(tl.float32), 1.1754943508222875e-38)
        for i in tl.range(0, GROUP_H):
            head = tl.program_id(1) * GROUP_H + i
            mask = token_ok & (head < heads)
            x = tl.load(x_ptr + batch * stride_xb + t[:, None] * stride_xt + head * stride_xh + d[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            y = x * tl.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)[:, None] * weight
            even, odd = tl.split(tl.reshape(y, (BLOCK_T, HEAD_DIM // 2, 2)))
            rotated = tl.reshape(tl.join(-odd, even), (BLOCK_T, HEAD_DIM))
            if FP8_OUT:
                out = tl.clamp((y * cos + rotated * sin) * scale, -448.0, 448.0).to(tl.float8e4nv)
            else:
                out = (y * cos + rotated * sin).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + batch * stride_ob + rows[:, None] * stride_ot + head * stride_oh + d[None, :], out,
                     mask=mask)

    _AUTOTUNE = dict(configs=[triton.Config({"BLOCK_T": t, "GROUP_H": g}, num_warps=w) for t, g, w in _CONFIGS],
                     key=["tokens", "heads", "HEAD_DIM"])

    @triton.autotune(**_AUTOTUNE)
    @triton.jit
    def _rms_norm_rope_fp8_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, amax_ptr, out_ptr, tokens, heads, first_row,
                stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, eps,
                HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_H: tl.constexpr):
        _rms_norm_rope_body(x_ptr, w_ptr, cos_ptr, sin_ptr, amax_ptr, out_ptr, tokens, heads, first_row,
                            stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, eps,
                            HEAD_DIM, True, BLOCK_T, GROUP_H)

    @triton.autotune(**_AUTOTUNE)
    @triton.jit
    def _rms_norm_rope_kernel(x_ptr, w_ptr, cos_ptr, sin_ptr, amax_ptr, out_ptr, tokens, heads, first_row,
                stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, eps,
                HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, GROUP_H: tl.constexpr):
        _rms_norm_rope_body(x_ptr, w_ptr, cos_ptr, sin_ptr, amax_ptr, out_ptr, tokens, heads, first_row,
                            stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh, eps,
                            HEAD_DIM, False, BLOCK_T, GROUP_H)

    def _launch(x, weight, prefix, prefix_weight, cos, sin, amax, eps, dtype):
        """Both ops' CUDA path: each stream's rows of the output from one launch (``amax`` None: 16-bit)."""
        tokens = x.shape[1] + (prefix.shape[1] if prefix is not None else 0)
        batch, _, heads, head_dim = x.shape
        out = (torch.empty((batch, tokens, heads, head_dim), dtype=dtype, device=x.device) if dtype == FP8
               else _heads_major(x, tokens, dtype))
        cos, sin = cos.contiguous(), sin.contiguous()
        amax = amax.reshape(1).float() if amax is not None else cos  # unread by the 16-bit kernel
        for seg, w, row in _segments(x, weight, prefix, prefix_weight):
            if seg.stride(-1) != 1 or seg.stride(-2) != head_dim:
                seg = seg.contiguous()
            grid = lambda meta, n=seg.shape[1]: (triton.cdiv(n, meta["BLOCK_T"]),  # noqa: E731
                                                 triton.cdiv(heads, meta["GROUP_H"]), batch)
            kernel = _rms_norm_rope_fp8_kernel if dtype == FP8 else _rms_norm_rope_kernel
            kernel[grid](seg, w.contiguous(), cos, sin, amax, out, seg.shape[1], heads, row,
                         seg.stride(0), seg.stride(1), seg.stride(2), out.stride(0), out.stride(1), out.stride(2),
                         eps, HEAD_DIM=head_dim)
        return out

    @rms_norm_rope_fp8.register_kernel("cuda")
    def _(x, weight, prefix, prefix_weight, cos, sin, amax, eps):
        return _launch(x, weight, prefix, prefix_weight, cos, sin, amax, eps, FP8)

    @rms_norm_rope.register_kernel("cuda")
    def _(x, weight, prefix, prefix_weight, cos, sin, eps):
        return _launch(x, weight, prefix, prefix_weight, cos, sin, None, eps, x.dtype)
