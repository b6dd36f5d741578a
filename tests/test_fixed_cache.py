"""The fixed-schedule step cache: its schedule, its prediction, that it computes exactly the
scheduled steps from outside the transformer's call (so it composes with compiled graphs), and
that closing the stack leaves nothing behind."""

from __future__ import annotations

import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxopt import ConfigError, apply_stack
from fluxopt.stack import build_stack
from fluxopt_plugins.fixed_cache import FixedCacheOptions, ScheduledCall, computed_steps, extrapolate

STEPS = 10


@settings(max_examples=200, deadline=None)
@given(steps=st.integers(1, 60), warmup=st.integers(1, 10), interval=st.integers(1, 8), cooldown=st.integers(0, 5))
def test_the_schedule_computes_warmup_cooldown_and_never_skips_more_than_interval_minus_one(steps, warmup, interval,
                                                                                           cooldown):
    schedule = computed_steps(steps, FixedCacheOptions(warmup, interval, cooldown))
    assert len(schedule) == steps
    assert all(schedule[:warmup]) and all(schedule[max(steps - cooldown, 0):])
    # between warm-up and cool-down: exactly the first step, then every interval-th one
    assert [i for i in range(warmup, steps - cooldown) if schedule[i]] == list(range(warmup, steps - cooldown, interval))
    run = longest = 0
    for computed in schedule:
        run = 0 if computed else run + 1
        longest = max(longest, run)
    assert longest <= interval - 1


def test_order_one_is_exact_for_an_output_linear_in_sigma_and_order_zero_reuses():
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    line = {s: a + s * b for s in (1.0, 0.9, 0.75)}
    history = [(1.0, line[1.0]), (0.9, line[0.9])]
    torch.testing.assert_close(extrapolate(history, 0.75, order=1), line[0.75])
    assert extrapolate(history, 0.75, order=0) is line[0.9]
    assert extrapolate(history[-1:], 0.75, order=1) is line[0.9]  # one computed step: nothing to extrapolate


class _Scheduler:
    """What ScheduledCall reads: step_index (None before a generation's first step), timesteps, sigmas."""

    def __init__(self, steps: int):
        self.timesteps = torch.arange(steps)
        self.sigmas = torch.linspace(1, 0, steps + 1)
        self.step_index = None


def test_predicted_steps_extrapolate_in_the_schedulers_sigma_from_this_generation_only():
    """An output linear in sigma is predicted exactly (order 1), from the current generation's
    computed steps, whatever the output type the caller asked for."""
    scheduler = _Scheduler(8)
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    generation = {"offset": 0.0}

    def inner(x, **kwargs):  # positional and keyword arguments reach the transformer unchanged
        assert x == "latents" and kwargs["flag"] == 1
        out = a + b * float(scheduler.sigmas[scheduler.step_index or 0]) + generation["offset"]
        return (out,) if kwargs.get("return_dict") is False else types.SimpleNamespace(sample=out)

    call = ScheduledCall(inner, scheduler, FixedCacheOptions(warmup_steps=1, interval=3, cooldown_steps=0, order=1))
    for offset in (0.0, 100.0):  # a second image: the first image's outputs must not leak into its predictions
        generation["offset"] = offset
        scheduler.step_index = None
        for step in range(8):
            expected = a + b * float(scheduler.sigmas[step]) + offset
            tuple_out = step % 2 == 0
            out = call("latents", flag=1, return_dict=False) if tuple_out else call("latents", flag=1)
            assert isinstance(out, tuple) == tuple_out  # return_dict honoured on predicted steps too
            got = out[0] if tuple_out else out.sample
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
            assert call.last_computed == computed_steps(8, call.options)[step]
            scheduler.step_index = step + 1
    # after a generation the scheduler's index is past the last step: a direct call computes
    out = call("latents", flag=1, return_dict=False)[0]
    assert call.last_computed and out.shape == a.shape


def test_calls_within_one_step_keep_their_own_history_and_a_new_generation_reuses_nothing():
    scheduler = _Scheduler(6)
    seen = []

    def inner(**kwargs):
        seen.append((scheduler.step_index, kwargs["which"]))
        return (torch.full((1,), 100.0 * (kwargs["which"] == "uncond") + len(seen)),)

    call = ScheduledCall(inner, scheduler, FixedCacheOptions(warmup_steps=2, interval=2, cooldown_steps=0, order=0))
    outputs = []
    for generation in range(2):
        scheduler.step_index = None
        for step in range(6):
            outputs.append([call(which=w, return_dict=False)[0].item() for w in ("cond", "uncond")])
            scheduler.step_index = step + 1
    computed = [s or 0 for s, w in seen if w == "cond"]
    assert computed == [0, 1, 2, 4] * 2  # steps 3 and 5 predicted, in both generations
    cond, uncond = zip(*outputs)
    assert cond[3] == cond[2] and uncond[3] == uncond[2] and uncond[3] > 100 > cond[3]  # per-call histories
    assert cond[6] != cond[5]  # the second generation's first step is computed, not reused


