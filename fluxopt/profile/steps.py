"""Where one denoising step's time goes: a torch.profiler trace of one step per stack, its
kernels sorted into GEMM, attention, quantize, norm/elementwise and other, the GPU's idle time,
and how close the step is to the hardware's floor.

The floor is analytic: the step's matmul and attention FLOPs (counted with
``torch.utils.flop_counter`` on one eager transformer call at the bench shapes) over the
device's matmul rate measured in the same run, each part at the rate of the precision the stack
computes it in (bf16, or fp8 where the stack's stats say so): attention has no faster floor than the
matmuls it is made of. "% of floor" is floor / measured step time.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fluxopt.profile import gpu_clock
from fluxopt.shapes import Shapes, transformer_inputs

CATEGORIES = ("gemm", "attention", "quantize", "norm_elementwise", "other")
TOP_KERNELS = 15  # the kernels with the most time in the step, by name: what a category's time is made of
KERNEL_NAME_CHARS = 160  # C++ template names run to thousands of characters
_PATTERNS = (
    ("attention", re.compile(r"flash|fmha|attention|attn|sdpa|sage|_efficient_attention|cudnn_mha", re.I)),
    ("gemm", re.compile(r"gemm|matmul|cutlass|xmma|nvjet|cublas|sm90_|_scaled_mm|\bmm\b|aten::(mm|addmm|bmm|"
                        r"linear)$|triton_tem_fused|_mm_|mm_plus|mm$", re.I)),
    ("quantize", re.compile(r"amax|quant|float8|fp8|e4m3|to_copy.*clamp|clamp.*to_copy", re.I)),
    ("norm_elementwise", re.compile(r"triton_|elementwise|vectorized|norm|gelu|silu|add|mul|copy|cat|"
                                    r"reduce|softmax|rotary|rope|unrolled", re.I)),
)


def category(kernel: str) -> str:
    """Inductor names its fused kernels after every op they absorbed ("triton_red_fused__fused_rms_norm_
    _scaled_dot_product_..."): those are norm/elementwise work unless they are a GEMM template or a
    quantization (amax/scale) kernel."""
    if kernel.startswith("triton_"):
        if kernel.startswith("triton_tem"):
            return "gemm"
        return "quantize" if _PATTERNS[2][1].search(kernel) else "norm_elementwise"
    for name, pattern in _PATTERNS:
        if pattern.search(kernel):
            return name
    return "other"


def _union_us(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def breakdown(events: list[tuple[str, float, float, float]], wall_s: float, gpu: bool) -> dict[str, Any]:
    """``events``: (name, own time us, start_us, end_us) of GPU kernels and copies, or of aten ops
    on a CPU (their self time: an op's children are counted under their own names).

    ``device_to_host_copies`` counts the step's copies to the host: each is nearly always one the
    host waits for (``.item()``, ``.cpu()``, a Python branch on a tensor), after which the GPU's
    queue has run dry, so an eager step's idle time usually sits behind them."""
    ms = {c: 0.0 for c in CATEGORIES}
    by_name: dict[str, list[float]] = {}  # name: [ms, launches]
    for name, own, _, _ in events:
        ms[category(name)] += own / 1000.0
        total = by_name.setdefault(name, [0.0, 0])
        total[0] += own / 1000.0
        total[1] += 1
    busy_ms = (_union_us([(s, e) for _, _, s, e in events]) if gpu else sum(e[1] for e in events)) / 1000.0
    top = sorted(by_name.items(), key=lambda item: -item[1][0])[:TOP_KERNELS]
    return {"wall_ms": wall_s * 1000.0, "busy_ms": busy_ms, "kernels": len(events),
            "breakdown_ms": {c: round(v, 3) for c, v in ms.items()},
            "top_kernels": [{"name": name[:KERNEL_NAME_CHARS], "category": category(name), "ms": round(total, 3),
                             "launches": launches} for name, (total, launches) in top],
            "gpu_idle_ms": max(wall_s * 1000.0 - busy_ms, 0.0) if gpu else None,
            "device_to_host_copies": sum(name.startswith("Memcpy DtoH") for name, *_ in events) if gpu else None}


def _events(prof: Any, gpu: bool) -> list[tuple[str, float, float, float]]:
    found = []
    for e in prof.events():
        start, end = float(e.time_range.start), float(e.time_range.end)
        if gpu and e.device_type == torch.autograd.DeviceType.CUDA:
            found.append((e.name, end - start, start, end))
        elif not gpu and e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"):
            found.append((e.name, float(e.self_cpu_time_total), start, end))
    return found


def profile_one_step(run_generation: Callable[[Callable[[int], None]], Any], steps: int, gpu: bool,
                     trace_path: Path, span: int = 1) -> dict[str, Any]:
    """Profile the middle denoising step of one generation. ``run_generation(on_step)`` runs one
    generation and calls ``on_step(i)`` after each step ``i``. Writes the Chrome/Perfetto trace.

    ``span`` > 1 profiles that many consecutive steps from the middle one, each on its own, and
    keeps the slowest: with a step cache the middle step may be a predicted one, whose profile
    would show only the prediction, not where a computed step's time goes."""
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
    target = steps // 2  # the first window runs from the end of step target-1 to the end of step target
    last = min(target + max(span, 1), steps) - 1
    # (wall seconds, step, breakdown, trace file, (start, end) perf_counter): each window's breakdown and
    # trace are taken as it stops; a profiler's kernel timings exported after a later profiler ran come
    # out as zeros (H100)
    windows: list[tuple[float, int, dict[str, Any], str, tuple[float, float]]] = []
    current: dict[str, Any] = {}
    trace_path.parent.mkdir(parents=True, exist_ok=True)

    def sync() -> None:
        if gpu:
            torch.cuda.synchronize()

    def start() -> None:
        sync()
        current["prof"] = torch.profiler.profile(activities=activities)
        current["prof"].start()
        current["start"] = time.perf_counter()

    def stop(step: int) -> None:
        sync()
        end = time.perf_counter()
        wall = end - current["start"]
        prof = current.pop("prof")
        prof.stop()
        fd, tmp = tempfile.mkstemp(prefix=f".{trace_path.name}.", dir=trace_path.parent)
        os.close(fd)
        prof.export_chrome_trace(tmp)
        windows.append((wall, step, breakdown(_events(prof, gpu), wall, gpu), tmp, (current["start"], end)))

    def on_step(i: int) -> None:
        if i == target - 1:
            start()
        elif target <= i <= last and "prof" in current:
            stop(i)
            if i < last:
                start()

    try:
        with gpu_clock.sampled(torch.cuda.current_device() if gpu else 0) as clock:
            if steps < 2:  # one step: profile the whole generation
                start()
                run_generation(lambda i: None)
                stop(0)
            else:
                run_generation(on_step)
        _, step, result, kept, (start_s, end_s) = max(windows, key=lambda w: w[0])
        os.replace(kept, trace_path)
    finally:
        for window in windows:
            Path(window[3]).unlink(missing_ok=True)
    result["step"] = step if steps >= 2 else "all"
    if len(windows) > 1:
        result["steps_profiled"] = [w[1] for w in windows]
    # during the step kept (a generation's mean would count a step cache's idle predicted steps)
    result["gpu_clock"] = clock.summary(start_s, end_s)
    return result


def step_flops(transformer: torch.nn.Module, shapes: Shapes) -> dict[str, float]:
    """Matmul and attention FLOPs of one transformer call at the bench shapes (eager)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(transformer.parameters()).device
    inputs = transformer_inputs(transformer, shapes, device, transformer.dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        transformer(**inputs, return_dict=False)
    gemm = attention = 0.0
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        if "attention" in str(op):
            attention += flops
        else:
            gemm += flops
    return {"gemm": gemm, "attention": attention}


def matmul_ceilings() -> dict[str, Any]:
    """Measured TFLOP/s of a large bf16 matmul (and fp8 with rowwise scales where supported), and
    the SM clock they ran at (``sm_mhz``; absent without NVML)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    with gpu_clock.sampled(torch.cuda.current_device(), interval_s=0.002) as clock:
        rates: dict[str, Any] = {"bf16": _rate(lambda: a @ b, 2 * n ** 3)}
        _fp8_rate(rates, a, b, n)
    summary = clock.summary()
    if summary:
        rates["sm_mhz"] = summary["sm_mhz_mean"]
    return rates


def _fp8_rate(rates: dict[str, Any], a: torch.Tensor, b: torch.Tensor, n: int) -> None:
    if torch.cuda.get_device_capability() >= (8, 9):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = b.to(torch.float8_e4m3fn).t().contiguous().t()  # column-major, as _scaled_mm wants
        scale_a = torch.ones(n, 1, device="cuda")
        scale_b = torch.ones(1, n, device="cuda")
        try:
            rates["fp8"] = _rate(lambda: torch._scaled_mm(a8, b8, scale_a, scale_b, out_dtype=torch.bfloat16),
                                 2 * n ** 3)
        except RuntimeError:
            pass


def _rate(fn: Callable[[], Any], flops: float, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return flops * repeats / (start.elapsed_time(end) / 1000.0) / 1e12


def floor_ms(flops: dict[str, float], ceilings: dict[str, float], precision: dict[str, str]) -> float | None:
    """Analytic floor of one step: GEMM and attention FLOPs each at the measured matmul rate of the
    precision the stack computes them in (``precision``: ``{"gemm": "fp8", "attention": "fp8"}``,
    what backends report as ``stats["compute_precision"]``; bf16 where absent)."""
    bf16 = ceilings.get("bf16")
    if not bf16:
        return None
    rate = {part: ceilings.get("fp8", bf16) if precision.get(part) == "fp8" else bf16 for part in ("gemm", "attention")}
    return (flops["gemm"] / (rate["gemm"] * 1e12) + flops["attention"] / (rate["attention"] * 1e12)) * 1000.0


def average_step_floor_ms(floor: float | None, cache: dict[str, Any] | None) -> float | None:
    """The floor of an average step of a generation: a step cache's predicted steps run no
    transformer, so the floor of one computed step counts only for the computed share
    (``cache``: the stack's ``stats["cache"]``; without counts, every step is computed)."""
    if floor is None:
        return None
    if cache and cache.get("steps") and cache.get("computed_steps") is not None:
        return floor * cache["computed_steps"] / cache["steps"]
    return floor


def floor_at_clock_ms(floor: float | None, ceiling_mhz: float | None, clock: dict[str, Any] | None) -> float | None:
    """The floor at the SM clock the stack actually ran at: the matmul ceilings are measured in a
    short burst at full clock, but a busy H100 sits at its power limit and clocks down, and
    compute-bound kernels slow down in proportion (``clock``: the profile's ``gpu_clock``)."""
    if floor is None or not ceiling_mhz or not clock or not clock.get("sm_mhz_mean"):
        return None
    return floor * ceiling_mhz / clock["sm_mhz_mean"]


def pct_of_floor(floor: float | None, step_s: float | None) -> float | None:
    """How close the measured average step (seconds) is to its floor (ms), in percent."""
    return 100.0 * floor / (step_s * 1000.0) if floor and step_s else None
