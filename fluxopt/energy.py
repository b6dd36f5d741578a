"""Energy drawn by the GPU, from NVML's total-energy counter (millijoules since the driver loaded).

Read before and after each generation and around each phase (build, warm-up, timing), like
optimum-benchmark's energy tracker, so a stack's record holds joules per generated image as raw
samples beside its latency samples. The counter covers the whole board: other work on the same
GPU is counted too. Where NVML or the counter is missing (a CPU, an old driver) the meter reads
None and no energy is recorded.
"""

from __future__ import annotations

from typing import Any


class EnergyMeter:
    """Joules read from the board's cumulative counter; ``read()`` is None where it cannot be read."""

    def __init__(self, cuda_index: int | None):
        self._nvml: Any = None
        self._handle: Any = None
        if cuda_index is None:
            return
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(cuda_index).uuid}")
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)  # Volta and newer; raises where unsupported
        except Exception:  # ImportError, no driver, no counter: no energy, nothing else changes
            return
        self._nvml, self._handle = pynvml, handle

    @property
    def available(self) -> bool:
        return self._handle is not None

    def read(self) -> float | None:
        """The counter in joules (None where unavailable or failing now)."""
        if self._handle is None:
            return None
        try:
            return self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0
        except Exception:
            return None


def spent(before: float | None, after: float | None) -> float | None:
    """Joules between two readings (None if either is missing)."""
    return None if before is None or after is None else max(0.0, after - before)
