"""``attention`` with ``fused_qk``: ``fluxopt::rms_norm_rope`` is diffusers' RMSNorm and rotary
embedding up to the bf16 rounding between them that it (like Inductor) skips; the processors that
call it compute FLUX's attention as diffusers' do, with the kernel the backend chose; closing the
stack puts diffusers' processors back; a stack that a compiled engine would run is refused before
anything loads. On a GPU the Triton kernel agrees with the plain-torch op and runs compiled and
in a CUDA graph."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fluxopt
from fluxopt.errors import ConfigError
from fluxopt.stack import build_stack
from fluxopt_plugins._flux_attn_processor import flux_attention_modules
from fluxopt_plugins._rms_norm_rope_fp8 import rms_norm_rope
from fluxopt_plugins.attention import FusedQKFluxAttnProcessor
from test_rms_norm_rope_fp8 import _inputs


def _unfused(x, text, norms, rotary):
    """What diffusers' processor hands its attention kernel: norm, cat (text first), rotary embedding."""
    from diffusers.models.embeddings import apply_rotary_emb

    normed = norms[0](x) if text is None else torch.cat([norms[1](text), norms[0](x)], dim=1)
    return apply_rotary_emb(normed, rotary, sequence_dim=1)


def _within_bf16_roundings(a, b):
    """Elementwise: the unfused path rounds the normed values to bf16 (relative 2^-9, carried through
    the rotation's two terms) and the result again (2^-9), the op the result only; where the two
    terms cancel, the absolute part (2 x 2^-9 of the largest term) dominates."""
    a, b = a.float(), b.float()
    scale = torch.maximum(a.abs(), b.abs()).amax(dim=-1, keepdim=True)
    return (a - b).abs() <= 2.0**-8 * torch.maximum(a.abs(), b.abs()) + 2.0**-8 * scale


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([0, 1, 5]), st.integers(1, 19), st.floats(0.05, 20.0))
def test_the_op_is_norm_and_rotary_up_to_the_skipped_bf16_rounding(seed, text_tokens, image_tokens, spread):
    x, text, norms, rotary = _inputs(seed, text_tokens, image_tokens, spread=spread)
    out = rms_norm_rope(x, norms[0].weight, text, norms[1].weight if text is not None else None, *rotary, 1e-6)
    assert out.dtype == torch.bfloat16 and out.shape == (1, text_tokens + image_tokens, 3, 128)
    assert out.transpose(1, 2).is_contiguous()  # the layout SDPA's kernels take, so no copy before them
    unfused = _unfused(x, text, norms, rotary)
    assert bool(_within_bf16_roundings(out, unfused).all())
    # about 28 % of values land one bf16 step apart (the extra rounding); a wrong op misses nearly all
    assert float((out != unfused).float().mean()) < 0.4


def test_the_op_in_fp32_is_the_unfused_arithmetic():
    x, text, norms, rotary = _inputs(1, 5, 7)
    x, text = x.float(), text.float()
    norms = [n.float() for n in norms]
    out = rms_norm_rope(x, norms[0].weight, text, norms[1].weight, *rotary, 1e-6)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _unfused(x, text, norms, rotary), rtol=1e-5, atol=1e-5)


def test_the_processors_compute_flux_attention_with_the_chosen_kernel_and_close_restores_diffusers(
        tiny_pipe, monkeypatch):
    import fluxopt_plugins._rms_norm_rope_fp8 as op_module
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    def generate():
        return tiny_pipe("a red fox", num_inference_steps=2, height=64, width=64, max_sequence_length=24,
                         generator=torch.Generator().manual_seed(0), output_type="latent").images

    expected = generate()
    calls, op = [], op_module.rms_norm_rope
    monkeypatch.setattr(op_module, "rms_norm_rope", lambda *a: calls.append(a[2] is not None) or op(*a))
    modules = flux_attention_modules(tiny_pipe.transformer)
    with fluxopt.apply_stack(tiny_pipe, {"attention": {"kernel": "_native_math", "fused_qk": True}},
                             height=64, width=64, steps=2) as applied:
        assert all(type(m.processor) is FusedQKFluxAttnProcessor for _, m in modules)
        assert {str(m.processor._attention_backend.value) for _, m in modules} == {"_native_math"}
        assert any("rms_norm_rope" in change for change in applied.ctx.changes)
        fused = generate()
    joint = sum(m.added_kv_proj_dim is not None for _, m in modules)
    # q and k of every layer at each of the 2 steps; the joint layers with their text stream
    assert len(calls) == 2 * 2 * len(modules) and sum(calls) == 2 * 2 * joint
    # the tiny model runs in fp32 here: no bf16 rounding between the steps to skip
    assert float((fused - expected).norm() / expected.norm()) < 1e-5
    assert all(type(m.processor) is FluxAttnProcessor for _, m in modules)
    assert torch.equal(generate(), expected)


