"""The GPU clock sampler's arithmetic, and its sampling thread driven by a fake NVML."""

from __future__ import annotations

import sys
import time
import types

import pytest

from fluxopt.profile import gpu_clock


def test_summary_means_and_the_share_held_back_by_the_power_limit():
    log = gpu_clock.ClockLog(samples=[(0.0, 1980.0, 400.0, 0), (1.0, 1700.0, 700.0, gpu_clock.POWER_CAP),
                                      (2.0, 1600.0, 690.0, gpu_clock.POWER_CAP | 0x1), (3.0, 1500.0, 650.0, 0x40)],
                             max_mhz=1980.0, power_limit_w=700.0)
    out = log.summary()
    assert out["samples"] == 4
    assert out["sm_mhz_mean"] == pytest.approx(1695.0)
    assert out["sm_mhz_min"] == 1500.0
    assert out["power_w_mean"] == pytest.approx(610.0)
    assert out["power_capped_share"] == pytest.approx(0.5)
    assert out["hw_slowdown_share"] == pytest.approx(0.25)
    assert out["sm_mhz_max_device"] == 1980.0 and out["power_limit_w"] == 700.0
    window = log.summary(0.5, 2.0)  # only the samples taken in a window (the profiled step)
    assert window["samples"] == 2 and window["sm_mhz_mean"] == pytest.approx(1650.0)
    assert window["power_capped_share"] == 1.0 and window["hw_slowdown_share"] == 0.0
    assert log.summary(5.0, 6.0) is None
    assert gpu_clock.ClockLog().summary() is None


class _FakeNvml(types.ModuleType):
    """NVML that reports a clock falling by 100 MHz per read and the power cap from the third read."""

    NVML_CLOCK_SM = 1

    def __init__(self) -> None:
        super().__init__("pynvml")
        self.reads = 0

    def nvmlInit(self) -> None:
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:
        return uuid

    def nvmlDeviceGetClockInfo(self, handle: str, clock: int) -> int:
        self.reads += 1
        return 2000 - 100 * min(self.reads - 1, 5)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 650_000  # milliwatts

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: str) -> int:
        return gpu_clock.POWER_CAP if self.reads >= 3 else 0

    def nvmlDeviceGetMaxClockInfo(self, handle: str, clock: int) -> int:
        return 1980

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: str) -> int:
        return 700_000


def test_the_sampler_reads_nvml_while_the_block_runs(monkeypatch):
    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(gpu_clock, "_handle", lambda nvml, index: "GPU-0")
    before = time.perf_counter()
    with gpu_clock.sampled(0, interval_s=0.001) as log:
        while fake.reads < 8:
            time.sleep(0.001)
    after = time.perf_counter()
    assert len(log.samples) == fake.reads >= 8
    assert all(before <= s[0] <= after for s in log.samples)
    clock = log.summary()
    assert clock["sm_mhz_max_device"] == 1980.0 and clock["power_limit_w"] == 700.0
    assert clock["power_w_mean"] == 650.0
    assert clock["sm_mhz_min"] == 1500.0
    assert clock["power_capped_share"] == pytest.approx((fake.reads - 2) / fake.reads, abs=1e-3)
    # the samples of a window: from the third read on, all capped
    third = log.samples[2][0]
    assert log.summary(third, after)["power_capped_share"] == 1.0


def test_without_nvml_the_sampler_records_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with gpu_clock.sampled(0) as log:
        pass
    assert log.samples == [] and log.summary() is None
