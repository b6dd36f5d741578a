"""The Stack concept: an ordered, validated list of backends with their options.

Everything here runs before a model is loaded: unknown names, bad options and incompatible
pairs are refused with a message naming the culprits.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fluxopt import plugins
from fluxopt.backend import EXCLUSIVE_STAGES, Backend
from fluxopt.environment import DeviceInfo
from fluxopt.errors import ConfigError


@dataclass(frozen=True)
class StackEntry:
    backend: Backend
    options: Any  # an instance of backend.options_class

    @property
    def name(self) -> str:
        return self.backend.name


@dataclass(frozen=True)
class Stack:
    """Backends in stage order. The empty stack is the baseline."""

    entries: tuple[StackEntry, ...]

    @property
    def name(self) -> str:
        return "+".join(e.name for e in self.entries) or "baseline"

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def is_lossless(self) -> bool:
        return all(e.backend.is_lossless(e.options) for e in self.entries)

    def unmet_requirements(self, device: DeviceInfo) -> list[str]:
        reasons = []
        for e in self.entries:
            reason = e.backend.unmet_requirement(e.options, device)
            if reason:
                reasons.append(f"{e.name} {reason}")
        return reasons

    def options_dict(self) -> dict[str, dict[str, Any]]:
        return {e.name: dataclasses.asdict(e.options) for e in self.entries}


def unknown_backend_message(name: str, known: Sequence[str]) -> str:
    msg = f"unknown backend '{name}'."
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        msg += f" Did you mean '{close[0]}'?"
    return msg + f" Known backends: {', '.join(sorted(known))}."


def lookup_backend(name: str) -> Backend:
    registry = plugins.backends()
    if name not in registry:
        raise ConfigError(unknown_backend_message(name, list(registry)))
    return registry[name]


def describe_options(options_class: type) -> str:
    """'key: type = default' for every option, for error messages and docs."""
    parts = []
    for f in dataclasses.fields(options_class):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts.append(f"{f.name}: {type_name} = {default!r}")
    return ", ".join(parts)


def parse_options(backend: Backend, values: Mapping[str, Any] | DictConfig | None) -> Any:
    """Typed options for ``backend`` from a (possibly partial) mapping; a typo or wrong type
    raises ConfigError listing the valid keys."""
    schema = OmegaConf.structured(backend.options_class)
    try:
        merged = OmegaConf.merge(schema, values or {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        detail = str(exc).splitlines()[0]
        raise ConfigError(f"invalid options for backend '{backend.name}': {detail}. "
                          f"Valid options: {describe_options(backend.options_class)}") from None


def build_stack(selection: Mapping[str, Any] | Sequence[str]) -> Stack:
    """Resolve names (and options, when a mapping name -> options is given) into a Stack in
    stage order, refusing incompatible combinations."""
    if isinstance(selection, Mapping):
        items = list(selection.items())
    else:
        items = [(name, None) for name in selection]
    entries = []
    for name, values in items:
        backend = lookup_backend(name)
        options = values if isinstance(values, backend.options_class) else parse_options(backend, values)
        backend.validate_options(options)
        entries.append(StackEntry(backend, options))
    entries.sort(key=lambda e: e.backend.stage)  # stable: ties keep the typed order
    _check_compatible(entries)
    return Stack(tuple(entries))


def _check_compatible(entries: Sequence[StackEntry]) -> None:
    for entry in entries:
        reason = entry.backend.incompatibility(entry.options, [e for e in entries if e is not entry])
        if reason:
            raise ConfigError(f"backend '{entry.name}' cannot be used in this stack: {reason}")
    for a, b in itertools.combinations(entries, 2):
        if a.name == b.name:
            raise ConfigError(f"backend '{a.name}' is listed twice in the stack")
        reason = a.backend.conflicts.get(b.name) or b.backend.conflicts.get(a.name)
        if reason:
            raise ConfigError(f"backends '{a.name}' and '{b.name}' cannot be combined: {reason}")
        group = a.backend.exclusive_group
        if group is not None and group == b.backend.exclusive_group:
            raise ConfigError(f"backends '{a.name}' and '{b.name}' cannot be combined: "
                              f"{a.backend.exclusive_reason or f'both belong to the exclusive group {group!r}'}")
        if a.backend.stage == b.backend.stage and a.backend.stage in EXCLUSIVE_STAGES:
            raise ConfigError(f"backends '{a.name}' and '{b.name}' cannot be combined: "
                              f"{EXCLUSIVE_STAGES[a.backend.stage]}")
