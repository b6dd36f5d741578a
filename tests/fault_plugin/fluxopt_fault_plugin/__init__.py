"""Backends that fail on purpose, each in one phase, installed through an entry point like any
third-party plugin. Used by the fault-tolerance tests."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

from fluxopt import Backend, Requirements, Stage, hookimpl



@dataclass
class FaultOptions:
    after_calls: int = 0  # fail on the transformer call after this many (0: at once)


class RaiseInApply(Backend):
    name = "fault_apply"
    options_class = FaultOptions
    stage = Stage.WEIGHTS

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        raise RuntimeError("fault_apply: injected failure while applying")


class RaiseInBuild(Backend):
    name = "fault_build"
    options_class = FaultOptions
    stage = Stage.WEIGHTS

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        pass

    def build(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        raise ValueError("fault_build: injected failure while building")


def _wrap_forward(pipe: Any, after_calls: int, fail: Any) -> None:
    original = pipe.transformer.forward
    calls = {"n": 0}

    def forward(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        out = original(*args, **kwargs)
        return fail(out) if calls["n"] > after_calls else out

    pipe.transformer.forward = forward


class NanOutput(Backend):
    name = "fault_nan"
    options_class = FaultOptions
    stage = Stage.WEIGHTS
    lossless = False

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        _wrap_forward(pipe, options.after_calls, lambda out: (out[0] * float("nan"),) + tuple(out[1:]))


@dataclass
class DegradeOptions:
    noise: float = 1.0  # relative noise added to every transformer output: finite, but far from the baseline


class DegradedOutput(Backend):
    """Finite but wrong outputs: the fidelity gate, not the NaN check, must catch these."""

    name = "fault_degrade"
    options_class = DegradeOptions
    stage = Stage.WEIGHTS
    lossless = False

    def apply(self, pipe: Any, options: DegradeOptions, ctx: Any) -> None:
        def degrade(out: Any) -> Any:
            sample = out[0]
            noise = torch.randn(sample.shape, generator=torch.Generator().manual_seed(1)).to(sample)
            return (sample + options.noise * sample.std() * noise,) + tuple(out[1:])

        _wrap_forward(pipe, 0, degrade)


class OutOfMemory(Backend):
    name = "fault_oom"
    options_class = FaultOptions
    stage = Stage.WEIGHTS

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        def fail(out: Any) -> Any:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB (injected)")

        _wrap_forward(pipe, options.after_calls, fail)


class NeedsCuda(Backend):
    name = "fault_needs_cuda"
    options_class = FaultOptions
    stage = Stage.WEIGHTS
    requires = Requirements(nvidia=True)

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        raise AssertionError("must never be applied without CUDA")


ALLOW_CRASH_ENV = "FLUXOPT_TEST_ALLOW_CRASH"


class KilledProcess(Backend):
    """The job's process dies (as under the OOM killer): only a launcher that runs jobs in other
    processes can record it and let the rest of the sweep finish."""

    name = "fault_crash"
    options_class = FaultOptions
    stage = Stage.WEIGHTS

    def unmet_requirement(self, options: FaultOptions, device: Any) -> str | None:
        # Only where a test asks for it: a bake-off of every backend must not kill its own process.
        return None if os.environ.get(ALLOW_CRASH_ENV) == "1" else f"kills its process; set {ALLOW_CRASH_ENV}=1"

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class SlowOptions:
    delay_s: float = 0.2  # added to every transformer call
    build_s: float = 0.0  # a build phase ("slow_build") that takes this long


class SlowSteps(Backend):
    """Correct but slow: a stack that is still running when an interrupt test signals it,
    however fast the machine (the tiny model alone can finish in under a second)."""

    name = "fault_slow"
    options_class = SlowOptions
    stage = Stage.WEIGHTS

    def apply(self, pipe: Any, options: SlowOptions, ctx: Any) -> None:
        handle = pipe.transformer.register_forward_pre_hook(lambda module, args: time.sleep(options.delay_s))
        ctx.callback("fault_slow: delay hook", handle.remove)

    def build(self, pipe: Any, options: SlowOptions, ctx: Any) -> None:
        if options.build_s:
            with ctx.timed("slow_build"):
                time.sleep(options.build_s)


STEP_SLEEP_ENV = "FLUXOPT_FAULT_STEP_SLEEP_S"


class Sleepy(Backend):
    """A stack whose speed is set by its environment, not its options: a generation takes
    ``$FLUXOPT_FAULT_STEP_SLEEP_S`` seconds (default 0.03) per transformer call, or its own compute
    time where that is longer. Two runs with different values are the same stack measured on a slower
    or faster "library", which is what ``fluxopt-report compare`` must tell.

    The generation is padded to that floor rather than slowed by it: the tiny model's own compute
    varies twofold between processes on a loaded machine, and a sleep added to it would carry that
    noise into a comparison meant to test the gate, not the machine."""

    name = "fault_sleepy"
    options_class = FaultOptions
    stage = Stage.WEIGHTS

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        delay = float(os.environ.get(STEP_SLEEP_ENV, "0.03"))
        state: dict[str, Any] = {"start": None, "steps": 0}

        def starts(module: Any, args: Any) -> None:  # the first module a generation calls
            if state["start"] is None:
                state["start"] = time.perf_counter()

        def step(module: Any, args: Any) -> None:
            starts(module, args)
            state["steps"] += 1

        def decoded(module: Any, args: Any, output: Any) -> None:  # the last module a generation calls
            if state["start"] is not None:
                time.sleep(max(0.0, state["start"] + state["steps"] * delay - time.perf_counter()))
            state.update(start=None, steps=0)

        handles = [pipe.text_encoder.register_forward_pre_hook(starts),
                   pipe.transformer.register_forward_pre_hook(step),
                   pipe.vae.decoder.register_forward_hook(decoded)]
        for handle in handles:
            ctx.callback("fault_sleepy: delay hook", handle.remove)


class NoisyBuild(Backend):
    """Correct, but its build prints to stdout and stderr the way Inductor's autotuning and Triton's
    benchmarking do (tables written straight to the streams, not through logging)."""

    name = "fault_noisy"
    options_class = FaultOptions
    stage = Stage.WEIGHTS

    def apply(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        pass  # nothing to change: only the build's output is under test

    def build(self, pipe: Any, options: FaultOptions, ctx: Any) -> None:
        import sys

        print("AUTOTUNE mm(4096x3072, 3072x3072) fake table")
        sys.stderr.write("triton: benchmarking fake kernel\n")


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [RaiseInApply(), RaiseInBuild(), NanOutput(), DegradedOutput(), OutOfMemory(), NeedsCuda(), KilledProcess(),
            SlowSteps(), Sleepy(), NoisyBuild()]

