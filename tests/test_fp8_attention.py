"""``fp8_attention``: the processor is diffusers' FLUX attention up to the kernel, the float8
roundings are the ones documented, the reference kernel runs a whole stack on the CPU (applied,
compiled without graph breaks, undone), bad settings are refused before anything loads; on an
H100, cuDNN's kernel agrees with the reference and composes with compile and CUDA graphs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxopt.serving import apply_stack, load_model
from fluxopt.environment import detect_device
from fluxopt.errors import ConfigError
from fluxopt.stack import build_stack
from fluxopt_plugins import fp8_attention
from fluxopt_plugins._flux_attn_processor import norm_weight_and_eps
from fluxopt_plugins._fp8_attention_kernels import (FP8, FP8_MAX, P_SCALE, attention_fp8, quantize_per_tensor,
                                                    reference_attention)


def _sdpa(q, k, v):  # (batch, tokens, heads, dim), as FLUX's processor holds them
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class ExactProcessor(fp8_attention.Fp8FluxAttnProcessor):
    """The fp8 processor with exact attention: must be diffusers' processor bit for bit."""

    def attend_fp8(self, query, key, value):
        return _sdpa(query, key, value)


def _generate(pipe, max_sequence_length=32):
    return pipe("a red fox", num_inference_steps=2, height=64, width=64, guidance_scale=3.5,
                max_sequence_length=max_sequence_length, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


@pytest.fixture
def fresh_tiny():
    return load_model("tiny", device="cpu")


def test_the_processor_is_diffusers_flux_attention_up_to_the_kernel(fresh_tiny):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    modules = fp8_attention.flux_attention_modules(fresh_tiny.transformer)
    assert modules and all(type(m.processor) is FluxAttnProcessor for _, m in modules)
    # both block kinds: joint (text + image streams) and single
    assert {m.added_kv_proj_dim is None for _, m in modules} == {True, False}
    # 24 text tokens: not the tiny model's width (32), so the text/image split cannot pass by coincidence
    expected = _generate(fresh_tiny, max_sequence_length=24)
    for _, module in modules:
        module.set_processor(ExactProcessor("reference"))
    assert torch.equal(_generate(fresh_tiny, max_sequence_length=24), expected)


def test_the_processor_attends_with_its_fixed_scales_and_observes_the_largest_v():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 40, 2, 16, generator=gen) for _ in range(3))
    amax = (torch.tensor(9.0), torch.tensor(7.0), torch.tensor(5.0))
    processor = fp8_attention.Fp8FluxAttnProcessor("reference", amax)
    assert processor.observe is False and processor.observed_v_amax is None
    fixed = processor.attend_fp8(q, k, v)
    assert torch.equal(fixed, attention_fp8(q, k, v, "reference", amax))
    assert not torch.equal(fixed, attention_fp8(q, k, v, "reference"))  # not each call's own amax
    processor.observe = True
    for scale in (2.0, 5.0, 3.0):  # the largest |v| over every call, not the last one
        processor.attend_fp8(q, k, v * scale)
    assert float(processor.observed_v_amax) == pytest.approx(5.0 * float(v.abs().max()))


@settings(max_examples=40, deadline=None)
@given(st.floats(1e-3, 1e3), st.integers(0, 2**16))
def test_per_tensor_quantization_maps_the_largest_magnitude_to_e4m3s_largest(magnitude, seed):
    x = torch.randn(2, 8, 3, 16, generator=torch.Generator().manual_seed(seed)) * magnitude
    x8, descale = quantize_per_tensor(x)
    assert x8.dtype == FP8 and descale.shape == (1, 1, 1, 1) and descale.dtype == torch.float32
    assert x8.float().abs().max() == FP8_MAX
    assert descale.item() == pytest.approx(x.abs().max().item() / FP8_MAX, rel=1e-6)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values
    normal = x.abs() >= 2.0 ** -6 * descale
    error = (x8.float() * descale - x).abs()
    assert bool((error[normal] <= x.abs()[normal] * 2.0 ** -4 + 1e-12).all())


