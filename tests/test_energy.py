"""Energy per image: NVML's counter read around each timed generation, stored as raw samples
beside the latency samples, with joules per image and average watts derived when read back."""

from __future__ import annotations

import json

import pytest

from _records import run, stack
from fluxopt.energy import EnergyMeter, spent
from fluxopt.measure import PipelineCaller, measure
from fluxopt.record import Energy, UnreadableRecord, read_record, write_record
from fluxopt.report.tables import stack_row
from fluxopt.shapes import Shapes


class FakeMeter(EnergyMeter):
    """A board counter that gains 100 J per reading taken after a generation."""

    def __init__(self) -> None:
        super().__init__(None)
        self.joules = 0.0

    def read(self) -> float:
        self.joules += 50.0
        return self.joules


def test_no_gpu_means_no_energy_and_nothing_else_changes(tiny_pipe):
    from fluxopt.environment import detect_device

    meter = EnergyMeter(None)
    assert not meter.available and meter.read() is None and spent(None, 1.0) is None
    gen = PipelineCaller(tiny_pipe, Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=32),
                    detect_device("cpu"))
    m = measure(gen, ["a cat"], 0, warmup=0, iterations=2, meter=meter)
    assert m.energy_j is None and m.warmup_energy_j is None and m.latency.n == 2


def test_each_timed_generation_has_its_own_energy_sample(tiny_pipe):
    from fluxopt.environment import detect_device

    gen = PipelineCaller(tiny_pipe, Shapes(height=64, width=64, steps=2, guidance_scale=3.5, max_sequence_length=32),
                    detect_device("cpu"))
    m = measure(gen, ["a cat"], 0, warmup=1, iterations=3, meter=FakeMeter())
    assert m.energy_j == [50.0, 50.0, 50.0]  # one reading before and one after each timed call
    assert m.warmup_energy_j == 50.0


def test_joules_per_image_and_watts_are_derived_from_the_samples(tmp_path):
    s = stack("compile", 2.0)
    s.energy = Energy(per_image_j=[300.0, 310.0, 290.0], warmup_j=900.0, build_j=5000.0)
    assert s.energy.median_j == 300.0
    assert s.energy.average_w(s.latency) == pytest.approx(900.0 / sum(s.latency.samples))
    write_record(tmp_path / "result.json", run([s]))
    back = read_record(tmp_path / "result.json").stacks[0]
    assert back.energy == s.energy and not read_record(tmp_path / "result.json").edited
    row = stack_row(back)
    assert row["J/image"] == "300" and row["avg W"] == format(900.0 / sum(s.latency.samples), ".0f")


@pytest.mark.parametrize(("energy", "why"), [
    ({"per_image_j": [1.0, 2.0]}, "2 samples for 3 timed generations"),
    ({"per_image_j": [1.0, -2.0, 3.0]}, "not a list of joules"),
    ({"per_image_j": [1.0, 2.0, 3.0], "watts": 5}, "not an object of per_image_j"),
    ({"per_image_j": [1.0, 2.0, 3.0], "build_j": "lots"}, "build_j is not joules"),
])
def test_energy_of_the_wrong_shape_makes_the_record_unreadable(tmp_path, energy, why):
    path = tmp_path / "result.json"
    write_record(path, run([stack("compile", 2.0)]))
    data = json.loads(path.read_text())
    data["stacks"][0]["energy"] = energy
    path.write_text(json.dumps(data))
    with pytest.raises(UnreadableRecord, match=why):
        read_record(path)


def test_the_summary_plot_has_an_energy_panel_where_energy_was_read(tmp_path):
    from PIL import Image

    from fluxopt.record import Energy
    from fluxopt.report.summary import _plot

    record = run([stack("fp8_max", 2.0), stack("compile", 1.3)])
    _plot([record], tmp_path / "plain.png")
    record.baseline.energy = Energy(per_image_j=[3400.0, 3410.0, 3390.0])
    record.stacks[0].energy = Energy(per_image_j=[1600.0, 1610.0, 1590.0])
    _plot([record], tmp_path / "energy.png")
    plain, energy = Image.open(tmp_path / "plain.png"), Image.open(tmp_path / "energy.png")
    assert energy.width > 1.5 * plain.width  # a second panel: joules per image


def test_gpu_peak_memory_counts_what_libraries_allocate_outside_torch(monkeypatch):
    """AOTInductor's copy of the weights (and TensorRT's engines) is allocated outside PyTorch's
    caching allocator: ``max_memory_allocated`` alone read 3 GiB for aoti on the H200, where the
    transformer's weights are 22 GiB. The driver's reading, less what PyTorch reserves, compared
    with the one before the stack was applied, adds it."""
    import types

    import numpy as np
    import torch

    from fluxopt.measure import Sample, memory_outside_torch

    gib, total = 2**30, 140 * 2**30
    gpu = {"reserved": 12 * gib, "outside": gib // 2}  # the CUDA context
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (total - gpu["reserved"] - gpu["outside"], total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: gpu["reserved"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 10 * gib)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: None)

    class GpuCaller:
        device = types.SimpleNamespace(is_gpu=True)

        def __call__(self, prompt, seed):
            return Sample(prompt, seed, np.zeros((2, 2, 3), np.float32), torch.zeros(1)), 0.1, 0.01

    before = memory_outside_torch()
    assert before == gib // 2
    gpu["outside"] += 3 * gib  # the stack's package, allocated by its own runtime
    m = measure(GpuCaller(), ["a cat"], 0, warmup=0, iterations=1, outside_before=before)
    assert (m.peak_memory_bytes, m.memory_kind) == (13 * gib, "cuda_max_allocated_and_outside")
    gpu["outside"] = gib // 4  # less than before (freed): never subtracted from torch's peak
    assert measure(GpuCaller(), ["a cat"], 0, warmup=0, iterations=1, outside_before=before).peak_memory_bytes == 10 * gib
    m = measure(GpuCaller(), ["a cat"], 0, warmup=0, iterations=1)
    assert (m.peak_memory_bytes, m.memory_kind) == (10 * gib, "cuda_max_allocated")
