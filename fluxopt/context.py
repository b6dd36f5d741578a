"""The StackContext concept: what a backend may use while it is applied and built, and the
journal of every process-wide change it made, undone in reverse order when the stack closes.

Changes to the pipeline itself are undone by the stack's :class:`~fluxopt.snapshot.PipelineSnapshot`;
changes outside it (compiler flags, a library's global registry, files) go through
:meth:`StackContext.enter_context` or :meth:`StackContext.callback`, and attributes a backend
replaces (in the pipeline too) through :meth:`StackContext.set_attr`, each under a name and
filed under the backend that made it, so ``ctx.changes_by_backend`` lists what each backend of a
stack did, like diffusers' ``HookRegistry`` lists its hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from fluxopt.artifacts import ArtifactCache, entry_key
from fluxopt.compiler_state import config_key
from fluxopt.environment import DeviceInfo
from fluxopt.shapes import Shapes

log = logging.getLogger("fluxopt.build")
T = TypeVar("T")


@dataclass
class StackContext:
    """Everything a backend needs besides the pipeline: device, dtype, the model spec (None for
    a user's own pipeline), bench shapes, the artifact cache, prompts, the whole stack (backends
    may adapt to the others), ``run_once`` (one pipeline call at the bench shapes, to trigger
    lazy compilation) and ``stats`` (numbers a backend reports; they end up in result.json)."""

    device: DeviceInfo
    dtype: torch.dtype
    model: Any | None
    shapes: Shapes
    cache_dir: Path
    prompts: tuple[str, ...] = ()
    stack: Any | None = None
    run_once: Callable[[], Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    # What the run measures instead of the whole stack when a backend stops its build early
    # (set through measures_partial; every table labels such a stack)
    partial: str | None = None
    claimed_settings: set[tuple[str, ...]] = field(default_factory=set)  # process-wide, set through set_config
    _undo: list[tuple[str, str, Callable[[], Any]]] = field(default_factory=list, repr=False)  # backend, name, undo
    _outer_calls: list[tuple[str, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = field(
        default_factory=list, repr=False)
    _acting: str = field(default="stack", repr=False)  # the backend whose apply/build is running

    def measures_partial(self, what: str) -> None:
        """Declare that the pipeline this stack leaves is not the backend's final form (a build
        stopped early): ``what`` says what is measured instead. The record and every table show it,
        and such a stack is never picked as the fastest."""
        self.partial = what

    # ------------------------------------------------------------------ changes
    @property
    def changes(self) -> list[str]:
        """Names of the changes registered so far, oldest first."""
        return [name for _, name, _ in self._undo]

    @property
    def changes_by_backend(self) -> dict[str, list[str]]:
        """The changes' names filed under the backend that made each (without the ``backend: ``
        their names start with), oldest first."""
        grouped: dict[str, list[str]] = {}
        for backend, name, _ in self._undo:
            grouped.setdefault(backend, []).append(name.removeprefix(f"{backend}: "))
        return grouped

    @contextlib.contextmanager
    def acting_for(self, backend: str) -> Iterator[None]:
        """File the changes registered inside the block under ``backend`` (the apply path wraps
        each backend's ``apply`` and ``build`` in it)."""
        previous, self._acting = self._acting, backend
        try:
            yield
        finally:
            self._acting = previous

    def callback(self, name: str, undo: Callable[[], Any]) -> None:
        """Register ``undo`` (no arguments) to run when the stack closes, under ``name``."""
        self._undo.append((getattr(self, "_acting", "stack"), name, undo))

    def note(self, name: str) -> None:
        """Name a change a library call made inside the pipeline (``quantize_``, ``enable_cache``,
        ``fuse_qkv_projections``...), which the pipeline's snapshot undoes: the journal lists it
        with the rest; nothing runs for it on close."""
        self.callback(name, lambda: None)

    def set_config(self, name: str, config: Any, flags: Mapping[str, Any]) -> None:
        """Set process-wide compiler settings (a torch config module such as
        ``torch._inductor.config``; keys as in ``get_config_copy()``, dotted for nested ones) under
        ``name``. They are put back with the rest of the process-wide state when the stack closes,
        reference-counted across stacks on other pipelines (:class:`fluxopt.compiler_state.Hold`):
        closing one stack never resets a setting another stack still holds, as a ``config.patch``
        exited out of order would."""
        config.load_config(dict(flags))
        self.claimed_settings.update(config_key(config, key) for key in flags)
        self.callback(name, lambda: None)

    def enter_context(self, name: str, manager: AbstractContextManager[T]) -> T:
        """Enter ``manager`` now (e.g. ``torch._inductor.config.patch(...)``); exit it on close."""
        value = manager.__enter__()
        self.callback(name, lambda: manager.__exit__(None, None, None))
        return value

    def set_attr(self, name: str, obj: Any, attr: str, value: Any) -> None:
        """Set ``obj.<attr> = value`` on any object (in the pipeline too); restored exactly on close
        (an attribute that was not in the instance's ``__dict__`` is removed again)."""
        had = attr in vars(obj)
        previous = vars(obj).get(attr)
        setattr(obj, attr, value)

        def restore() -> None:
            if had:
                setattr(obj, attr, previous)
            else:
                vars(obj).pop(attr, None)

        self.callback(name, restore)

    def wrap_transformer_call(self, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        """Ask for ``wrap(call) -> call`` around the transformer's whole call, installed once every
        backend is built, outside whatever they made of it (compiled module, CUDA graph runner,
        AOTInductor package, engine). For decisions taken on the host between steps, such as a
        fixed-schedule step cache: inside a graph they would be captured once and replayed."""
        self._outer_calls.append((self._acting, name, wrap))

    def install_outer_calls(self, transformer: Any) -> None:
        """Install the requested wrappers, first requested innermost; each undone on close."""
        while self._outer_calls:
            backend, name, wrap = self._outer_calls.pop(0)
            inner = transformer._compiled_call_impl or transformer._call_impl
            with self.acting_for(backend):  # Module.__call__ goes through _compiled_call_impl when it is set
                self.set_attr(name, transformer, "_compiled_call_impl", wrap(inner))

    def undo(self) -> None:
        """Run every registered undo, newest first. All of them run even if one fails; the
        first failure is raised afterwards."""
        errors = []
        while self._undo:
            _, name, fn = self._undo.pop()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - keep undoing the rest
                log.error("undoing %s failed: %s", name, exc)
                errors.append(exc)
        if errors:
            raise errors[0]

    # ------------------------------------------------------------------ artifacts
    def artifact(self, backend: str, key: Mapping[str, Any], build: Callable[[Path], None] | None) -> Path | None:
        """A verified cache directory holding what ``build(tmp_dir)`` writes, built once per key
        (``build=None``: look up only, None when absent).

        The key is completed with the model, shapes, dtype, device and library versions, so an
        entry made for another GPU or version is never reused. Every load verifies the entry's
        manifest (key, sha256 of every file, owner and permissions); a corrupt, partial or
        foreign entry is logged, recorded as ``stats["artifacts"][backend]["rebuilt"]`` and
        rebuilt. ``stats["artifacts"][backend]`` also says ``cache_hit``, ``built``, ``verify_s``,
        ``build_s`` and ``size_bytes``.
        """
        cache = ArtifactCache(self.cache_dir)
        full_key = entry_key({"backend": backend, "model": getattr(self.model, "name", None),
                              "shapes": dataclasses.asdict(self.shapes), "dtype": str(self.dtype), **key},
                             self.device)
        stats = self.stats.setdefault("artifacts", {})
        if build is None:
            start = time.perf_counter()
            path, discarded = cache.lookup(backend, full_key)
            info = {"path": str(path) if path else None, "cache_hit": path is not None,
                    "verify_s": round(time.perf_counter() - start, 4)}
            if discarded:
                info["rebuilt"] = discarded
            stats[backend] = {**stats.get(backend, {}), **info}
            return path
        result = cache.get(backend, full_key, build)
        info = result.to_stats()
        previous = stats.get(backend, {})
        if previous.get("rebuilt") and not result.rebuilt:  # discarded by an earlier lookup
            info["rebuilt"] = previous["rebuilt"]
        stats[backend] = info
        return result.path

    # ------------------------------------------------------------------ timing
    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Time a named build phase (calibration, export, engine build...) into
        ``stats["build_phases_s"]``; logged as it starts, so a run killed mid-build still
        shows where its time went."""
        if self.device.is_gpu:
            torch.cuda.synchronize()
        log.info("%s: started", phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.device.is_gpu:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - start
            phases = self.stats.setdefault("build_phases_s", {})
            phases[phase] = phases.get(phase, 0.0) + elapsed
            log.info("%s: %.1f s", phase, elapsed)