def test_the_reference_kernel_rounds_only_inputs_and_probabilities():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 96, 2, 32, generator=gen, dtype=torch.bfloat16) for _ in range(3))
    (q8, dq), (k8, dk), (v8, dv) = quantize_per_tensor(q), quantize_per_tensor(k), quantize_per_tensor(v)
    out8 = reference_attention(q8, k8, v8, dq, dk, dv, 1 / math.sqrt(32))
    assert out8.dtype == FP8  # scaled like v: |out| <= max|v|, so it cannot overflow
    out = out8.float() * dv
    exact_on_rounded_inputs = _sdpa(q8.float() * dq, k8.float() * dk, v8.float() * dv)
    exact = _sdpa(q.float(), k.float(), v.float())
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    # rounding the probabilities (scaled by P_SCALE to use e4m3's range) and the output adds a few
    # per cent at most
    assert P_SCALE == FP8_MAX
    assert 1e-4 < rel(out, exact_on_rounded_inputs) < 0.06
    assert rel(out, exact) < 0.12
    assert attention_fp8(q, k, v, "reference").dtype == torch.bfloat16


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**16), st.floats(1e-2, 1e2), st.booleans())
def test_an_rms_norm_bounds_q_and_k_after_the_rotary_embedding(seed, spread, one_hot):
    from diffusers.models.embeddings import apply_rotary_emb

    gen = torch.Generator().manual_seed(seed)
    head_dim = 16
    norm = torch.nn.RMSNorm(head_dim, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(head_dim, generator=gen) * spread)
    x = torch.randn(1, 32, 2, head_dim, generator=gen)
    if one_hot:  # all of a vector's energy in one element: the bound is reached
        x = torch.zeros_like(x).index_fill_(-1, norm.weight.abs().argmax(), 3.0)
    angles = torch.rand(32, head_dim // 2, generator=gen) * 6.3
    cos, sin = (f(angles).repeat_interleave(2, dim=-1) for f in (torch.cos, torch.sin))
    attn = type("Attn", (), {"head_dim": head_dim, "norm_q": norm})()
    bound = fp8_attention.rms_norm_bound(attn, "norm_q")
    out = apply_rotary_emb(norm(x), (cos, sin), sequence_dim=1)
    assert float(out.abs().max()) <= float(bound) * (1 + 1e-5)
    if one_hot:
        assert float(norm(x).abs().max()) == pytest.approx(float(bound), rel=1e-4)


def test_the_bound_of_a_norm_without_weights_is_sqrt_head_dim_and_other_norms_have_none():
    attn = type("Attn", (), {"head_dim": 64, "norm_q": torch.nn.RMSNorm(64, elementwise_affine=False),
                             "norm_k": torch.nn.LayerNorm(64)})()
    assert float(fp8_attention.rms_norm_bound(attn, "norm_q")) == 8.0
    assert fp8_attention.rms_norm_bound(attn, "norm_k") is None  # not an RMSNorm: no bound, dynamic scale
    assert fp8_attention.rms_norm_bound(attn, "norm_q", "norm_k") is None


def test_static_scales_bound_q_and_k_and_calibrate_v_on_their_own_prompts(fresh_tiny, monkeypatch):
    from fluxopt_plugins._calibration import CALIBRATION_PROMPTS

    pipe = fresh_tiny
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # every norm its own weights (the tiny model's are all ones): each one's bound differs
        for _, m in fp8_attention.flux_attention_modules(pipe.transformer):
            for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                if getattr(m, name, None) is not None:
                    getattr(m, name).weight.copy_(torch.rand(m.head_dim, generator=gen) * 3)
    prompts = []
    call = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: (prompts.append((k.get("prompt"),
                        k["generator"].initial_seed())), call(self, *a, **k))[1])
    with apply_stack(pipe, {"fp8_attention": {"kernel": "reference"}}, height=64, width=64, steps=2,
                     max_sequence_length=32, build=False) as applied:
        assert prompts == [(CALIBRATION_PROMPTS[0], 1234), (CALIBRATION_PROMPTS[1], 1235)]
        modules = [m for _, m in fp8_attention.flux_attention_modules(pipe.transformer)]
        for m in modules:
            q_amax, k_amax, v_amax = m.processor.amax
            joint = m.added_kv_proj_dim is not None
            q_weights = torch.cat([m.norm_q.weight, *([m.norm_added_q.weight] if joint else [])])
            assert float(q_amax) == pytest.approx(m.head_dim ** 0.5 * float(q_weights.abs().max()))
            assert float(k_amax) == pytest.approx(m.head_dim ** 0.5 * float(torch.cat(
                [m.norm_k.weight, *([m.norm_added_k.weight] if joint else [])]).abs().max()))
            assert float(v_amax) > 0 and not m.processor.observe and m.processor.observed_v_amax is None
        stats = applied.stats["fp8_attention"]
        assert {k: stats[k] for k in ("kernel", "scales", "layers")} == {"kernel": "reference", "scales": "static",
                                                                          "layers": len(modules)}
        assert applied.stats["compute_precision"] == {"attention": "fp8"}
        for i, name in enumerate(("q", "k", "v")):
            assert stats["amax_range"][name] == [min(float(m.processor.amax[i]) for m in modules),
                                                 max(float(m.processor.amax[i]) for m in modules)]
        assert "calibrate" in applied.stats["build_phases_s"]
        _generate(pipe)
        v_default = [float(m.processor.amax[2]) for m in modules]
    with apply_stack(pipe, {"fp8_attention": {"kernel": "reference", "v_margin": 1.0}}, height=64, width=64, steps=2,
                     max_sequence_length=32, build=False):
        v_seen = [float(m.processor.amax[2]) for _, m in fp8_attention.flux_attention_modules(pipe.transformer)]
    # the default headroom is 4x the largest |v| calibration saw (the same generations, so the same |v|)
    assert v_default == pytest.approx([4 * v for v in v_seen])
    prompts.clear()
    with apply_stack(pipe, {"fp8_attention": {"kernel": "reference", "scales": "dynamic"}}, height=64, width=64,
                     steps=2, max_sequence_length=32, build=False) as applied:
        assert prompts == [] and "amax_range" not in applied.stats["fp8_attention"]  # no calibration
        assert all(m.processor.amax == (None, None, None)
                   for _, m in fp8_attention.flux_attention_modules(pipe.transformer))


