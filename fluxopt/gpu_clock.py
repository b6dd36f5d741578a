"""The GPU's SM clock and power while something runs, read from NVML by a sampling thread.

Why: a stack that keeps the GPU busy can run the very same cuBLAS and cuDNN kernels slower than
eager does, because the board reaches its power limit and lowers the clock; the analytic floor
comes from a short matmul burst at full clock and cannot see that. Recording the clock during
the profiled generation and during the burst tells a slow kernel from a slowed-down GPU.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


def summarize(samples: list[tuple[float, float, int]], max_mhz: float | None,
              power_limit_w: float | None) -> dict[str, Any] | None:
    """(SM MHz, watts, reason bits) samples → means, the share of samples held back by the power
    limit or a hardware slowdown, and the clock the device could reach."""
    if not samples:
        return None
    n = len(samples)
    return {"samples": n,
            "sm_mhz_mean": round(sum(s[0] for s in samples) / n, 1),
            "sm_mhz_min": min(s[0] for s in samples),
            "sm_mhz_max_device": max_mhz,
            "power_w_mean": round(sum(s[1] for s in samples) / n, 1),
            "power_limit_w": power_limit_w,
            "power_capped_share": round(sum(1 for s in samples if s[2] & POWER_CAP) / n, 3),
            "hw_slowdown_share": round(sum(1 for s in samples if s[2] & HW_SLOWDOWN) / n, 3)}


@contextmanager
def sampled(cuda_index: int = 0, interval_s: float = 0.01) -> Iterator[dict[str, Any]]:
    """Sample the clock while the block runs; the yielded dict is filled with ``summarize``'s
    figures on exit (left empty where NVML is missing)."""
    out: dict[str, Any] = {}
    nvml = _nvml()
    if nvml is None:
        yield out
        return
    try:
        handle = _handle(nvml, cuda_index)
    except Exception:
        yield out
        return
    samples: list[tuple[float, float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                samples.append((float(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM)),
                                nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0, _reasons(nvml, handle)))
            except Exception:  # a query this driver lacks: stop sampling, keep what was read
                return
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, name="fluxopt-gpu-clock", daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        try:
            max_mhz = float(nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM))
            limit_w = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0
        except Exception:
            max_mhz = limit_w = None
        out.update(summarize(samples, max_mhz, limit_w) or {})
