"""``fluxopt::rms_norm_rope_fp8``: q or k normed, rotated and cast in one op is diffusers' RMSNorm
and rotary embedding followed by fp8_attention's cast, up to the bf16 roundings between the steps
that the fused op (like Inductor) skips; a joint block's text stream comes first with its own
norm; the processor that uses it stays within float8 noise of the unfused one. On a GPU the
Triton kernel agrees with the plain-torch implementation and runs compiled and in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxopt.serving import load_model
from fluxopt_plugins import fp8_attention
from fluxopt_plugins._fp8_attention_kernels import FP8, quantize_per_tensor
from fluxopt_plugins._rms_norm_rope_fp8 import rms_norm_rope_fp8

HEAD_DIM = 128


def _inputs(seed, text_tokens, image_tokens, heads=3, spread=1.0, device="cpu"):
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    gen = torch.Generator().manual_seed(seed)
    make = lambda n: (torch.randn(1, n, heads, HEAD_DIM, generator=gen) * spread).to(device, torch.bfloat16)  # noqa: E731
    norms = []
    for _ in range(2):
        norm = torch.nn.RMSNorm(HEAD_DIM, eps=1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(HEAD_DIM, generator=gen) * 2 + 0.25)
        norms.append(norm.to(device, torch.bfloat16))
    ids = torch.randn(text_tokens + image_tokens, 3, generator=gen) * 20
    cos, sin = FluxPosEmbed(theta=10000, axes_dim=[16, 56, 56])(ids)
    return make(image_tokens), make(text_tokens) if text_tokens else None, norms, (cos.to(device), sin.to(device))


def _unfused(x, text, norms, rotary, amax):
    """What the processor computes without the op: diffusers' norm, cat, rotary embedding, then the cast."""
    from diffusers.models.embeddings import apply_rotary_emb

    normed = norms[0](x) if text is None else torch.cat([norms[1](text), norms[0](x)], dim=1)
    return quantize_per_tensor(apply_rotary_emb(normed, rotary, sequence_dim=1), amax)[0]


def _close_in_float8(a8, b8):
    """Elementwise: equal up to rounding. The unfused path rounds the normed values to bf16
    (relative 2^-9 of terms up to 448 in float8 units, carried through the rotation's two terms:
    1.75 absolute) and the rotated ones again (0.875), then both round to e4m3 (relative 2^-4 each,
    half a step either side where the terms cancel to a small value: up to 0.5 each near 8); where
    the terms cancel, that absolute part (< 3.7) dominates. Hypothesis found a case that needs all of
    it (9 against 5.5 at amax 1.57)."""
    a, b = a8.float(), b8.float()
    return (a - b).abs() <= 0.125 * torch.maximum(a.abs(), b.abs()) + 3.75


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([0, 1, 5]), st.integers(1, 19), st.floats(0.05, 20.0))
def test_the_op_is_norm_rotary_and_cast_up_to_the_skipped_bf16_roundings(seed, text_tokens, image_tokens, spread):
    x, text, norms, rotary = _inputs(seed, text_tokens, image_tokens, spread=spread)
    amax = torch.tensor(float(torch.rand(1, generator=torch.Generator().manual_seed(seed))) * 30 + 1)
    out = rms_norm_rope_fp8(x, norms[0].weight, text, norms[1].weight if text is not None else None,
                            *rotary, amax, 1e-6)
    assert out.dtype == FP8 and out.shape == (1, text_tokens + image_tokens, 3, HEAD_DIM)
    unfused = _unfused(x, text, norms, rotary, amax)
    assert bool(_close_in_float8(out, unfused).all())
    assert float((out.float() != unfused.float()).float().mean()) < 0.1  # most values round alike


def test_a_joint_blocks_text_stream_comes_first_with_its_own_norm():
    x, text, norms, rotary = _inputs(0, 4, 6)
    amax = torch.tensor(8.0)
    out = rms_norm_rope_fp8(x, norms[0].weight, text, norms[1].weight, *rotary, amax, 1e-6)
    swapped = rms_norm_rope_fp8(x, norms[1].weight, text, norms[0].weight, *rotary, amax, 1e-6)
    image_only = rms_norm_rope_fp8(x, norms[0].weight, None, None, rotary[0][4:], rotary[1][4:], amax, 1e-6)
    assert torch.equal(out[:, 4:].view(torch.uint8), image_only.view(torch.uint8))
    assert not torch.equal(out[:, :4].view(torch.uint8), swapped[:, :4].view(torch.uint8))


