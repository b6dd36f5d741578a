"""``attention`` with ``kernel=auto``: kernels are timed and checked at the model's attention shape,
a wrong or failing kernel is never chosen, the fastest correct one is, and the choice is undone
on close; on a GPU, every kernel the machine can run is measured at FLUX.1-dev's shape."""

from __future__ import annotations

import time

import pytest
import torch

import fluxopt
from fluxopt.errors import ConfigError
from fluxopt.stack import build_stack


def attention():
    from fluxopt_plugins import attention as module

    return module


def _qkv(shape=(1, 64, 2, 16)):
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(*shape, generator=gen) for _ in range(3))


def _sdpa(q, k, v):  # (batch, tokens, heads, dim) layout, as diffusers' dispatcher takes it
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_wrong_and_failing_kernels_are_recorded_and_never_chosen():
    module = attention()
    q, k, v = _qkv()
    reference = _sdpa(q, k, v)

    def slow_but_right(q, k, v):
        time.sleep(0.05)
        return _sdpa(q, k, v)

    def fails(q, k, v):
        raise RuntimeError("no kernel for this head dim")

    kernels = {"fast_but_wrong": lambda q, k, v: v, "slow_but_right": slow_but_right, "right": _sdpa, "fails": fails}
    results = module.benchmark_kernels(kernels, q, k, v, reference, iterations=3, max_rel_error=1e-3)
    assert results["fast_but_wrong"]["correct"] is False and results["fast_but_wrong"]["rel_error"] > 0.1
    assert results["fails"] == {"correct": False, "error": "RuntimeError: no kernel for this head dim"}
    assert results["slow_but_right"]["ms"] >= 50.0 > results["right"]["ms"]
    assert results["right"]["tflops"] == pytest.approx(
        module.attention_flops(1, 64, 2, 16) / (results["right"]["ms"] * 1e9))
    assert module.fastest_correct(results) == "right"
    assert module.fastest_correct({"fast_but_wrong": results["fast_but_wrong"], "fails": results["fails"]}) is None


def test_auto_on_the_tiny_model_picks_a_measured_kernel_and_close_undoes_it(tiny_pipe):
    processors = tiny_pipe.transformer.attn_processors.values()
    before = [getattr(p, "_attention_backend", None) for p in processors]
    with fluxopt.apply_stack(tiny_pipe, {"attention": {"kernel": "auto", "iterations": 2}},
                             height=64, width=64, steps=2) as applied:
        bench = applied.stats["attention_benchmark"]
        chosen = applied.stats["attention_kernel"]
        config = tiny_pipe.transformer.config
        assert bench["shape"] == [1, 16 + applied.ctx.shapes.max_sequence_length, config.num_attention_heads,
                                  config.attention_head_dim]  # 64x64: (64/16)^2 image tokens + text tokens
        assert set(bench["kernels"]) == {"native", "_native_math"}  # the lossless kernels a CPU can run
        assert all(r["correct"] and r["ms"] > 0 for r in bench["kernels"].values())
        assert chosen == min(bench["kernels"], key=lambda n: bench["kernels"][n]["ms"])
        assert {str(getattr(p, "_attention_backend", None).value) for p in tiny_pipe.transformer.attn_processors.values()} == {chosen}
    assert [getattr(p, "_attention_backend", None) for p in tiny_pipe.transformer.attn_processors.values()] == before


@pytest.mark.parametrize(("options", "message"), [
    ({"kernel": "fastest"}, "is not one of auto, native"),
    ({"kernel": "auto", "max_rel_error": 0}, "max_rel_error=0.0 must be between 0 and 1"),
    ({"kernel": "auto", "iterations": 0}, "iterations=0 must be at least 1"),
])
def test_bad_auto_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        build_stack({"attention": options})