def test_v_is_calibrated_once_per_transformer_and_seed_then_loaded_from_the_cache(fresh_tiny, monkeypatch, tmp_path):
    pipe = fresh_tiny
    generations = []
    call = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: (generations.append(k.get("prompt")),
                                                                         call(self, *a, **k))[1])

    def apply(**options):
        generations.clear()
        with apply_stack(pipe, {"fp8_attention": {"kernel": "reference", **options}}, height=64, width=64, steps=2,
                         max_sequence_length=32, build=False, cache_dir=tmp_path) as applied:
            v = [m.processor.amax[2] for _, m in fp8_attention.flux_attention_modules(pipe.transformer)]
            return applied.stats, v, len(generations)

    stats, v_first, runs = apply()
    assert stats["fp8_attention"]["calibration"] == "measured" and runs == 2
    assert stats["artifacts"]["fp8_attention_calibration"]["built"]
    stats, v_again, runs = apply()
    assert stats["fp8_attention"]["calibration"] == "cached" and runs == 0 and "calibrate" not in stats.get(
        "build_phases_s", {})
    assert all(torch.equal(a, b) and a.device == b.device for a, b in zip(v_first, v_again))
    stats, v_margin_1, runs = apply(v_margin=1.0)  # headroom is applied after the cache: still a hit
    assert runs == 0 and [float(v) for v in v_first] == pytest.approx([4 * float(v) for v in v_margin_1])
    assert apply(calibration_seed=7)[0]["fp8_attention"]["calibration"] == "measured"
    with torch.no_grad():  # another transformer (one weight changed): its own calibration
        fp8_attention.flux_attention_modules(pipe.transformer)[0][1].to_v.weight.mul_(2)
    assert apply()[0]["fp8_attention"]["calibration"] == "measured"


