"""Calibrations kept in the artifact cache: a static fp8 backend calibrated once per transformer,
prompts and seed loads its statistics in later builds and computes exactly what the measured
ones gave; an entry whose content does not fit is not trusted."""

from __future__ import annotations

import math

import pytest
import torch

from fluxopt import Shapes, StackContext
from fluxopt.serving import load_model
from fluxopt.environment import detect_device
from fluxopt.snapshot import PipelineSnapshot
from fluxopt.stack import build_stack
from fluxopt_plugins._calibration import cached_calibration

SHAPES = Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=32)


def _context(cache_dir):
    return StackContext(device=detect_device("cpu"), dtype=torch.float32, model=None, cache_dir=cache_dir,
                        shapes=SHAPES)


def _generate(pipe):
    return pipe("a red fox", num_inference_steps=2, height=64, width=64, max_sequence_length=32,
                generator=torch.Generator().manual_seed(0), output_type="latent").images


def test_torchao_static_scales_loaded_from_the_cache_compute_what_measured_ones_did(monkeypatch, tmp_path):
    """Applied directly (apply_stack refuses the CPU for float8 linears; torchao runs them here)."""
    pipe = load_model("tiny", device="cpu")
    entry = build_stack({"torchao_fp8_static": {}}).entries[0]
    generations = []
    call = type(pipe).__call__
    monkeypatch.setattr(type(pipe), "__call__", lambda self, *a, **k: (generations.append(k.get("prompt")),
                                                                         call(self, *a, **k))[1])
    snapshot = PipelineSnapshot(pipe)
    results = []
    for _ in range(2):
        ctx = _context(tmp_path)
        generations.clear()
        entry.backend.apply(pipe, entry.options, ctx)
        results.append((ctx.stats, len(generations), _generate(pipe)))
        snapshot.restore()
    (measured_stats, measured_runs, measured), (cached_stats, cached_runs, cached) = results
    assert (measured_runs, cached_runs) == (len(entry.options.calibration_prompts), 0)
    assert measured_stats["torchao_fp8_static"]["calibration"] == "measured"
    assert "calibrate" in measured_stats["build_phases_s"]
    assert cached_stats["torchao_fp8_static"]["calibration"] == "cached"
    assert "calibrate" not in cached_stats["build_phases_s"]
    assert torch.equal(cached, measured)  # the same activation scales, to the bit


def test_an_entry_that_does_not_fit_is_calibrated_again(tmp_path, caplog):
    runs = []

    def calibrate(values):
        def run():
            runs.append(values)
            return {name: torch.tensor(value) for name, value in values.items()}
        return run

    ctx = _context(tmp_path)
    key = {"what": "test"}
    assert cached_calibration(ctx, "probe", key, ["a"], calibrate({"a": 2.0})) == ({"a": torch.tensor(2.0)}, False)
    loaded, cached = cached_calibration(ctx, "probe", key, ["a"], calibrate({"a": 3.0}))
    assert cached and float(loaded["a"]) == 2.0 and len(runs) == 1
    # another set of layers under the same key: not trusted, measured again (not stored over the entry)
    assert cached_calibration(ctx, "probe", key, ["a", "b"], calibrate({"a": 1.0, "b": 1.0}))[1] is False
    assert "probe: the cached calibration does not fit" in caplog.text and len(runs) == 2
    other = {"what": "nan"}
    cached_calibration(ctx, "probe", other, ["a"], calibrate({"a": math.nan}))
    values, cached = cached_calibration(ctx, "probe", other, ["a"], calibrate({"a": 5.0}))
    assert not cached and float(values["a"]) == 5.0


@pytest.mark.parametrize("changed", ["prompts", "seed"])
def test_the_key_holds_prompts_seed_and_the_transformer(changed, tmp_path):
    from fluxopt_plugins._calibration import calibration_key

    pipe = load_model("tiny", device="cpu")
    ctx = _context(tmp_path)
    base = calibration_key(pipe, ctx, "fp8_attention", ["a"], 1)
    other = calibration_key(pipe, ctx, "fp8_attention", ["b"] if changed == "prompts" else ["a"],
                            2 if changed == "seed" else 1)
    assert base != other
    with torch.no_grad():
        pipe.transformer.proj_out.weight.mul_(2)
    assert calibration_key(pipe, ctx, "fp8_attention", ["a"], 1)["transformer"] != base["transformer"]


def test_the_key_holds_the_options_of_the_backends_applied_before_only(tmp_path):
    from fluxopt_plugins._calibration import calibration_key

    pipe = load_model("tiny", device="cpu")

    def key(static_seed, compile_mode):
        ctx = _context(tmp_path)
        ctx.stack = build_stack({"torchao_fp8_static": {"calibration_seed": static_seed}, "fp8_attention": {},
                                 "compile": {"mode": compile_mode}})
        return calibration_key(pipe, ctx, "fp8_attention", ["a"], 1)

    base = key(1, "default")
    assert base["applied_before"]["torchao_fp8_static"]["calibration_seed"] == 1
    assert set(base["applied_before"]) == {"torchao_fp8_static"}
    assert key(2, "default") != base  # an earlier backend's options shape what is calibrated
    assert key(1, "max-autotune") == base  # a later one's do not


def test_calibration_generates_at_the_stacks_shapes_with_its_seeds():
    from fluxopt_plugins._calibration import run_calibration

    calls = []

    class Pipe:
        def __call__(self, **kwargs):
            calls.append({**kwargs, "generator": (kwargs["generator"].device.type, kwargs["generator"].initial_seed()),
                          "inference": torch.is_inference_mode_enabled()})

    shapes = Shapes(height=48, width=80, steps=3, guidance_scale=2.5, max_sequence_length=24)
    run_calibration(Pipe(), ["p", "q"], 10, shapes)
    common = {"height": 48, "width": 80, "num_inference_steps": 3, "guidance_scale": 2.5, "max_sequence_length": 24,
              "output_type": "latent", "inference": True}
    assert calls == [{"prompt": "p", "generator": ("cpu", 10), **common}, {"prompt": "q", "generator": ("cpu", 11), **common}]
