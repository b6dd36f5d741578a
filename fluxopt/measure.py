"""Measuring a pipeline: latency (end-to-end and per denoising step), peak memory, and the
outputs (images and final latents) that fidelity is judged on.

Warm-up is excluded from the statistics; GPU work is timed with CUDA events (no host sync
inside the denoising loop), CPU work with ``perf_counter``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from fluxopt.energy import EnergyMeter, spent
from fluxopt.environment import DeviceInfo
from fluxopt.record import LatencyStats, StackRecord
from fluxopt.shapes import Shapes


# Which generations are timed and which give the fidelity outputs; records keep it, so that a run
# is never resumed under another. 1: one untimed call per prompt for the outputs, then the warm-up;
# 2: the outputs are the first timed call of each prompt (see measure).
PROTOCOL = 2


@dataclass
class Sample:
    """One generated output: the image (H, W, 3 floats in [0, 1]) and the final packed latents."""

    prompt: str
    seed: int
    image: np.ndarray
    latents: torch.Tensor


@dataclass
class Measured:
    """The handle ``fluxopt_stack_measured`` gets: a stack (or the baseline) just measured, its
    pipeline still built (see :func:`fluxopt.hookspecs.fluxopt_stack_measured`)."""

    label: str
    record: StackRecord
    pipe: Any
    generate: Callable[[Callable[[int], None] | None], Any]
    shapes: Shapes
    device: DeviceInfo
    output_dir: Path
    config: Any  # fluxopt.config.RunConfig
    stats: dict[str, Any]
    run_info: dict[str, Any]
    enter: Callable[[str], None]


@dataclass
class Measurement:
    first_call_s: float
    latency: LatencyStats
    step_latency: LatencyStats | None
    peak_memory_bytes: int | None
    memory_kind: str
    samples: list[Sample]
    energy_j: list[float] | None = None  # per timed generation (None: no energy counter here)
    warmup_energy_j: float | None = None  # the first calls and the warm-up


class _Clock:
    """Timestamps that are cheap inside the loop: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: DeviceInfo):
        self.gpu = device.is_gpu

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize()

    def mark(self) -> Any:
        if self.gpu:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1000.0 if self.gpu else end - start


