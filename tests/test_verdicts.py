"""Tests that fail when the verdict machinery breaks: the fidelity gate on degraded but finite
outputs (every metric, both gates, at the threshold), timing against a known injected delay,
and a single timed sample never reported as "± 0"."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from fluxopt import Sample, plugins
from fluxopt.fidelity import evaluate
from fluxopt.measure import PipelineCaller, LatencyStats, measure

LOSSLESS = {"psnr": 30.0, "ssim": 0.95, "latent_rel_l2": 0.05}
LOSSY = {"psnr": 20.0, "ssim": 0.75, "latent_rel_l2": 0.25}


def sample(image: np.ndarray, latents: torch.Tensor) -> Sample:
    return Sample("p", 0, image.astype(np.float32), latents)


@pytest.fixture(scope="module")
def reference() -> list[Sample]:
    rng = np.random.default_rng(0)
    x = np.linspace(0, 1, 64, dtype=np.float32)
    image = np.stack([np.outer(x, x), np.outer(1 - x, x), np.full((64, 64), 0.5, np.float32)], axis=2)
    image = np.clip(image + 0.05 * rng.standard_normal(image.shape), 0, 1)
    return [sample(image, torch.from_numpy(rng.standard_normal((16, 64)).astype(np.float32)))]


def degraded(ref: Sample, image_noise: float, latent_noise: float) -> Sample:
    rng = np.random.default_rng(1)
    image = np.clip(ref.image + image_noise * rng.standard_normal(ref.image.shape), 0, 1)
    latents = ref.latents + latent_noise * ref.latents.norm() / ref.latents.numel() ** 0.5 * torch.from_numpy(
        rng.standard_normal(tuple(ref.latents.shape)).astype(np.float32))
    return sample(image, latents)


@pytest.mark.parametrize("thresholds", [LOSSLESS, LOSSY], ids=["lossless", "lossy"])
def test_identical_outputs_pass_and_clearly_degraded_ones_fail(reference, thresholds):
    metrics = plugins.metrics()
    assert evaluate(reference, reference, metrics, thresholds)["passed"]
    bad = evaluate(reference, [degraded(reference[0], 0.3, 1.0)], metrics, thresholds)
    assert not bad["passed"]
    for name in thresholds:  # each gated metric fails on its own
        assert bad["metrics"][name]["passed"] is False, name
        assert name in bad["reason"]


@pytest.mark.parametrize("name", sorted(LOSSLESS))
def test_each_metric_gates_at_its_threshold(reference, name):
    """Set the threshold exactly at the measured value: it passes; nudge it past: it fails."""
    metrics = plugins.metrics()
    out = [degraded(reference[0], 0.02, 0.02)]
    value = evaluate(reference, out, metrics, {})["metrics"][name]["worst"]
    higher = metrics[name].higher_is_better
    assert evaluate(reference, out, metrics, {name: value})["passed"]
    nudged = value * (1.001 if higher else 0.999)
    result = evaluate(reference, out, metrics, {name: nudged})
    assert not result["passed"] and result["metrics"][name]["passed"] is False


def test_metrics_move_with_the_damage(reference):
    metrics = plugins.metrics()
    small = evaluate(reference, [degraded(reference[0], 0.01, 0.01)], metrics, {})["metrics"]
    large = evaluate(reference, [degraded(reference[0], 0.1, 0.3)], metrics, {})["metrics"]
    assert small["psnr"]["worst"] > large["psnr"]["worst"] + 10
    assert small["ssim"]["worst"] > large["ssim"]["worst"]
    assert small["latent_rel_l2"]["worst"] < large["latent_rel_l2"]["worst"]
    assert 0.25 < large["latent_rel_l2"]["worst"] < 0.35  # 0.3 relative noise, measured as such


def test_prompts_are_compared_pairwise_and_counts_must_match(reference):
    with pytest.raises(ValueError, match="different numbers of samples"):
        evaluate(reference, [], plugins.metrics(), LOSSY)


def test_timing_measures_an_injected_delay():
    """Every transformer call sleeps 100 ms more: the per-step median grows by about that and end
    to end by about steps x that, and warm-up calls are not in the samples. The tolerance widens
    with the noise seen on this machine right now: the baseline is measured before and after, and
    their difference (a loaded CI machine, a tracing mutation tester) is added to the bounds."""
    import fluxopt
    from fluxopt.environment import detect_device
    from fluxopt.shapes import Shapes

    tiny_pipe = fluxopt.load_model("tiny", device="cpu")
    shapes = Shapes(height=64, width=64, steps=4, guidance_scale=3.5, max_sequence_length=64)
    device = detect_device("cpu")

    def run(warmup: int):
        return measure(PipelineCaller(tiny_pipe, shapes, device), ["a circle"], 0, warmup=warmup, iterations=3)

    before = run(warmup=1)
    transformer = tiny_pipe.transformer
    original = transformer.forward

    def slow(*args, **kwargs):
        time.sleep(0.1)
        return original(*args, **kwargs)

    transformer.forward = slow
    try:
        slowed = run(warmup=2)
    finally:
        del transformer.forward
    after = run(warmup=1)
    base_step = (before.step_latency.median + after.step_latency.median) / 2
    base_total = (before.latency.median + after.latency.median) / 2
    step_noise = abs(before.step_latency.median - after.step_latency.median)
    total_noise = abs(before.latency.median - after.latency.median)
    step_delta = slowed.step_latency.median - base_step
    assert abs(step_delta - 0.1) < 0.04 + 2 * step_noise, (step_delta, step_noise)
    total_delta = slowed.latency.median - base_total
    assert abs(total_delta - 4 * 0.1) < 4 * 0.04 + 2 * total_noise, (total_delta, total_noise)
    assert slowed.latency.n == 3 and len(slowed.latency.samples) == 3  # warm-up excluded


def test_one_sample_is_marked_n1_and_never_shows_plus_minus_zero():
    from fluxopt.report.tables import stack_row

    stats = LatencyStats.from_samples([0.5])
    assert stats.n == 1 and stats.std is None
    from fluxopt.record import StackRecord

    row = stack_row(StackRecord(stack="x", backends=["x"], status="ok", latency=stats, speedup=2.0))
    assert "± 0" not in row["latency (s)"] and "n=1" in row["latency (s)"]
    assert "±" not in row["speedup"]


def test_a_degraded_stack_fails_the_run_through_the_cli(tmp_path, plugin_env):
    """End to end: finite but wrong outputs fail the gate, and the run exits 1."""
    from conftest import read_result, run_cli

    proc = run_cli("+backend=fault_degrade", "bench.iterations=1", f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (stack,) = read_result(tmp_path)["stacks"]
    assert stack["status"] == "failed" and stack["phase"] == "fidelity"
    assert stack["reason"].startswith("fidelity: ") and "non-finite" not in stack["reason"]


def test_a_backend_that_changes_the_step_count_is_measured(tiny_pipe):
    """The final latents are those of the last step that ran, whatever the step count: a
    backend that runs fewer steps than asked (a distilled schedule) no longer breaks the
    measurement (it raised KeyError: 'latents')."""
    from fluxopt.environment import detect_device
    from fluxopt.shapes import Shapes

    class FewerSteps:
        def __init__(self, pipe):
            self.pipe = pipe

        def set_progress_bar_config(self, **kwargs):
            self.pipe.set_progress_bar_config(**kwargs)

        def __call__(self, **kwargs):
            return self.pipe(**{**kwargs, "num_inference_steps": 2})

    shapes = Shapes(height=64, width=64, steps=4, guidance_scale=3.5, max_sequence_length=64)
    sample, total, per_step = PipelineCaller(FewerSteps(tiny_pipe), shapes, detect_device("cpu"))("a circle", 0)
    assert sample.latents.shape[0] == 1 and total > 0 and per_step is not None


def test_a_baseline_that_blows_up_fails_the_baseline_not_the_stack(tmp_path):
    """Guidance of 1e36 makes the tiny model's baseline non-finite: the baseline's failure, exit 1,
    with the likely setting named; the stack is not measured, so it is not blamed."""
    from conftest import read_result, run_cli

    proc = run_cli("+backend=fuse_qkv", "bench.guidance_scale=1e36", "bench.iterations=1", "bench.warmup=0",
                   "save_images=false", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = read_result(tmp_path)
    assert data["baseline"]["status"] == "failed" and "non-finite" in data["baseline"]["reason"]
    assert "bench.guidance_scale=1e+36" in data["baseline"]["reason"] and data["stacks"] == []
    assert "baseline: the baseline's outputs are non-finite" in proc.stderr.strip().splitlines()[-1]


def test_a_single_colour_baseline_cannot_be_a_reference():
    from fluxopt.runner import baseline_problem

    flat = Sample("p", 0, np.full((8, 8, 3), 0.5, dtype=np.float32), torch.zeros(1, 4, 4))
    varied = Sample("q", 0, np.random.default_rng(0).random((8, 8, 3), dtype=np.float32), torch.zeros(1, 4, 4))
    assert baseline_problem([varied]) is None
    assert "single colour for prompt(s) ['p']" in baseline_problem([varied, flat])


def test_stacks_measured_twice_with_other_options_read_apart_in_the_table():
    from fluxopt.record import StackRecord
    from fluxopt.report.tables import distinct_names

    def stack(name, kernel, **extra):
        return StackRecord(stack=name, backends=name.split("+"), status="ok",
                           options={"fp8_attention": {"kernel": kernel, "scales": "static"}, **extra})

    stacks = [stack("fp8_attention", "cudnn"), stack("fp8_attention", "fa3"),
              stack("fp8_attention+fixed_cache", "fa3", fixed_cache={})]
    assert distinct_names(stacks) == ["fp8_attention (fp8_attention.kernel=cudnn)",
                                      "fp8_attention (fp8_attention.kernel=fa3)", "fp8_attention+fixed_cache"]


def test_a_stack_requested_twice_and_measured_once_is_listed_as_not_run():
    from fluxopt.record import RunRecord, StackRecord
    from fluxopt.report.tables import not_run

    twice = RunRecord(model={"name": "tiny"}, requested=["fp8_attention", "fp8_attention", "compile"],
                      stacks=[StackRecord(stack="fp8_attention", backends=["fp8_attention"], status="ok")])
    assert not_run(twice) == ["fp8_attention", "compile"]


def test_the_report_names_the_kernel_libraries_a_run_had():
    """Whether mslk (or cuDNN's frontend, FlashAttention-3...) was installed changes which kernels a
    stack ran, so the page lists every tracked package with a version beyond the headline ones."""
    from fluxopt.environment import TRACKED_PACKAGES
    from fluxopt.report.tables import environment_lines

    assert "mslk-cuda" in TRACKED_PACKAGES and "nvidia-cudnn-frontend" in TRACKED_PACKAGES
    env = {"packages": {"torch": "2.11.0", "diffusers": "0.42.1", "mslk-cuda": "1.1.0", "fa3-fwd": None,
                        "torchao": "0.18.0"}}
    assert environment_lines(env)[-1] == "- other packages: mslk-cuda 1.1.0, torchao 0.18.0"
    assert environment_lines({"packages": {"torch": "2.11.0"}})[-1] == "- other packages: none tracked"


def test_the_page_states_the_verdict_the_exit_status_gave():
    """report.md carries the run's verdict from the rule the exit status uses (RunRecord.failures),
    each reason listed; a bake-off's skipped backends are named as skipped, not as failures."""
    from _records import run, stack
    from fluxopt.report.tables import render_run_markdown, verdict_lines

    passing = run([stack("compile", 1.5)])
    assert verdict_lines(passing) == ["Passed (exit status 0): every requested stack ran and passed its gate."]
    skipped = run([stack("compile", 1.5), stack("trt_fp8", None, status="skipped", reason="no TensorRT")])
    assert verdict_lines(skipped) == ["Passed (exit status 0): every requested stack ran and passed its gate, "
                                      "except 1 this machine cannot run (skipped, above)."]
    assert verdict_lines(run([stack("compile", None)], build_only=True))[0].startswith(
        "Passed (exit status 0): every requested stack built.")
    failing = run([stack("compile", 1.5), stack("fbcache", 2.0, psnr=12.0)], complete=False)
    assert failing.failures() and verdict_lines(failing) == [
        "Failed (non-zero exit status), 2 reason(s):", "", *(f"- {why}" for why in failing.failures())]
    page = render_run_markdown(failing)
    assert "## Verdict\nFailed (non-zero exit status), 2 reason(s):\n\n- fbcache: fidelity: " in page
    assert "- the run did not complete (the record was last written before its end)\n" in page