@pytest.mark.parametrize("scales", ["static", "dynamic"])
def test_a_reference_stack_is_applied_compiled_without_graph_breaks_and_undone(fresh_tiny, scales):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    pipe = fresh_tiny
    before = _generate(pipe)
    with apply_stack(pipe, {"fp8_attention": {"kernel": "reference", "scales": scales},
                            "compile": {"backend": "eager", "fullgraph": True}},
                     height=64, width=64, steps=2, max_sequence_length=32) as applied:
        layers = len(fp8_attention.flux_attention_modules(pipe.transformer._orig_mod
                                                         if hasattr(pipe.transformer, "_orig_mod")
                                                         else pipe.transformer))
        stats = applied.stats["fp8_attention"]
        assert {k: stats[k] for k in ("kernel", "scales", "layers")} == {"kernel": "reference", "scales": scales,
                                                                          "layers": layers}
        # q and k through the fused op where their scales are fixed (static), never with dynamic ones
        assert stats["fused_qk_layers"] == (layers if scales == "static" else 0)
        assert applied.stats["compute_precision"] == {"attention": "fp8"}
        assert applied.stats["compile"]["fullgraph"]
        lossy = _generate(pipe)
    assert not torch.equal(lossy, before)
    assert float((lossy - before).norm() / before.norm()) < 0.1
    assert all(type(m.processor) is FluxAttnProcessor for _, m in fp8_attention.flux_attention_modules(pipe.transformer))
    assert torch.equal(_generate(pipe), before)


def test_other_attention_processors_are_refused_and_nothing_is_left_behind(fresh_tiny):
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    modules = fp8_attention.flux_attention_modules(fresh_tiny.transformer)
    modules[-1][1].set_processor(ExactProcessor("reference"))
    with pytest.raises(ConfigError, match=r"other processors \(ExactProcessor\)"):
        apply_stack(fresh_tiny, {"fp8_attention": {"kernel": "reference"}}, height=64, width=64, steps=2,
                    max_sequence_length=32, build=False)
    assert [type(m.processor) for _, m in modules] == [FluxAttnProcessor] * (len(modules) - 1) + [ExactProcessor]


def test_the_cudnn_kernels_graphs_are_released_when_its_stack_closes(fresh_tiny, tmp_path):
    """Applied directly (apply_stack refuses the CPU for cuDNN): with dynamic scales apply runs no
    kernel, so its cuDNN branch can run here; the kernel's graph cache is faked as built."""
    from fluxopt import Shapes, StackContext
    from fluxopt_plugins._fp8_attention_kernels import _GRAPHS

    stack = build_stack({"fp8_attention": {"scales": "dynamic"}})
    backend, options = stack.entries[0].backend, stack.entries[0].options
    ctx = StackContext(device=detect_device("cpu"), dtype=torch.float32, model=None, cache_dir=tmp_path,
                       shapes=Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=32))
    backend.apply(fresh_tiny, options, ctx)
    assert ctx.changes == ["fp8_attention: free the cuDNN graphs, their buffers and handles"]
    stats = ctx.stats["fp8_attention"]
    assert stats["kernel"] == "cudnn" and {"cudnn_frontend", "cudnn"} <= set(stats)  # versions, None where absent
    _GRAPHS.graphs[("shape",)] = ("graph", {}, {"workspace": torch.empty(8)})  # as the first call builds it
    ctx.undo()
    assert _GRAPHS.graphs == {} and _GRAPHS.handles == {}


def test_bad_settings_and_conflicts_are_refused_before_loading():
    with pytest.raises(ConfigError, match=r"backend.fp8_attention.kernel='fa4' is not one of cudnn, fa3, reference"):
        build_stack({"fp8_attention": {"kernel": "fa4"}})
    with pytest.raises(ConfigError, match=r"backend.fp8_attention.scales='amax' is not one of static, dynamic"):
        build_stack({"fp8_attention": {"scales": "amax"}})
    with pytest.raises(ConfigError, match=r"backend.fp8_attention.v_margin=0.5 must be at least 1"):
        build_stack({"fp8_attention": {"v_margin": 0.5}})
    with pytest.raises(ConfigError, match=r"backend.fp8_attention.calibration_prompts must be a non-empty list"):
        build_stack({"fp8_attention": {"calibration_prompts": []}})
    build_stack({"fp8_attention": {"scales": "dynamic", "calibration_prompts": []}})  # not used: fine
    for other in ("attention", "aoti"):
        with pytest.raises(ConfigError, match="fp8_attention"):
            build_stack(["fp8_attention", other])
    assert not build_stack(["fp8_attention"]).is_lossless()


