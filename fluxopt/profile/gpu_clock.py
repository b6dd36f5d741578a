"""The GPU's SM clock and power while something runs, read from NVML by a sampling thread.

Why: a stack that keeps the GPU busy can run the very same cuBLAS and cuDNN kernels slower than
eager does, because the board reaches its power limit and lowers the clock; the analytic floor
comes from a short matmul burst at full clock and cannot see that. Recording the clock during
the profiled generation and during the burst tells a slow kernel from a slowed-down GPU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# NVML's reasons for running below the maximum clock (nvmlClocksEventReason*): the power limit in
# software (SwPowerCap) and the hardware's own brakes (power brake, thermal and other slowdowns).
POWER_CAP = 0x4
HW_SLOWDOWN = 0x8 | 0x20 | 0x40 | 0x80


def _nvml() -> Any | None:
    """pynvml, initialised, or None where there is no NVML (a CPU machine, no driver)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, driver not loaded
        return None


def _handle(nvml: Any, cuda_index: int) -> Any:
    """NVML's handle of CUDA device ``cuda_index``, found by UUID (NVML's numbering ignores
    CUDA_VISIBLE_DEVICES)."""
    import torch

    return nvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(cuda_index).uuid}")


def _reasons(nvml: Any, handle: Any) -> int:
    read = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons
    return int(read(handle))


@dataclass
class ClockLog:
    """Timed samples (``time.perf_counter()`` seconds, SM MHz, watts, reason bits), and the
    device's maximum clock and enforced power limit (read when sampling ends)."""

    samples: list[tuple[float, float, float, int]] = field(default_factory=list)
    max_mhz: float | None = None
    power_limit_w: float | None = None

    def summary(self, start: float = float("-inf"), end: float = float("inf")) -> dict[str, Any] | None:
        """Means over the samples taken between ``start`` and ``end`` (perf_counter seconds), the
        share held back by the power limit or a hardware slowdown; None without samples there."""
        chosen = [s for s in self.samples if start <= s[0] <= end]
        if not chosen:
            return None
        n = len(chosen)
        return {"samples": n,
                "sm_mhz_mean": round(sum(s[1] for s in chosen) / n, 1),
                "sm_mhz_min": min(s[1] for s in chosen),
                "sm_mhz_max_device": self.max_mhz,
                "power_w_mean": round(sum(s[2] for s in chosen) / n, 1),
                "power_limit_w": self.power_limit_w,
                "power_capped_share": round(sum(1 for s in chosen if s[3] & POWER_CAP) / n, 3),
                "hw_slowdown_share": round(sum(1 for s in chosen if s[3] & HW_SLOWDOWN) / n, 3)}


@contextmanager
def sampled(cuda_index: int = 0, interval_s: float = 0.005) -> Iterator[ClockLog]:
    """Sample the clock from a thread while the block runs (an empty log where NVML is missing)."""
    log = ClockLog()
    nvml = _nvml()
    try:
        handle = _handle(nvml, cuda_index) if nvml is not None else None
    except Exception:
        handle = None
    if handle is None:
        yield log
        return
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                log.samples.append((time.perf_counter(), float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                                    nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, _reasons(nvml, handle)))
            except Exception:  # a query this driver lacks: stop sampling, keep what was read
                return
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, name="fluxopt-gpu-clock", daemon=True)
    thread.start()
    try:
        yield log
    finally:
        stop.set()
        thread.join()
        try:
            log.max_mhz = float(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM))
            log.power_limit_w = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
        except Exception:
            pass
