"""Exact values of the numbers a verdict is made of (added after mutation testing found them
unguarded): latency statistics, what a generation passes to the pipeline and records, each
metric on inputs with a known answer, the worst prompt, and the fidelity report's wording."""

from __future__ import annotations

import statistics

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from fluxopt import Sample, plugins
from fluxopt.environment import detect_device
from fluxopt.fidelity import evaluate
from fluxopt_plugins.image_metrics import latent_rel_l2, psnr, ssim
from fluxopt.measure import PipelineCaller, LatencyStats
from fluxopt.shapes import Shapes


def test_latency_statistics_are_exact():
    stats = LatencyStats.from_samples([3.0, 1.0, 2.0, 4.0])
    assert (stats.median, stats.mean, stats.min, stats.max, stats.n) == (2.5, 2.5, 1.0, 4.0, 4)
    assert stats.std == pytest.approx(statistics.stdev([1, 2, 3, 4]))
    assert stats.p90 == pytest.approx(3.7)
    assert stats.samples == [3.0, 1.0, 2.0, 4.0]  # in the order measured
    two = LatencyStats.from_samples([1.0, 3.0])
    assert two.std == pytest.approx(statistics.stdev([1.0, 3.0]))  # two samples have a spread
    one = LatencyStats.from_samples([2.0])
    assert one.std is None and one.n == 1


def test_a_generation_uses_the_requested_shapes_and_records_prompt_and_seed(tiny_pipe):
    shapes = Shapes(height=64, width=32, steps=3, guidance_scale=3.5, max_sequence_length=32)
    sample, total, per_step = PipelineCaller(tiny_pipe, shapes, detect_device("cpu"))("a square", 7)
    assert sample.image.shape == (64, 32, 3) and sample.image.dtype == np.float32
    assert sample.prompt == "a square" and sample.seed == 7
    assert sample.latents.shape[1] == (64 // 16) * (32 // 16)  # packed latent tokens at these shapes
    assert 0 < per_step < total


def test_a_generation_passes_every_setting_to_the_pipeline_and_seeds_it(tiny_pipe, monkeypatch):
    """The same prompt and seed give the same latents for every stack only if the settings and a
    generator seeded with that seed reach the pipeline; fluxopt's own progress replaces diffusers' bar."""
    seen = {}
    pipeline_call = type(tiny_pipe).__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return pipeline_call(self, *args, **kwargs)

    monkeypatch.setattr(type(tiny_pipe), "__call__", spy)
    shapes = Shapes(height=64, width=32, steps=3, guidance_scale=2.5, max_sequence_length=24)
    caller = PipelineCaller(tiny_pipe, shapes, detect_device("cpu"))
    assert tiny_pipe._progress_bar_config.get("disable") is True
    first, again, other = caller("a square", 7)[0], caller("a square", 7)[0], caller("a square", 8)[0]
    assert {k: seen[k] for k in ("prompt", "height", "width", "num_inference_steps", "guidance_scale",
                                 "max_sequence_length", "output_type", "callback_on_step_end_tensor_inputs")} == {
        "prompt": "a square", "height": 64, "width": 32, "num_inference_steps": 3, "guidance_scale": 2.5,
        "max_sequence_length": 24, "output_type": "np", "callback_on_step_end_tensor_inputs": ["latents"]}
    assert seen["generator"].initial_seed() == 8
    assert torch.equal(first.latents, again.latents) and not torch.equal(first.latents, other.latents)


def _sample(image, latents=None, prompt="p"):
    return Sample(prompt=prompt, seed=0, image=image, latents=torch.zeros(1, 4) if latents is None else latents)


def test_psnr_of_a_known_error():
    ref = np.full((8, 8, 3), 0.5, dtype=np.float32)
    assert psnr(_sample(ref), _sample(ref + 0.1)) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01, range 1
    assert psnr(_sample(ref), _sample(ref.copy())) == 100.0


@pytest.mark.parametrize("side", [4, 5, 9, 64])
def test_ssim_uses_the_largest_odd_window_that_fits(side):
    rng = np.random.default_rng(side)
    a, b = rng.random((side, side, 3), dtype=np.float32), rng.random((side, side, 3), dtype=np.float32)
    win = min(7, side if side % 2 else side - 1)
    expected = structural_similarity(a, b, channel_axis=2, data_range=1.0, win_size=win)
    assert ssim(_sample(a), _sample(b)) == pytest.approx(expected, abs=1e-6)  # channel by channel: float32 rounding


def test_latent_error_is_relative_even_for_small_latents():
    a, b = torch.tensor([[0.1, 0.0]]), torch.tensor([[0.2, 0.0]])
    assert latent_rel_l2(_sample(None, a), _sample(None, b)) == pytest.approx(1.0)


def test_worst_prompt_is_the_lowest_psnr_and_the_highest_error_and_wording_names_each_failure():
    ref = np.full((8, 8, 3), 0.5, dtype=np.float32)
    refs = [_sample(ref, torch.ones(1, 4), "a"), _sample(ref, torch.ones(1, 4), "b")]
    outs = [_sample(ref + 0.1, torch.ones(1, 4) * 1.5, "a"), _sample(ref + 0.01, torch.ones(1, 4) * 1.1, "b")]
    metrics = {k: v for k, v in plugins.metrics().items() if k in ("psnr", "latent_rel_l2")}
    report = evaluate(refs, outs, metrics, {"psnr": 30.0, "latent_rel_l2": 0.2})
    assert report["metrics"]["psnr"]["worst"] == pytest.approx(20.0, abs=1e-4)
    assert report["metrics"]["psnr"]["mean"] == pytest.approx(30.0, abs=1e-3)
    assert report["metrics"]["latent_rel_l2"]["worst"] == pytest.approx(0.5)
    assert report["metrics"]["psnr"]["threshold"] == 30.0 and report["metrics"]["psnr"]["higher_is_better"] is True
    assert report["passed"] is False
    assert report["reason"] == "psnr 20 (needs >= 30); latent_rel_l2 0.5 (needs <= 0.2)"


def test_non_finite_latents_alone_fail_the_check():
    ref = np.full((8, 8, 3), 0.5, dtype=np.float32)
    out = _sample(ref.copy(), torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))
    report = evaluate([_sample(ref)], [out], plugins.metrics(), {})
    assert report["passed"] is False and "non-finite" in report["reason"]


def test_cpu_peak_memory_sampler_sees_a_transient_allocation():
    """A 256 MiB buffer that lives 0.2 s and is freed before the sampler stops still raises the
    peak: it is sampled while generating, not read at the end."""
    import time

    import psutil

    from fluxopt.measure import _RssSampler

    with _RssSampler() as sampler:
        start = psutil.Process().memory_info().rss
        buffer = np.ones(256 * 2**20, dtype=np.uint8)
        time.sleep(0.2)
        del buffer
        time.sleep(0.05)
    assert sampler.peak >= start + 200 * 2**20
    assert not sampler._thread.is_alive()