def test_the_cudnn_kernel_says_what_it_needs_on_a_cpu():
    cpu = detect_device("cpu")
    unmet = build_stack(["fp8_attention"]).unmet_requirements(cpu)
    assert len(unmet) == 1
    assert ("needs the Python package 'cudnn'" in unmet[0] and "nvidia-cudnn-frontend" in unmet[0]) \
        or "needs an NVIDIA GPU with CUDA; this run is on the CPU" in unmet[0]
    assert build_stack({"fp8_attention": {"kernel": "reference"}}).unmet_requirements(cpu) == []


def test_the_fa3_kernel_says_what_it_needs_and_is_for_hopper_alone():
    import dataclasses

    cpu = detect_device("cpu")
    unmet = build_stack({"fp8_attention": {"kernel": "fa3"}}).unmet_requirements(cpu)
    assert len(unmet) == 1 and ("needs the Python package 'fa3_fwd_interface' (pip install 'fluxopt[fa3]'" in unmet[0]
                                or "needs an NVIDIA GPU with CUDA; this run is on the CPU" in unmet[0])
    requirement = dataclasses.replace(fp8_attention.KERNEL_REQUIREMENTS["fa3"], packages=())
    hopper = dataclasses.replace(cpu, type="cuda", name="H200", capability=(9, 0))
    blackwell = dataclasses.replace(hopper, name="B200", capability=(10, 0))
    assert requirement.unmet(hopper) is None
    assert requirement.unmet(blackwell) == ("needs compute capability <= 9.0 (its kernels are built for no newer "
                                            "one); B200 has 10.0")