def test_the_fused_processor_stays_within_float8_noise_of_the_unfused_one(monkeypatch):
    import fluxopt_plugins._rms_norm_rope_fp8 as op_module

    pipe = load_model("tiny", device="cpu")
    modules = fp8_attention.flux_attention_modules(pipe.transformer)
    assert all(fp8_attention.fusable_qk(m) for _, m in modules)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms of their own (the tiny model's are all ones): q's and k's bounds differ
        for _, m in modules:
            for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                if getattr(m, name, None) is not None:
                    getattr(m, name).weight.copy_(torch.rand(m.head_dim, generator=gen) * 2 + 0.5)
    calls, op = [], op_module.rms_norm_rope_fp8
    monkeypatch.setattr(op_module, "rms_norm_rope_fp8", lambda *a: calls.append(a[2] is not None) or op(*a))

    def generate(fused):
        for _, module in modules:
            q, k = fp8_attention.qk_bounds(module)
            module.set_processor(fp8_attention.Fp8FluxAttnProcessor("reference", (q, k, torch.tensor(4.0)),
                                                                    fused_qk=fused))
        return pipe("a red fox", num_inference_steps=2, height=64, width=64, max_sequence_length=24,
                    generator=torch.Generator().manual_seed(0), output_type="latent").images

    fused = generate(True)
    joint = sum(m.added_kv_proj_dim is not None for _, m in modules)
    # q and k of every layer at each of the 2 steps; the joint layers with their text stream
    assert len(calls) == 2 * 2 * len(modules) and sum(calls) == 2 * 2 * joint
    calls.clear()
    unfused = generate(False)
    assert calls == []
    # the tiny model runs in fp32 here: no bf16 rounding between the steps to skip
    assert float((fused - unfused).norm() / unfused.norm()) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("text_tokens", [0, 512])
def test_the_triton_kernel_agrees_with_torch_and_runs_compiled_and_in_a_cuda_graph(text_tokens):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    with torch.no_grad():  # inference, as in a stack: the op has no backward
        _check_the_triton_kernel(text_tokens)


def _check_the_triton_kernel(text_tokens):
    x, text, norms, rotary = _inputs(0, text_tokens, 4096, heads=24, spread=3.0, device="cuda")
    amax = torch.tensor(40.0, device="cuda")
    args = (x, norms[0].weight, text, norms[1].weight if text is not None else None, *rotary, amax, 1e-6)
    out = rms_norm_rope_fp8(*args)
    on_cpu = rms_norm_rope_fp8(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    # the same fp32 arithmetic in another order: a rare value rounds the other way
    assert bool(_close_in_float8(out.cpu(), on_cpu).all())
    assert float((out.cpu().float() != on_cpu.float()).float().mean()) < 1e-3
    compiled = torch.compile(lambda *a: rms_norm_rope_fp8(*a), fullgraph=True)
    assert torch.equal(compiled(*args).view(torch.uint8), out.view(torch.uint8))
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rms_norm_rope_fp8(static_x, *args[1:])
    other = torch.randn_like(x)  # not a multiple of x: the norm would undo that
    static_x.copy_(other)
    graph.replay()
    expected = rms_norm_rope_fp8(other, *args[1:])
    assert torch.equal(captured.view(torch.uint8), expected.view(torch.uint8))


def test_a_head_of_zeros_or_of_values_near_epsilon_is_normed_as_torch_norms_it():
    x, text, norms, rotary = _inputs(3, 0, 6)
    x[:, 0] = 0  # a zero head: rsqrt(0 + eps) times 0, not a NaN
    x[:, 1] = x[:, 1] * 1e-3  # mean square ~1e-6, comparable to eps: the epsilon's sign shows
    amax = torch.tensor(4.0)
    out = rms_norm_rope_fp8(x, norms[0].weight, None, None, *rotary, amax, 1e-6)
    assert not torch.isnan(out.float()).any() and bool((out[:, 0].float() == 0).all())
    assert bool(_close_in_float8(out, _unfused(x, None, norms, rotary, amax)).all())


def test_triton_is_used_exactly_where_it_imports():
    import importlib.util

    from fluxopt_plugins._rms_norm_rope_fp8 import triton_available

    assert triton_available() == (importlib.util.find_spec("triton") is not None)
