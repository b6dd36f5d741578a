"""Backend ``fixed_cache``: a step cache on a fixed schedule, decided between steps on the host.

The transformer is computed on the steps of a schedule known before the run (the first
``warmup_steps``, then every ``interval``-th step, and the last ``cooldown_steps``); on the other
steps its output is not computed but predicted from the computed ones: reused as it was
(``order=0``, FORA-style reuse at the level of the whole transformer) or extrapolated linearly in
the scheduler's sigma from the last two (``order=1``, a first-order TaylorSeer at the output).

Why a fixed schedule: the dynamic caches (fbcache, magcache...) decide from the model's own
activations, so on random weights (``flux-dev-random``) they say nothing about speed, and their
decision reads a tensor on the host inside the step, which breaks graphs. This one decides from
the step index alone, outside the transformer's call (``ctx.wrap_transformer_call``), so it
composes with full-graph compile, CUDA graphs, AOTInductor and TensorRT, costs nothing on a
computed step, and skips the same steps on every model: speed is measured at full size on random
weights, and fidelity is judged on the trained flux-mini with the same schedule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fluxopt import Backend, ConfigError, StackContext, Stage, hookimpl
from fluxopt_plugins._cache_probe import STEP_CACHE_GROUP, STEP_CACHE_REASON, ComputeCounter

ORDERS = (0, 1)


@dataclass
class FixedCacheOptions:
    warmup_steps: int = 4  # always computed first: the layout of the image forms in these steps
    interval: int = 2  # afterwards every interval-th step is computed, the others predicted
    cooldown_steps: int = 1  # always computed last (fine detail)
    order: int = 1  # 0: reuse the last computed output; 1: extrapolate it linearly in sigma


def computed_steps(steps: int, options: FixedCacheOptions) -> list[bool]:
    """For each of ``steps`` steps, whether the transformer is computed (True) or predicted."""
    return [i < options.warmup_steps or i >= steps - options.cooldown_steps
            or (i - options.warmup_steps) % options.interval == 0 for i in range(steps)]


def extrapolate(history: list[tuple[float, torch.Tensor]], sigma: float, order: int) -> torch.Tensor:
    """The output predicted at ``sigma`` from the computed ``(sigma, output)`` pairs, newest last."""
    sigma_a, out_a = history[-1]
    if order == 0 or len(history) < 2 or history[-2][0] == sigma_a:
        return out_a
    sigma_b, out_b = history[-2]
    return torch.lerp(out_b, out_a, (sigma - sigma_b) / (sigma_a - sigma_b))


class ScheduledCall:
    """Stands outside the transformer's call: computes it on scheduled steps, predicts it on the
    others. The step comes from the scheduler (``step_index`` is None until the first step of a
    generation), so no tensor is read; calls within one step (true CFG's conditional and
    unconditional passes) keep separate histories."""

    def __init__(self, inner: Callable[..., Any], scheduler: Any, options: FixedCacheOptions):
        self.inner, self.scheduler, self.options = inner, scheduler, options
        self.histories: list[list[tuple[float, torch.Tensor]]] = []
        self.step = -1
        self.timesteps = None  # the scheduler's timesteps of the current generation (set anew for each)
        self.slot = 0
        self.last_computed = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        step = self.scheduler.step_index or 0
        timesteps = self.scheduler.timesteps
        steps = len(timesteps)
        if step != self.step or timesteps is not self.timesteps:  # a new step, or a new generation
            self.step, self.slot, self.timesteps = step, 0, timesteps
        else:
            self.slot += 1
        # No reset between generations is needed: every schedule computes steps warmup_steps - 1 and
        # warmup_steps before its first prediction, and only the last two computed outputs are kept.
        while len(self.histories) <= self.slot:
            self.histories.append([])
        history = self.histories[self.slot]
        sigma = float(self.scheduler.sigmas[step])
        compute = not history or step >= steps or computed_steps(steps, self.options)[step]
        self.last_computed = compute
        if compute:
            result = self.inner(*args, **kwargs)
            sample = result[0] if isinstance(result, tuple) else result.sample
            history.append((sigma, sample))
            del history[:-2]
            return result
        predicted = extrapolate(history, sigma, self.options.order)
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=predicted)
        return (predicted,)


class FixedCacheBackend(Backend):
    name = "fixed_cache"
    description = ("fixed-schedule step cache: compute the transformer on a fixed schedule of steps, reuse or "
                   "extrapolate its output on the others; decided between steps, so it composes with graphs")
    options_class = FixedCacheOptions
    stage = Stage.CACHE
    lossless = False
    between_steps = True
    exclusive_group = STEP_CACHE_GROUP
    exclusive_reason = STEP_CACHE_REASON

    def validate_options(self, options: FixedCacheOptions) -> None:
        if options.warmup_steps < 1:
            raise ConfigError(f"backend.fixed_cache.warmup_steps={options.warmup_steps} must be at least 1 "
                              "(the first step has nothing to reuse)")
        if options.interval < 1:
            raise ConfigError(f"backend.fixed_cache.interval={options.interval} must be at least 1 (1 computes every step)")
        if options.cooldown_steps < 0:
            raise ConfigError(f"backend.fixed_cache.cooldown_steps={options.cooldown_steps} must be >= 0")
        if options.order not in ORDERS:
            raise ConfigError(f"backend.fixed_cache.order={options.order} is not one of {', '.join(map(str, ORDERS))}")

    def apply(self, pipe: Any, options: FixedCacheOptions, ctx: StackContext) -> None:
        if not hasattr(pipe.scheduler, "sigmas") or not hasattr(pipe.scheduler, "step_index"):
            raise ConfigError(f"backend.fixed_cache needs a scheduler with sigmas and step_index "
                              f"(FlowMatchEulerDiscreteScheduler); got {type(pipe.scheduler).__name__}")
        calls: list[ScheduledCall] = []

        def wrap(inner: Callable[..., Any]) -> ScheduledCall:
            calls.append(ScheduledCall(inner, pipe.scheduler, options))
            return calls[-1]

        ctx.wrap_transformer_call("fixed_cache: scheduled transformer call", wrap)
        steps = ctx.shapes.steps
        if steps:
            ctx.stats["fixed_cache"] = {"schedule": "".join("C" if c else "." for c in computed_steps(steps, options))}
        ComputeCounter(pipe, ctx, self.name, decision=lambda: calls[-1].last_computed if calls else True)


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [FixedCacheBackend()]