def test_fa3s_output_is_taken_as_dequantized_and_its_descales_are_per_batch_and_head(monkeypatch):
    """FlashAttention-3 takes a (batch, heads) fp32 descale and writes bf16 already dequantized,
    where cuDNN's float8 output is scaled like v: both reach the caller as the same attention.
    (Its GPU numerics: test_the_fp8_kernel_agrees_with_the_reference..., on the GPU.)"""
    import sys
    import types

    from fluxopt_plugins._fp8_attention_kernels import reference_attention

    seen = {}

    def fake_forward(q, k, v, *, q_descale, k_descale, v_descale, softmax_scale):
        seen.update(shapes={d.shape for d in (q_descale, k_descale, v_descale)},
                    dtypes={d.dtype for d in (q_descale, k_descale, v_descale)},
                    contiguous=all(d.is_contiguous() for d in (q_descale, k_descale, v_descale)))
        one = lambda d: d[:1, :1].reshape(1, 1, 1, 1)  # noqa: E731
        out8 = reference_attention(q, k, v, one(q_descale), one(k_descale), one(v_descale), softmax_scale)
        return (out8.float() * one(v_descale)).to(torch.bfloat16), None, None, None

    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", types.SimpleNamespace(_flash_attn_forward=fake_forward))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 24, 3, 16, generator=gen, dtype=torch.bfloat16) * 3 for _ in range(3))
    out = attention_fp8(q, k, v, "fa3")
    assert seen == {"shapes": {torch.Size([2, 3])}, "dtypes": {torch.float32}, "contiguous": True}
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, attention_fp8(q, k, v, "reference"), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize(("kernel", "module", "capability"), [("cudnn", "cudnn", None), ("fa3", "fa3_fwd_interface", (9, 0))])
def test_the_fp8_kernel_agrees_with_the_reference_and_runs_compiled_and_in_a_cuda_graph(kernel, module, capability):
    pytest.importorskip(module)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0) \
            or (capability and torch.cuda.get_device_capability() != capability):
        pytest.skip(f"needs an NVIDIA GPU of compute capability {'9.0' if capability else '>= 9.0'}")
    gen = torch.Generator("cuda").manual_seed(0)
    shape = (1, 4608, 24, 128)  # FLUX.1-dev at 1024x1024: 4096 image + 512 text tokens
    q, k, v = (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    reference = attention_fp8(q, k, v, "reference").float()
    exact = _sdpa(q.float(), k.float(), v.float())
    out = attention_fp8(q, k, v, kernel)
    assert out.dtype == torch.bfloat16 and out.shape == shape
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    # the same roundings up to the kernel's tiling of the softmax, which rounds each probability
    # against a running maximum: the two differ by float8 noise (cuDNN: 0.038 on an H100) and are
    # equally far from exact
    assert rel(out, reference) < 0.06
    assert rel(out, exact) < 1.1 * rel(reference, exact)
    compiled = torch.compile(lambda q, k, v: attention_fp8(q, k, v, kernel), fullgraph=True)
    assert rel(compiled(q, k, v), reference) < 0.06
    graph = torch.cuda.CUDAGraph()
    static = [x.clone() for x in (q, k, v)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        attention_fp8(*static, kernel)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        captured = attention_fp8(*static, kernel)
    for x, new in zip(static, (v, q, k)):  # new inputs, same buffers
        x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    assert rel(captured, attention_fp8(v, q, k, "reference").float()) < 0.06
    if kernel == "cudnn":
        from fluxopt_plugins._fp8_attention_kernels import _GRAPHS, release_cudnn_graphs

        assert _GRAPHS.graphs and _GRAPHS.handles
        del graph, captured
        release_cudnn_graphs()  # what a closing stack runs: nothing cuDNN built stays on the GPU
        assert not _GRAPHS.graphs and not _GRAPHS.handles


def test_fused_qk_is_off_on_request_and_where_a_norm_does_not_fit(fresh_tiny):
    pipe = fresh_tiny
    modules = fp8_attention.flux_attention_modules(pipe.transformer)

    def fused(**options):
        with apply_stack(pipe, {"fp8_attention": {"kernel": "reference", **options}}, height=64, width=64, steps=2,
                         max_sequence_length=32, build=False) as applied:
            return ([m.processor.fused_qk for _, m in modules], applied.stats["fp8_attention"]["fused_qk_layers"])

    assert fused() == ([True] * len(modules), len(modules))
    assert fused(fused_qk=False) == ([False] * len(modules), 0)
    joint = next(m for _, m in modules if m.added_kv_proj_dim is not None)
    joint.norm_added_k = torch.nn.LayerNorm(joint.head_dim)  # not an RMSNorm: no bound, no fused op
    flags, count = fused()
    assert count == len(modules) - 1 and flags[[m for _, m in modules].index(joint)] is False


def test_which_norms_the_fused_op_takes():
    pipe = load_model("tiny", device="cpu")
    modules = [m for _, m in fp8_attention.flux_attention_modules(pipe.transformer)]
    joint = next(m for m in modules if m.added_kv_proj_dim is not None)
    single = next(m for m in modules if m.added_kv_proj_dim is None)
    assert fp8_attention.fusable_qk(joint) and fp8_attention.fusable_qk(single)
    joint.norm_added_q = torch.nn.RMSNorm(joint.head_dim, eps=1e-3)  # the text stream's norm counts, with its eps
    assert not fp8_attention.fusable_qk(joint)
    single.norm_k = torch.nn.LayerNorm(single.head_dim, eps=single.norm_q.eps)
    assert not fp8_attention.fusable_qk(single)


def test_a_norm_without_weight_or_epsilon_is_taken_as_torch_applies_it():
    x = torch.randn(1, 3, 2, 16, dtype=torch.bfloat16)
    weight, eps = norm_weight_and_eps(torch.nn.RMSNorm(16, eps=None, elementwise_affine=False), x)
    assert weight.dtype == x.dtype and weight.device == x.device and torch.equal(weight, torch.ones(16, dtype=x.dtype))
    assert eps == torch.finfo(torch.bfloat16).eps
    norm = torch.nn.RMSNorm(16, eps=1e-5)
    weight, eps = norm_weight_and_eps(norm, x)
    assert weight is norm.weight and eps == 1e-5