def test_one_step_generations_do_not_pile_up_histories():
    """Two one-step generations share step index 0; the new timesteps tell them apart, so the
    second generation's call is its first, not a third call of one step."""
    scheduler = _Scheduler(1)
    call = ScheduledCall(lambda **k: (torch.ones(1),), scheduler, FixedCacheOptions())
    for _ in range(5):
        scheduler.timesteps = torch.arange(1)  # set_timesteps makes new timesteps for each generation
        call(return_dict=False)
    assert len(call.histories) == 1 and call.slot == 0


@pytest.fixture
def fresh_tiny():
    from fluxopt.serving import load_model

    return load_model("tiny", device="cpu")


def _generate(pipe, steps=STEPS):
    return pipe("a red fox", num_inference_steps=steps, height=64, width=64, guidance_scale=3.5,
                max_sequence_length=32, generator=torch.Generator().manual_seed(0), output_type="latent").images


@pytest.mark.parametrize("graph", [None, {"compile": {"backend": "eager", "fullgraph": True, "regional": False}},
                                   {"compile": {"backend": "eager", "regional": True}}],
                         ids=["eager", "wholegraph", "regional"])
def test_only_the_scheduled_steps_run_the_transformer_and_close_restores_it(fresh_tiny, graph):
    pipe = fresh_tiny
    before = _generate(pipe)
    options = {"warmup_steps": 2, "interval": 3, "cooldown_steps": 1, "order": 1}
    expected = sum(computed_steps(STEPS, FixedCacheOptions(**options)))
    block_calls = []
    if graph is None:  # a hook inside a compiled graph would itself recompile it: observe eager blocks only
        handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda m, a: block_calls.append(1))
    with apply_stack(pipe, {"fixed_cache": options, **(graph or {})}, height=64, width=64, steps=STEPS,
                     max_sequence_length=32) as applied:
        scheduled = pipe.transformer._compiled_call_impl  # outermost, around whatever the graph backend made
        assert isinstance(scheduled, ScheduledCall)
        inner, calls = scheduled.inner, []
        scheduled.inner = lambda *a, **k: (calls.append(1), inner(*a, **k))[1]
        block_calls.clear()  # the build's own generation
        cached = _generate(pipe)
        assert len(calls) == expected < STEPS
        assert len(block_calls) == (expected if graph is None else 0)
        cache = applied.stats["cache"]
        assert cache["backend"] == "fixed_cache" and cache["computed_steps"] == expected
        assert cache["skipped_steps"] == STEPS - expected
        assert applied.stats["fixed_cache"]["schedule"] == "".join(
            "C" if c else "." for c in computed_steps(STEPS, FixedCacheOptions(**options)))
        # a graph backend's build runs one generation before the cache is installed: all computed
        assert cache["total"]["computed_steps"] == expected + (STEPS if graph else 0)
        if graph and not graph["compile"]["regional"]:
            assert applied.stats["compile"]["fullgraph"]  # the cache adds no graph break
    if graph is None:
        handle.remove()
    assert not torch.equal(cached, before)  # the skipped steps changed the result...
    assert (cached - before).norm() / before.norm() < 0.5  # ...but predicted it, not garbage
    assert pipe.transformer._compiled_call_impl is None
    torch.testing.assert_close(_generate(pipe), before, rtol=0, atol=0)


def test_it_composes_with_cuda_graphs_where_a_cache_inside_the_step_is_refused():
    build_stack({"fixed_cache": {}, "compile": {"cuda_graphs": True}})
    with pytest.raises(ConfigError, match="cuda_graphs=true"):
        build_stack({"fbcache": {}, "compile": {"cuda_graphs": True}})
    with pytest.raises(ConfigError, match="cannot be combined"):
        build_stack(["fixed_cache", "fbcache"])


@pytest.mark.parametrize("setting, value, allowed", [("warmup_steps", 0, "at least 1"), ("interval", 0, "at least 1"),
                                                     ("cooldown_steps", -1, ">= 0"), ("order", 2, "one of 0, 1")])
def test_bad_options_are_refused_naming_the_setting(setting, value, allowed):
    with pytest.raises(ConfigError, match=f"backend.fixed_cache.{setting}={value} .*{allowed}"):
        build_stack({"fixed_cache": {setting: value}})


def test_the_smallest_allowed_values_are_accepted():
    build_stack({"fixed_cache": {"warmup_steps": 1, "interval": 1, "cooldown_steps": 0, "order": 0}})


def test_a_scheduler_without_sigmas_is_refused(fresh_tiny):
    from diffusers import DDIMScheduler

    pipe = fresh_tiny
    for has_sigmas in (False, True):  # either attribute missing is refused
        pipe.scheduler = DDIMScheduler()
        if has_sigmas:
            pipe.scheduler.sigmas = torch.ones(5)
        with pytest.raises(ConfigError, match="needs a scheduler with sigmas and step_index.*got DDIMScheduler"):
            apply_stack(pipe, "fixed_cache", height=64, width=64, steps=4, max_sequence_length=32, build=False)