def test_an_attention_mask_reaches_the_kernel_as_in_diffusers(tiny_pipe):
    """FLUX's pipeline passes no mask, but a caller of the processor may: it must mask as diffusers' does."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    module = next(m for _, m in flux_attention_modules(tiny_pipe.transformer) if m.added_kv_proj_dim is not None)
    gen = torch.Generator().manual_seed(0)
    hidden, text = (torch.randn(1, n, module.query_dim, generator=gen) for n in (6, 4))
    ids = torch.randn(10, 3, generator=gen) * 20
    rotary = tiny_pipe.transformer.pos_embed(ids)
    mask = torch.rand(1, 1, 10, 10, generator=gen) > 0.3
    mask[..., 0] = True  # every query sees some key
    fused = FusedQKFluxAttnProcessor()(module, hidden, text, attention_mask=mask, image_rotary_emb=rotary)
    plain = FluxAttnProcessor()(module, hidden, text, attention_mask=mask, image_rotary_emb=rotary)
    unmasked = FluxAttnProcessor()(module, hidden, text, image_rotary_emb=rotary)
    for a, b, c in zip(fused, plain, unmasked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(b, c, atol=1e-3)  # the mask changes the output


@pytest.mark.parametrize("engine", ["aoti", "trt_fp8"])
def test_fused_qk_refuses_a_compiled_engine_before_anything_loads(engine):
    with pytest.raises(ConfigError, match=f"fused_qk=true calls a Python custom op that {engine}'s compiled engine"):
        build_stack({"attention": {"fused_qk": True}, engine: {}})
    build_stack({"attention": {"fused_qk": False}, engine: {}})  # the kernel choice alone composes


def test_fused_qk_refuses_processors_and_norms_it_does_not_know(tiny_pipe):
    from fluxopt_plugins.attention import AttentionBackend

    class Foreign:
        _attention_backend = None
        _parallel_config = None

    class Other(Foreign):
        pass

    modules = flux_attention_modules(tiny_pipe.transformer)
    previous = [m.processor for _, m in modules[:2]]
    modules[0][1].set_processor(Foreign())
    modules[1][1].set_processor(Other())
    try:
        with pytest.raises(ConfigError, match=r"^backend.attention.fused_qk=true replaces FLUX's own attention "
                                              r"processors.*other processors \(Foreign, Other\)$"):
            AttentionBackend.fuse_qk(tiny_pipe)
        assert not any(type(m.processor) is FusedQKFluxAttnProcessor for _, m in modules)
    finally:
        for (_, m), processor in zip(modules, previous):
            m.set_processor(processor)
    norm, modules[2][1].norm_q = modules[2][1].norm_q, torch.nn.LayerNorm(modules[2][1].head_dim)
    try:
        with pytest.raises(ConfigError, match=f"whose q and k norms are RMSNorms; this transformer has other norms "
                                              f"in {modules[2][0]}$"):
            AttentionBackend.fuse_qk(tiny_pipe)
    finally:
        modules[2][1].norm_q = norm


def test_fused_qk_refuses_a_transformer_without_flux_attention():
    from types import SimpleNamespace

    from fluxopt_plugins.attention import AttentionBackend

    with pytest.raises(ConfigError, match="RMSNorms; this transformer has no FLUX attention$"):
        AttentionBackend.fuse_qk(SimpleNamespace(transformer=torch.nn.Linear(2, 2)))


def test_the_swapped_processors_keep_the_kernel_and_parallel_config_diffusers_set(monkeypatch):
    """Context parallelism sets ``_parallel_config`` on the processors it finds: the swap keeps it,
    and each call hands it, with the kernel, to diffusers' dispatcher."""
    import diffusers.models.attention_dispatch as dispatch

    from fluxopt.serving import load_model
    from fluxopt_plugins.attention import AttentionBackend

    tiny_pipe = load_model("tiny", device="cpu")  # its own: the processors are changed
    modules = flux_attention_modules(tiny_pipe.transformer)
    config = object()
    for _, m in modules:
        m.processor._parallel_config, m.processor._attention_backend = config, "_native_math"
    seen = []
    monkeypatch.setattr(dispatch, "dispatch_attention_fn",
                        lambda q, k, v, **kw: seen.append(kw) or torch.zeros_like(q))
    AttentionBackend.fuse_qk(tiny_pipe)
    assert all(m.processor._parallel_config is config and m.processor._attention_backend == "_native_math"
               for _, m in modules)
    module = modules[-1][1]
    hidden = torch.randn(1, 6, module.query_dim)
    rotary = tiny_pipe.transformer.pos_embed(torch.randn(6, 3))
    module.processor(module, hidden, image_rotary_emb=rotary)
    assert seen == [{"attn_mask": None, "backend": "_native_math", "parallel_config": config}]


@pytest.mark.gpu
@pytest.mark.parametrize("text_tokens", [0, 512])
def test_the_triton_kernel_agrees_with_torch_and_runs_compiled_and_in_a_cuda_graph(text_tokens):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("triton")
    with torch.no_grad():
        x, text, norms, rotary = _inputs(0, text_tokens, 4096, heads=24, spread=3.0, device="cuda")
        args = (x, norms[0].weight, text, norms[1].weight if text is not None else None, *rotary, 1e-6)
        out = rms_norm_rope(*args)
        on_cpu = rms_norm_rope(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
        assert out.stride() == on_cpu.stride()  # the layout the fake op promises torch.compile
        # the same fp32 arithmetic in another order: a rare value rounds the other way, by one bf16 step
        assert bool(_within_bf16_roundings(out.cpu(), on_cpu).all())
        assert float((out.cpu() != on_cpu).float().mean()) < 1e-2
        compiled = torch.compile(lambda *a: rms_norm_rope(*a), fullgraph=True)
        assert torch.equal(compiled(*args), out) and compiled(*args).stride() == out.stride()
        static_x = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = rms_norm_rope(static_x, *args[1:])
        other = torch.randn_like(x)
        static_x.copy_(other)
        graph.replay()
        assert torch.equal(captured, rms_norm_rope(other, *args[1:]))
