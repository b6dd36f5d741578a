"""Backend ``fbcache``: first-block cache (ParaAttention's dynamic caching, TeaCache-like).

Each step runs the first transformer block; when its residual changed by less than
``residual_diff_threshold`` (relative mean absolute difference) since the last computed step,
the remaining blocks are skipped and their cached residual is added instead. Lossy: a higher
threshold skips more steps. The number of computed and skipped steps is counted from what
actually ran (see ``_cache_probe``) and reported in the stack's ``stats["cache"]``.

Two implementations: ``diffusers`` (``diffusers.hooks.FirstBlockCacheConfig`` through
``transformer.enable_cache``, no extra package) and ``para_attn`` (ParaAttention's cache, as in the
"3x faster FLUX serving" recipe, through fluxopt's adapter for diffusers 0.42's FLUX blocks:
``_para_attn_flux``; para-attn's own adapter calls them with an older signature).

With ``compile``: the cache decision reads a tensor on the host (``.item()``) inside the first
block, which is a graph break, so it composes with ``backend.compile.fullgraph=false`` only
(regional or full); with ``fullgraph=true`` torch.compile refuses the first block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fluxopt import Backend, ConfigError, Package, Requirements, StackContext, Stage, hookimpl
from fluxopt_plugins._para_attn_flux import apply_first_block_cache
from fluxopt_plugins._cache_probe import (STEP_CACHE_GROUP, STEP_CACHE_REASON, ComputeCounter, graph_follows,
                                          transformer_blocks)

IMPLEMENTATIONS = ("diffusers", "para_attn")
PARA_ATTN = Package("para_attn", "pip install 'fluxopt[para-attn]'")


@dataclass
class FBCacheOptions:
    residual_diff_threshold: float = 0.08  # skip the remaining blocks below this relative change
    implementation: str = "diffusers"  # one of IMPLEMENTATIONS


class FBCacheBackend(Backend):
    name = "fbcache"
    description = "first-block cache: skip the remaining transformer blocks when the first block's residual barely changed"
    options_class = FBCacheOptions
    stage = Stage.CACHE
    lossless = False
    exclusive_group = STEP_CACHE_GROUP
    exclusive_reason = STEP_CACHE_REASON

    def unmet_requirement(self, options: FBCacheOptions, device: Any) -> str | None:
        if options.implementation == "para_attn":
            return Requirements(packages=(PARA_ATTN,)).unmet(device)
        return None

    def validate_options(self, options: FBCacheOptions) -> None:
        if options.implementation not in IMPLEMENTATIONS:
            raise ConfigError(f"backend.fbcache.implementation={options.implementation!r} is not one of "
                              f"{', '.join(IMPLEMENTATIONS)}")
        if options.residual_diff_threshold < 0:
            raise ConfigError("backend.fbcache.residual_diff_threshold must be >= 0 "
                              f"(got {options.residual_diff_threshold})")

    def apply(self, pipe: Any, options: FBCacheOptions, ctx: StackContext) -> None:
        if options.implementation == "diffusers":
            from diffusers.hooks import FirstBlockCacheConfig

            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=options.residual_diff_threshold))
            ctx.note("fbcache: diffusers' first-block cache hooks on the transformer")
            ComputeCounter(pipe, ctx, self.name, decision=_diffusers_decision(pipe.transformer))
        else:
            # Probes go on the original blocks first: para_attn moves them into its own wrapper.
            ComputeCounter(pipe, ctx, self.name, blind=graph_follows(ctx))
            apply_first_block_cache(pipe, options.residual_diff_threshold, ctx)


def _diffusers_decision(transformer: Any) -> Any:
    """Reads diffusers' first-block-cache decision of the last transformer call (its shared state
    is plain Python, updated even when the blocks run compiled)."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    head = transformer_blocks(transformer)[0]
    state_manager = HookRegistry.check_if_exists_or_initialize(head).get_hook(_FBC_LEADER_BLOCK_HOOK).state_manager
    return lambda: all(state.should_compute for state in state_manager._state_cache.values())


@hookimpl
def fluxopt_backends() -> list[Backend]:
    return [FBCacheBackend()]