def test_auto_is_lossless_as_it_picks_among_lossless_kernels_only():
    assert build_stack({"attention": {"kernel": "auto"}}).is_lossless() is True
    assert build_stack({"attention": {"kernel": "sage"}}).is_lossless() is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_kernel_this_gpu_runs_is_measured_at_flux_dev_shape():
    """FLUX.1-dev at 1024x1024: 4096 image + 512 text tokens, 24 heads of 128, bf16."""
    from fluxopt import Shapes, StackContext
    from fluxopt.environment import detect_device

    module = attention()
    backend = module.AttentionBackend()

    class Transformer(torch.nn.Linear):
        config = type("Config", (), {"num_attention_heads": 24, "attention_head_dim": 128})()

    pipe = type("Pipe", (), {"transformer": Transformer(1, 1).cuda()})()
    ctx = StackContext(device=detect_device("cuda"), dtype=torch.bfloat16, model=None,
                       shapes=Shapes(height=1024, width=1024, steps=28, guidance_scale=3.5, max_sequence_length=512),
                       cache_dir=__import__("pathlib").Path("/tmp"))
    chosen = backend.choose_kernel(pipe, module.AttentionOptions(kernel="auto"), ctx)
    kernels = ctx.stats["attention_benchmark"]["kernels"]
    assert kernels[chosen]["correct"] and kernels[chosen]["tflops"] > 100
    assert "_native_cudnn" in kernels and "_native_flash" in kernels


def test_attention_flops_count_two_matmuls_of_tokens_squared():
    from fluxopt_plugins.attention import attention_flops

    assert attention_flops(batch=2, tokens=3, heads=5, head_dim=7) == 4.0 * 2 * 5 * 3 * 3 * 7


def test_the_benchmark_judges_correctness_at_the_bound_and_counts_tflops_from_the_median():
    """A kernel exactly at max_rel_error is correct and timed, one past it is neither; TFLOP/s are
    the FLOPs over the median time; a kernel that raises keeps its message's first line."""
    from fluxopt_plugins import attention

    q = k = v = torch.ones(1, 4, 2, 8)
    reference = torch.full((1, 4, 2, 8), 0.01)  # a norm below 1: the error is relative to it
    kernels = {"raises": lambda q, k, v: (_ for _ in ()).throw(RuntimeError("no kernel for this shape\ndetails")),
               "exact": lambda q, k, v: reference.clone(),  # (after a kernel that raised: the others still run)
               "at_bound": lambda q, k, v: reference * 1.25,  # relative L2 error 0.25
               "past_bound": lambda q, k, v: reference * 1.2501}
    results = attention.benchmark_kernels(kernels, q, k, v, reference, iterations=3, max_rel_error=0.25)
    assert results["raises"] == {"correct": False, "error": "RuntimeError: no kernel for this shape"}
    assert results["at_bound"]["correct"] is True and results["at_bound"]["rel_error"] == pytest.approx(0.25)
    assert results["past_bound"]["correct"] is False and results["past_bound"]["ms"] is None
    assert results["past_bound"]["tflops"] is None
    flops = attention.attention_flops(1, 4, 2, 8)
    for name in ("exact", "at_bound"):
        ms = results[name]["ms"]
        assert ms > 0 and results[name]["tflops"] == pytest.approx(flops / (ms * 1e9))
    # only correct, timed kernels compete
    assert attention.fastest_correct({"a": {"correct": False, "ms": 0.1}, "b": {"correct": True, "ms": 0.5},
                                      "c": {"correct": True, "ms": None}}) == "b"


def test_time_ms_is_the_median_of_the_timed_calls(monkeypatch):
    from fluxopt_plugins import attention

    readings = iter([0.0, 0.005, 1.0, 1.001, 2.0, 2.003])  # perf_counter pairs: 5 ms, 1 ms, 3 ms
    monkeypatch.setattr(attention.time, "perf_counter", lambda: next(readings))
    calls = []
    assert attention._time_ms(lambda: calls.append(1), 3, torch.device("cpu")) == pytest.approx(3.0)
    assert len(calls) == 4  # one warm-up call, then three timed


@pytest.mark.parametrize("options, ok", [({"max_rel_error": 0.99}, True), ({"max_rel_error": 1.0}, False),
                                         ({"iterations": 1}, True), ({"iterations": 0}, False)])
def test_auto_option_bounds(options, ok):
    if ok:
        assert build_stack({"attention": {"kernel": "auto", **options}}).names == ["attention"]
    else:
        with pytest.raises(ConfigError, match="backend.attention"):
            build_stack({"attention": {"kernel": "auto", **options}})
