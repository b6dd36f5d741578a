"""Applying a stack to a pipeline: the one path shared by the CLI runner and the Python API.

Applying is all-or-nothing: the pipeline is snapshotted and the process-wide compiler state
saved first; if any backend's ``apply`` or ``build`` raises, everything is rolled back before
the error propagates. :class:`AppliedStack` undoes the stack when closed.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from typing import Any

from fluxopt import compiler_state
from fluxopt.context import StackContext
from fluxopt.errors import ConfigError
from fluxopt.fingerprint import has_subclass_weights
from fluxopt.snapshot import PipelineSnapshot
from fluxopt.stack import Stack

log = logging.getLogger("fluxopt")

MARKER = "_fluxopt_stack"  # set on a pipeline while a stack is applied to it
# id(component) -> (the pipeline holding a stack, its name) for every component of a pipeline that
# holds a stack: a pipeline sharing one of them (``FluxImg2ImgPipeline.from_pipe(pipe)``) is refused
_HELD: dict[int, tuple[Any, str]] = {}


def _components(pipe: Any) -> dict[str, Any]:
    return {name: c for name, c in (getattr(pipe, "components", None) or {}).items() if c is not None}


def _hold_components(pipe: Any, stack: str) -> None:
    for component in _components(pipe).values():
        _HELD[id(component)] = (pipe, stack)


def _release_components(pipe: Any) -> None:
    for key in [k for k, (holder, _) in _HELD.items() if holder is pipe]:
        del _HELD[key]


class AppliedStack:
    """A stack applied to a pipeline.

    What is changed: the pipeline's modules (weights, fused projections, compiled blocks, cache
    hooks, attention processors, offload hooks; whatever the stack's backends do), its
    scheduler, and process-wide state (Dynamo/Inductor/functorch config, torch.backends flags,
    attention-backend registry). All of it stays in force while the stack is applied;
    :meth:`close` (or leaving a ``with`` block) returns the pipeline to bit-identical output
    and identical module structure and restores the process-wide state.

    ``stats`` holds what the backends reported (build phases and their seconds, artifact cache
    hits, quantized layer counts, cache skip counts...); ``build_s`` is the wall time of apply and build.

    Errors: applying raises :class:`fluxopt.ConfigError` for a wrong pipeline or a pipeline
    that already holds a stack, :class:`fluxopt.UnavailableError` when the machine cannot run
    the stack, and whatever a backend raised otherwise, always after rolling everything back.
    """

    def __init__(self, stack: Stack, pipe: Any, ctx: StackContext, snapshot: PipelineSnapshot | None,
                 restore_globals: Any, build_s: float):
        self.stack = stack
        self.pipe = pipe
        self.ctx = ctx
        self.build_s = build_s
        self._snapshot = snapshot
        self._restore_globals = restore_globals
        restore_globals.owner = weakref.ref(self)
        self._closed = False
        self.source: str | None = None  # the measured record the stack came from (apply_stack from a result)

    @property
    def stats(self) -> dict[str, Any]:
        return self.ctx.stats

    @property
    def changes(self) -> dict[str, list[str]]:
        """What each backend changed, by name (the journal undone on close; the pipeline's own
        state is also restored from its snapshot)."""
        return self.ctx.changes_by_backend

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Undo the stack (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _rollback(self.pipe, self.ctx, self._snapshot, self._restore_globals)

    def __enter__(self) -> AppliedStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "applied"
        changes = "; ".join(f"{backend}: {', '.join(names)}" for backend, names in self.changes.items())
        return f"<AppliedStack {self.stack.name} ({state}){' ' + changes if changes else ''}>"


def _rollback(pipe: Any, ctx: StackContext, snapshot: PipelineSnapshot | None, restore_globals: Any) -> None:
    try:
        ctx.undo()
    finally:
        if snapshot is not None:
            snapshot.restore()
        else:
            vars(pipe).pop(MARKER, None)
        _release_components(pipe)
        restore_globals()


def check_pipeline(pipe: Any) -> None:
    """Refuse what is not a FLUX pipeline, or one that already holds a stack (fluxopt's or
    changes made outside fluxopt that a second stack would fight with)."""
    from diffusers import FluxTransformer2DModel

    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, FluxTransformer2DModel):
        got = type(transformer).__name__ if transformer is not None else "no transformer"
        raise ConfigError(f"fluxopt optimizes FLUX pipelines (a diffusers pipeline whose transformer is "
                          f"FluxTransformer2DModel); got {type(pipe).__name__} with {got}")
    applied = vars(pipe).get(MARKER)
    if applied is not None:
        raise ConfigError(f"this pipeline already has the stack '{applied}' applied; close it first "
                          "(AppliedStack.close()), or apply one stack holding all the backends you want")
    for name, component in _components(pipe).items():
        holder, stack = _HELD.get(id(component), (None, None))
        if holder is not None and holder is not pipe:
            raise ConfigError(f"this pipeline shares its {name} with another pipeline ({type(holder).__name__} at "
                              f"{id(holder):#x}) that holds the stack '{stack}'; close that stack first "
                              "(AppliedStack.close()), or apply the stack to one pipeline only")
    found = foreign_changes(transformer)
    if found:
        raise ConfigError(f"this pipeline was already optimized outside fluxopt ({'; '.join(found)}); "
                          "load a fresh pipeline to apply a stack")


def foreign_changes(transformer: Any) -> list[str]:
    """Optimizations already present on a transformer that fluxopt did not make."""
    found = []
    modules = list(transformer.modules())
    if any(getattr(m, "_compiled_call_impl", None) is not None for m in modules):
        found.append("torch.compile")
    if any(getattr(m, "fused_projections", False) for m in modules):  # the transformer is one of them
        found.append("fused QKV projections")
    # diffusers keeps one HookRegistry per module; step caches hook the blocks, not the transformer
    hooks = sorted({name for m in modules for name in getattr(getattr(m, "_diffusers_hook", None), "hooks", None) or ()})
    if hooks:
        found.append(f"diffusers hooks ({', '.join(hooks)})")
    if has_subclass_weights(transformer):
        found.append("quantized (tensor-subclass) weights")
    return found


def apply_to_pipeline(pipe: Any, stack: Stack, ctx: StackContext, *, build: bool = True,
                      restorable: bool = True, on_phase: Callable[[str], None] | None = None) -> AppliedStack:
    """Apply ``stack`` to ``pipe`` in stage order, then (``build``) run each backend's build.

    ``restorable=False`` takes no snapshot of the pipeline (for a pipeline that is thrown away
    after measuring: a snapshot would keep the original weights alive next to the quantized
    ones, and the measured peak memory would include them); process-wide state and the
    journal are still undone on close. ``on_phase`` is told when "apply" and "build" start.
    """
    on_phase = on_phase or (lambda name: None)
    check_pipeline(pipe)
    restore_globals = compiler_state.hold()
    snapshot = PipelineSnapshot(pipe) if restorable else None
    vars(pipe)[MARKER] = stack.name
    _hold_components(pipe, stack.name)
    start = time.perf_counter()  # build time: from the bare pipeline to a ready one (a calibration runs in apply)
    try:
        on_phase("apply")
        for entry in stack.entries:
            with ctx.acting_for(entry.name):
                entry.backend.apply(pipe, entry.options, ctx)
        if build:
            on_phase("build")
            for entry in stack.entries:
                with ctx.acting_for(entry.name):
                    entry.backend.build(pipe, entry.options, ctx)
        ctx.install_outer_calls(pipe.transformer)
    except BaseException:
        try:
            _rollback(pipe, ctx, snapshot, restore_globals)
        except Exception as undo_error:  # noqa: BLE001 - the original error matters more
            log.error("rolling back stack %s after a failure also failed: %s", stack.name, undo_error)
        raise
    build_s = time.perf_counter() - start
    restore_globals.settle(ctx.claimed_settings)
    if snapshot is not None:
        snapshot.offload_replaced()
    return AppliedStack(stack, pipe, ctx, snapshot, restore_globals, build_s)
