"""Honest compute/skip accounting for the cache backends (not a plugin: the leading underscore
keeps it out of plugin discovery).

A cache hook decides, inside the transformer, whether a block (or an attention layer) runs or
its output is reused. We do not ask the cache library what it decided; we observe what ran:

* ``steps``: one transformer call is a *computed* step when the last transformer block really
  executed its own layers during that call (any of its child modules ran); otherwise it was
  served from the cache. First-block caches always run the first block, so the last block is
  the one that tells.
* ``attention`` (attention-level caches): one call of an attention module is *computed* when
  any of its projections/norms ran, *reused* when the cache returned a stored output.

The counters are tensors updated in place by forward hooks, so they trace into a
``torch.compile`` graph without guards or recompiles; they are read (one device sync) only
when a generation ends, detected by wrapping ``pipe.scheduler.step`` (the scheduler is plain
Python, never compiled). Results go to ``ctx.stats["cache"]``: the last generation's counts at
the top level plus totals over every generation this pipeline ran (build, warm-up, timed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import torch

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    blocks: list[torch.nn.Module] = []
    for name in BLOCK_LISTS:
        blocks.extend(getattr(transformer, name, None) or [])
    if not blocks:
        raise RuntimeError(f"{type(transformer).__name__} has no transformer_blocks/single_transformer_blocks")
    return blocks


def _compiled(transformer: torch.nn.Module) -> bool:
    """Whether the transformer or any of its blocks runs through torch.compile."""
    modules = [transformer, *transformer_blocks(transformer)]
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in modules)


def attention_modules(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attn for block in transformer_blocks(transformer) if hasattr(block, "attn")]


class ComputeCounter:
    """Counts computed vs reused transformer steps (and optionally attention calls) per generation."""

    def __init__(self, pipe: Any, ctx: Any, backend: str, count_attention: bool = False,
                 key: str = "cache", decision: Callable[[], bool] | None = None, blind: bool = False):
        """``decision``, when the cache library exposes it, says after each step whether that step
        was computed; it is read outside the transformer, so it stays right when the blocks are
        compiled (block hooks inside a compiled graph are not reliable observers).

        ``blind``: a graph backend (compile, aoti, TensorRT) will run the blocks, so hooks on them
        would observe nothing, and under torch.compile each hook's closure would add guards and
        recompile every block until the recompile limit sends the blocks back to eager. No hook
        is installed and the counts say "unavailable"."""
        self.stats = ctx.stats
        self.ctx = ctx
        self.decision = decision
        self.transformer = pipe.transformer
        self.decided = [0, 0]  # steps, computed steps counted through ``decision``
        self.scheduler_steps = 0  # steps of the current generation, counted outside the transformer
        self.backend = backend
        self.key = key
        transformer = pipe.transformer
        device = next(transformer.parameters()).device
        tail = transformer_blocks(transformer)[-1]
        # groups: 0 = steps (outer: transformer, inner: the tail block's children)
        #         1 = attention calls (outer: every attention module, inner: its children)
        self.blind = blind and decision is None
        groups: list[tuple[int, list[tuple[torch.nn.Module, Iterable[torch.nn.Module]]]]] = (
            [] if decision is not None or self.blind else [(0, [(transformer, list(tail.children()))])])
        if count_attention and not self.blind:
            groups.append((1, [(attn, list(attn.children())) for attn in attention_modules(transformer)]))
        n_outer = sum(len(units) for _, units in groups)
        self.calls = torch.zeros(2, dtype=torch.int64, device=device)
        self.computed = torch.zeros(2, dtype=torch.int64, device=device)
        self.hit = torch.zeros(n_outer, dtype=torch.int64, device=device)
        self.count_attention = count_attention
        self.handles: list[Any] = []
        slot = 0
        for group, units in groups:
            for outer, inner in units:
                self._probe(outer, inner, group, slot)
                slot += 1
        self.generations: list[dict[str, int]] = []
        if self.handles:
            ctx.callback(f"{backend}: the step counter's {len(self.handles)} module hooks",
                         lambda: [handle.remove() for handle in self.handles])
        self._wrap_scheduler(pipe)

    # ------------------------------------------------------------------ hooks
    def _probe(self, outer: torch.nn.Module, inner: Iterable[torch.nn.Module], group: int, slot: int) -> None:
        calls, computed, hit = self.calls, self.computed, self.hit

        def before(module: Any, args: Any) -> None:
            hit[slot].zero_()
            calls[group].add_(1)

        def ran(module: Any, args: Any, output: Any) -> None:
            hit[slot].fill_(1)

        def after(module: Any, args: Any, output: Any) -> None:
            computed[group].add_(hit[slot])

        self.handles.append(outer.register_forward_pre_hook(before))
        self.handles.append(outer.register_forward_hook(after))
        for child in inner:
            self.handles.append(child.register_forward_hook(ran))

    def _wrap_scheduler(self, pipe: Any) -> None:
        scheduler = pipe.scheduler
        original = scheduler.step

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            out = original(*args, **kwargs)
            self.scheduler_steps += 1
            if self.decision is not None:
                self.decided[0] += 1
                self.decided[1] += int(bool(self.decision()))
            index = getattr(scheduler, "step_index", None)
            timesteps = getattr(scheduler, "timesteps", None)
            if index is not None and timesteps is not None and index >= len(timesteps):
                self.end_generation()
            return out

        self.ctx.set_attr(f"{self.backend}: the scheduler's steps counted", scheduler, "step", step)

    # ------------------------------------------------------------------ report
    def end_generation(self) -> None:
        steps, self.scheduler_steps = self.scheduler_steps, 0
        calls, computed = self.calls.tolist(), self.computed.tolist()
        self.calls.zero_()
        self.computed.zero_()
        if self.decision is not None:
            calls[0], computed[0] = self.decided
            self.decided = [0, 0]
        elif self.blind or _compiled(self.transformer):
            self.stats[self.key] = {"backend": self.backend, "steps": steps, "computed_steps": None,
                                    "skipped_steps": None,
                                    "counts": "unavailable: a graph backend (compile, aoti, TensorRT) runs the "
                                              "transformer's blocks, and hooks cannot observe which of them ran"}
            return
        gen = {"steps": calls[0], "computed_steps": computed[0], "skipped_steps": calls[0] - computed[0]}
        if self.count_attention:
            gen.update(attention_calls=calls[1], attention_computed=computed[1],
                       attention_reused=calls[1] - computed[1])
        self.generations.append(gen)
        total = {k: sum(g[k] for g in self.generations) for k in gen}
        self.stats[self.key] = {
            "backend": self.backend,
            **gen,  # the last generation
            "generations": len(self.generations),
            "total": total,
            "computed_steps_per_generation": [g["computed_steps"] for g in self.generations],
        }


# Step caches never compose: diffusers' ``enable_cache`` holds one technique per transformer
# and para-attn replaces the block lists.
STEP_CACHE_GROUP = "step-cache"
STEP_CACHE_REASON = ("both cache the transformer's steps; a transformer holds one cache technique "
                     "(diffusers enable_cache refuses a second)")


def graph_follows(ctx: Any) -> bool:
    """Whether the stack being applied holds a graph backend (it runs after the cache's apply)."""
    from fluxopt import Stage

    return bool(ctx.stack) and any(e.backend.stage == Stage.GRAPH for e in ctx.stack.entries)
