"""The other diffusers 0.42 step-cache hooks, each its own backend (stage CACHE, lossy).

``taylorseer`` (TaylorSeerCacheConfig), ``magcache`` (MagCacheConfig), ``fastercache``
(FasterCacheConfig), ``pab`` (PyramidAttentionBroadcastConfig) and ``seacache`` (SeaCacheConfig),
all enabled with ``pipe.transformer.enable_cache``. Like ``fbcache`` they report what actually
ran in ``stats["cache"]``: transformer steps computed vs skipped, and for the attention-level
caches (taylorseer, fastercache, pab) attention calls computed vs reused.

Limitations, stated rather than hidden:

* magcache needs per-checkpoint magnitude ratios. ``mag_ratios=null`` uses diffusers'
  ``FLUX_MAG_RATIOS`` (calibrated on FLUX.1-dev/schnell); on other weights (the tiny and
  random models) they are not a calibration, so skipping there says nothing about quality.
  ``calibrate=true`` skips nothing and makes diffusers print the ratios of this model.
* fastercache must compute the first step: its timestep range must end at or below 1000
  (FLUX's first timestep), else diffusers fails with an empty cache.
* seacache has no built-in FLUX adapter in diffusers (without one it silently runs every
  step, "fail-open"); this backend supplies the adapter: it unpacks FLUX's 2x2-patch
  latent tokens back into a (C, 1, H, W) latent image, which is what SeaCache filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from fluxopt import DTYPES, Backend, ConfigError, StackContext, Stage, hookimpl
from fluxopt_plugins._cache_probe import STEP_CACHE_GROUP, STEP_CACHE_REASON, ComputeCounter, graph_follows

FLUX_FIRST_TIMESTEP = 1000  # sigma = 1 at the first step, times the scheduler's 1000 train steps


def _range(name: str, value: list[float]) -> tuple[float, float]:
    if len(value) != 2 or value[0] >= value[1]:
        raise ConfigError(f"{name} must be [low, high] with low < high (got {list(value)})")
    return float(value[0]), float(value[1])


class _StepCache(Backend):
    stage = Stage.CACHE
    lossless = False
    exclusive_group = STEP_CACHE_GROUP
    exclusive_reason = STEP_CACHE_REASON
    count_attention = False

    def config(self, pipe: Any, options: Any, ctx: StackContext) -> Any:
        raise NotImplementedError

    def apply(self, pipe: Any, options: Any, ctx: StackContext) -> None:
        ComputeCounter(pipe, ctx, self.name, count_attention=self.count_attention,
                       blind=graph_follows(ctx))
        pipe.transformer.enable_cache(self.config(pipe, options, ctx))
        ctx.note(f"{self.name}: diffusers' cache hooks on the transformer")


# ---------------------------------------------------------------------------- TaylorSeer
@dataclass
class TaylorSeerOptions:
    cache_interval: int = 5  # full computation every N steps, Taylor prediction in between
    disable_cache_before_step: int = 3  # always compute the first steps (to fit the series)
    disable_cache_after_step: Optional[int] = None  # always compute from this step on
    max_order: int = 1  # order of the Taylor expansion
    taylor_factors_dtype: str = "bfloat16"  # bfloat16 | float16 | float32
    use_lite_mode: bool = False  # diffusers' low-memory preset of skipped/cached modules


class TaylorSeerBackend(_StepCache):
    name = "taylorseer"
    description = "TaylorSeer: predict attention outputs with a Taylor series between full steps (diffusers hook)"
    options_class = TaylorSeerOptions
    count_attention = True

    def validate_options(self, options: TaylorSeerOptions) -> None:
        if options.cache_interval < 1 or options.max_order < 0 or options.disable_cache_before_step < 0:
            raise ConfigError("backend.taylorseer: cache_interval >= 1, max_order >= 0 and "
                              "disable_cache_before_step >= 0 are required")
        if options.taylor_factors_dtype not in DTYPES:
            raise ConfigError(f"backend.taylorseer.taylor_factors_dtype={options.taylor_factors_dtype!r} "
                              f"is not one of {', '.join(DTYPES)}")

    def config(self, pipe: Any, options: TaylorSeerOptions, ctx: StackContext) -> Any:
        from diffusers.hooks import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(
            cache_interval=options.cache_interval, disable_cache_before_step=options.disable_cache_before_step,
            disable_cache_after_step=options.disable_cache_after_step, max_order=options.max_order,
            taylor_factors_dtype=DTYPES[options.taylor_factors_dtype], use_lite_mode=options.use_lite_mode)


# ---------------------------------------------------------------------------- MagCache
@dataclass
class MagCacheOptions:
    threshold: float = 0.06  # accumulated magnitude error allowed before recomputing
    max_skip_steps: int = 3  # at most this many consecutive skipped steps
    retention_ratio: float = 0.2  # fraction of initial steps never skipped
    mag_ratios: Optional[list[float]] = None  # None: diffusers' FLUX_MAG_RATIOS (FLUX.1-dev calibration)
    calibrate: bool = False  # skip nothing; diffusers prints this model's ratios after each generation


class MagCacheBackend(_StepCache):
    name = "magcache"
    description = "MagCache: skip transformer steps while the calibrated residual-magnitude ratio stays flat (diffusers hook)"
    options_class = MagCacheOptions

    def validate_options(self, options: MagCacheOptions) -> None:
        if options.threshold < 0 or options.max_skip_steps < 0 or not 0 <= options.retention_ratio <= 1:
            raise ConfigError("backend.magcache: threshold >= 0, max_skip_steps >= 0 and "
                              "0 <= retention_ratio <= 1 are required")
        if options.mag_ratios is not None and len(options.mag_ratios) < 2:
            raise ConfigError("backend.magcache.mag_ratios needs one ratio per step (at least 2); "
                              "run with backend.magcache.calibrate=true to measure them")

    def config(self, pipe: Any, options: MagCacheOptions, ctx: StackContext) -> Any:
        from diffusers.hooks import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        ratios = FLUX_MAG_RATIOS if options.mag_ratios is None else torch.tensor(options.mag_ratios)
        ctx.stats["magcache_ratios"] = ("diffusers FLUX_MAG_RATIOS (calibrated on FLUX.1-dev)"
                                        if options.mag_ratios is None else "user-supplied")
        if options.calibrate:
            ratios = None
        # The ratios are interpolated to the number of steps the bench runs.
        return MagCacheConfig(threshold=options.threshold, max_skip_steps=options.max_skip_steps,
                              retention_ratio=options.retention_ratio, num_inference_steps=ctx.shapes.steps,
                              mag_ratios=ratios, calibrate=options.calibrate)


# ---------------------------------------------------------------------------- FasterCache
@dataclass
class FasterCacheOptions:
    spatial_attention_block_skip_range: int = 2  # compute attention every N calls, extrapolate between
    spatial_attention_timestep_skip_range: list[float] = (-1.0, 681.0)  # type: ignore[assignment]
    attention_weight: float = 0.5  # weight of the extrapolated difference between cached outputs
    is_guidance_distilled: bool = True  # FLUX.1 dev/schnell: no unconditional branch to skip


class FasterCacheBackend(_StepCache):
    name = "fastercache"
    description = "FasterCache: reuse and extrapolate attention outputs on alternate steps (diffusers hook)"
    options_class = FasterCacheOptions
    count_attention = True

    def validate_options(self, options: FasterCacheOptions) -> None:
        low, high = _range("backend.fastercache.spatial_attention_timestep_skip_range",
                           options.spatial_attention_timestep_skip_range)
        if high > FLUX_FIRST_TIMESTEP:
            raise ConfigError("backend.fastercache.spatial_attention_timestep_skip_range must end at or below "
                              f"{FLUX_FIRST_TIMESTEP}: FasterCache must compute FLUX's first step (t=1000) "
                              "to have something to reuse")
        if options.spatial_attention_block_skip_range < 2:
            raise ConfigError("backend.fastercache.spatial_attention_block_skip_range must be >= 2")

    def config(self, pipe: Any, options: FasterCacheOptions, ctx: StackContext) -> Any:
        from diffusers.hooks import FasterCacheConfig

        weight = options.attention_weight
        return FasterCacheConfig(
            spatial_attention_block_skip_range=options.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=tuple(options.spatial_attention_timestep_skip_range),
            attention_weight_callback=lambda _module: weight,
            current_timestep_callback=lambda: pipe.current_timestep,
            is_guidance_distilled=options.is_guidance_distilled)


# ---------------------------------------------------------------------------- PAB
@dataclass
class PABOptions:
    spatial_attention_block_skip_range: int = 2  # recompute attention every N steps, broadcast between
    spatial_attention_timestep_skip_range: list[float] = (100.0, 800.0)  # type: ignore[assignment]


class PABBackend(_StepCache):
    name = "pab"
    description = "Pyramid Attention Broadcast: reuse attention outputs for N steps in a timestep window (diffusers hook)"
    options_class = PABOptions
    count_attention = True

    def validate_options(self, options: PABOptions) -> None:
        _range("backend.pab.spatial_attention_timestep_skip_range", options.spatial_attention_timestep_skip_range)
        if options.spatial_attention_block_skip_range < 2:
            raise ConfigError("backend.pab.spatial_attention_block_skip_range must be >= 2 (1 reuses nothing)")

    def config(self, pipe: Any, options: PABOptions, ctx: StackContext) -> Any:
        from diffusers.hooks import PyramidAttentionBroadcastConfig

        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=options.spatial_attention_block_skip_range,
            spatial_attention_timestep_skip_range=tuple(options.spatial_attention_timestep_skip_range),
            current_timestep_callback=lambda: pipe.current_timestep)


# ---------------------------------------------------------------------------- SeaCache
@dataclass
class SeaCacheOptions:
    threshold: float = 0.25  # accumulated relative-L1 budget of the spectral indicator
    residual_order: int = 1  # 0: reuse the last residual, 1: extrapolate from the last two
    retention_steps: int = 1  # first steps always computed
    cache_end_steps: int = 1  # last steps always computed
    max_consecutive_cached: int = 2  # 0: no limit
    power_exp: float = 3.0  # exponent of the clean-signal power prior


def flux_raw_vision(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor] | None:
    """FLUX adapter for SeaCache: packed tokens (B, H/2*W/2, 4C) -> per-sample latents (C, 1, H, W)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    img_ids = kwargs.get("img_ids")
    if hidden is None or img_ids is None or hidden.ndim != 3:
        return None
    ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    rows, cols = int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1
    batch, tokens, features = hidden.shape
    if rows * cols != tokens or features % 4:
        return None
    channels = features // 4
    image = hidden.view(batch, rows, cols, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    image = image.reshape(batch, channels, rows * 2, cols * 2)
    return [sample.unsqueeze(1) for sample in image]


def _pass_step_to_cache_context(pipe: Any) -> None:
    """FluxPipeline (diffusers 0.42.1) enters ``cache_context("cond")`` without the step, sigma and
    step count SeaCache needs (it then runs every step, "fail-open"); add them from the scheduler."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    original = transformer.cache_context

    def cache_context(name: str, **kwargs: Any) -> Any:
        if "sigma" not in kwargs and getattr(scheduler, "sigmas", None) is not None:
            index = scheduler.step_index if scheduler.step_index is not None else 0
            kwargs.update(step_index=index, sigma=scheduler.sigmas[index],
                          num_inference_steps=len(scheduler.timesteps))
        return original(name, **kwargs)

    transformer.cache_context = cache_context


class SeaCacheBackend(_StepCache):
    name = "seacache"
    description = "SeaCache: skip steps while a spectrally filtered latent indicator barely changes (diffusers hook, FLUX adapter)"
    options_class = SeaCacheOptions

    def validate_options(self, options: SeaCacheOptions) -> None:
        if options.residual_order not in (0, 1):
            raise ConfigError("backend.seacache.residual_order must be 0 or 1")
        if options.threshold < 0 or options.power_exp <= 0 or min(
                options.retention_steps, options.cache_end_steps, options.max_consecutive_cached) < 0:
            raise ConfigError("backend.seacache: threshold >= 0, power_exp > 0 and non-negative step counts "
                              "are required")

    def config(self, pipe: Any, options: SeaCacheOptions, ctx: StackContext) -> Any:
        from diffusers.hooks import SeaCacheConfig

        _pass_step_to_cache_context(pipe)
        return SeaCacheConfig(threshold=options.threshold, residual_order=options.residual_order,
                              retention_steps=options.retention_steps, cache_end_steps=options.cache_end_steps,
                              max_consecutive_cached=options.max_consecutive_cached, power_exp=options.power_exp,
                              raw_vision_callback=flux_raw_vision)


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [TaylorSeerBackend(), MagCacheBackend(), FasterCacheBackend(), PABBackend(), SeaCacheBackend()]
