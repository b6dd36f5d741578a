"""The profile ring: with ``bench.profile=true``, one denoising step of the baseline and of every
stack is profiled while it is still built: a trace file, the time per kernel category, and how
close the average step comes to the analytic floor (also at the clock the GPU ran at).
"""

from __future__ import annotations

from fluxopt.hookspecs import hookimpl
from fluxopt.measure import Measured
from fluxopt.profile import steps

# With a step cache, profile this many steps from the middle one and keep the slowest (a computed
# one, when the cache skips at most three steps in a row)
CACHED_STEPS_PROFILED = 4


@hookimpl
def fluxopt_stack_measured(measured: Measured) -> None:
    if not measured.config.bench.profile:
        return
    measured.enter("profile")
    info, shapes, gpu = measured.run_info, measured.shapes, measured.device.is_gpu
    if "step_flops" not in info:  # the baseline comes first: the floor's inputs, once per run
        info["step_flops"] = steps.step_flops(measured.pipe.transformer, shapes)
        info["ceilings_tflops"] = steps.matmul_ceilings() if gpu else {}
    cache = measured.stats.get("cache")
    precision = measured.stats.get("compute_precision", {})  # what the stack computes in fp8
    path = measured.output_dir / "profiles" / f"{measured.label}.json"
    profile = steps.profile_one_step(measured.generate, shapes.steps, gpu, path,
                                     span=CACHED_STEPS_PROFILED if cache else 1)
    profile["trace"] = str(path.relative_to(measured.output_dir))
    profile["floor_ms"] = steps.floor_ms(info["step_flops"], info["ceilings_tflops"], precision)  # one computed step
    profile["average_step_floor_ms"] = steps.average_step_floor_ms(profile["floor_ms"], cache)
    step_s = measured.record.step_latency.median if measured.record.step_latency else None
    profile["pct_of_floor"] = steps.pct_of_floor(profile["average_step_floor_ms"], step_s)
    at_clock = steps.floor_at_clock_ms(profile["average_step_floor_ms"], info["ceilings_tflops"].get("sm_mhz"),
                                       profile["gpu_clock"])
    profile["pct_of_floor_at_clock"] = steps.pct_of_floor(at_clock, step_s)
    measured.record.profile = profile