class _RssSampler:
    """Peak resident memory of this process while generating (CPU runs), sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.02)

    def __enter__(self) -> _RssSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class PipelineCaller:
    """Calls a FluxPipeline the same way for the baseline and for every stack."""

    def __init__(self, pipe: Any, shapes: Shapes, device: DeviceInfo):
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)  # fluxopt reports its own progress
        self.shapes = shapes
        self.device = device
        self.clock = _Clock(device)

    def __call__(self, prompt: str, seed: int,
                 on_step: Callable[[int], None] | None = None) -> tuple[Sample, float, float | None]:
        """Generate once; return the sample, end-to-end seconds and mean seconds per step.
        ``on_step(i)`` is called after denoising step ``i`` (profiling)."""
        marks: list[Any] = []
        final: dict[str, torch.Tensor] = {}

        def on_step_end(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            marks.append(self.clock.mark())
            final["latents"] = kwargs["latents"]  # a reference only: no copy or sync inside the loop
            if on_step is not None:
                on_step(step)
            return {}

        generator = torch.Generator(device="cpu").manual_seed(seed)
        self.clock.sync()
        start = self.clock.mark()
        with torch.inference_mode():
            out = self.pipe(
                prompt=prompt, height=self.shapes.height, width=self.shapes.width,
                num_inference_steps=self.shapes.steps, guidance_scale=self.shapes.guidance_scale,
                max_sequence_length=self.shapes.max_sequence_length, generator=generator,
                output_type="np", callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents"])
        end = self.clock.mark()
        self.clock.sync()
        total = self.clock.elapsed(start, end)
        per_step = (self.clock.elapsed(marks[0], marks[-1]) / (len(marks) - 1)) if len(marks) > 1 else None
        image = np.asarray(out.images[0], dtype=np.float32)
        if "latents" not in final:
            raise RuntimeError("the pipeline ran no denoising step (no step-end callback was called)")
        return Sample(prompt, seed, image, final["latents"].detach().float().cpu()), total, per_step


def memory_outside_torch() -> int:
    """GPU memory in use that PyTorch's caching allocator does not hold: the CUDA context, and what
    libraries allocate themselves (AOTInductor's copy of the weights, TensorRT engines), which
    ``torch.cuda.max_memory_allocated`` never sees. Read from the driver, so other processes on the
    GPU count too: a difference of two readings in one process is what is meaningful."""
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


# Timed calls before the precision target (bench.target_rse) may stop the timing: a standard error
# estimated from two calls is itself too uncertain to stop on.
MIN_PRECISE_CALLS = 3


def bounded_calls(count: int, minimum: int, max_time_s: float | None,
                  done: Callable[[], bool] | None = None, clock: Callable[[], float] | None = None) -> Iterator[int]:
    """The indices of ``count`` calls, cut short once ``max_time_s`` has passed since the first
    started and at least ``minimum`` have run (pytest-benchmark's max_time): a slow stack costs
    a bounded time, while a fast one still makes every call. ``done`` (asked before each call
    after the first ``minimum``) ends them early when it says the calls so far are enough.
    ``clock`` (default ``time.perf_counter``) lets a replay of recorded calls apply the same rule."""
    clock = clock or time.perf_counter
    started = clock()
    for i in range(count):
        if i >= minimum and max_time_s is not None and clock() - started >= max_time_s:
            return
        if i >= minimum and done is not None and done():
            return
        yield i


def precise_enough(totals: Sequence[float], target_rse: float | None) -> bool:
    """Whether the mean of ``totals`` is known well enough to stop timing: at least
    MIN_PRECISE_CALLS of them, with a relative standard error of the mean (LatencyStats.rse) at or
    below ``target_rse`` (None: never; every planned call runs)."""
    if target_rse is None or len(totals) < MIN_PRECISE_CALLS:
        return False
    rse = LatencyStats.from_samples(totals).rse
    return rse is not None and rse <= target_rse


def measure(gen: PipelineCaller, prompts: Sequence[str], seed: int, warmup: int, iterations: int,
            on_phase: Callable[[str], None] | None = None, meter: EnergyMeter | None = None,
            outside_before: int | None = None, max_time_s: float | None = None,
            target_rse: float | None = None) -> Measurement:
    """``warmup`` untimed calls (the first of them is the first call, lazy compilation and capture
    included), then ``iterations`` timed calls; both cycle over the prompts, prompt ``i`` with seed
    ``seed + i`` (the same inputs for every stack). The fidelity outputs are the first timed call of
    each prompt, so they come from the steady state the timing measures and cost no generation of
    their own; a prompt the timing did not reach gets one untimed call after it. With
    ``max_time_s``, the warm-up stops after one call and the timing after two once each has spent
    that long; with ``target_rse``, the timing stops once :func:`precise_enough` says the mean
    latency is known to that relative standard error. ``on_phase`` is told when the warm-up and
    timing phases start, so a failure can be attributed to one; ``meter`` reads the GPU's energy
    around the warm-up and each timed call (after a sync, so each call's work is done). On a GPU, ``outside_before`` (:func:`memory_outside_torch`
    read before the pipeline was loaded or the stack applied) adds what was allocated outside
    PyTorch's allocator since to the peak."""
    on_phase = on_phase or (lambda name: None)
    meter = meter or EnergyMeter(None)
    if iterations < 1:
        raise ValueError("bench.iterations must be at least 1")

    def call(i: int) -> tuple[Sample, float, float | None]:
        return gen(prompts[i % len(prompts)], seed + i % len(prompts))

    on_phase("warmup")
    if gen.device.is_gpu:
        torch.cuda.reset_peak_memory_stats()
    sampler = _RssSampler() if not gen.device.is_gpu else None
    with sampler if sampler is not None else contextlib.nullcontext():
        warmup_start = meter.read()
        first_call = None
        for i in bounded_calls(warmup, 1, max_time_s):
            _, total, _ = call(i)
            first_call = total if first_call is None else first_call
        on_phase("timing")
        warmup_energy = spent(warmup_start, meter.read())
        totals, steps, energy, samples = [], [], [], []
        for i in bounded_calls(iterations, 2, max_time_s, done=lambda: precise_enough(totals, target_rse)):
            before = meter.read()
            sample, total, per_step = call(i)
            energy.append(spent(before, meter.read()))
            totals.append(total)
            if per_step is not None:
                steps.append(per_step)
            if i < len(prompts):
                samples.append(sample)
        first_call = totals[0] if first_call is None else first_call
        samples += [call(i)[0] for i in range(len(samples), len(prompts))]
    if gen.device.is_gpu and outside_before is not None:
        peak = torch.cuda.max_memory_allocated() + max(0, memory_outside_torch() - outside_before)
        kind = "cuda_max_allocated_and_outside"
    elif gen.device.is_gpu:
        peak, kind = torch.cuda.max_memory_allocated(), "cuda_max_allocated"
    else:
        peak, kind = sampler.peak, "process_peak_rss"
    return Measurement(first_call_s=float(first_call), latency=LatencyStats.from_samples(totals),
                       step_latency=LatencyStats.from_samples(steps) if steps else None,
                       peak_memory_bytes=int(peak), memory_kind=kind, samples=samples,
                       energy_j=None if None in energy else energy, warmup_energy_j=warmup_energy)
