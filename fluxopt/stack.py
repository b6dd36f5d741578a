"""The Stack concept: an ordered, validated list of backends with their options.

Everything here runs before a model is loaded: unknown names, bad options and incompatible
pairs are refused with a message naming the culprits.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fluxopt import plugins
from fluxopt.backend import EXCLUSIVE_STAGES, Backend
from fluxopt.environment import DeviceInfo
from fluxopt.errors import ConfigError, did_you_mean


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

    def processes(self) -> int:
        """Processes (one per GPU) the stack needs: the most any of its backends asks for."""
        return max((e.backend.processes(e.options) for e in self.entries), default=1)


def unknown_backend_message(name: str, known: Sequence[str]) -> str:
    return f"unknown backend '{name}'.{did_you_mean(name, known)} Known backends: {', '.join(sorted(known))}."


def lookup_backend(name: str) -> Backend:
    registry = plugins.backends()
    if name not in registry:
        raise ConfigError(unknown_backend_message(name, [*registry, *plugins.presets()]))
    return registry[name]


def expand_presets(items: Sequence[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """``(name, options)`` pairs with every preset name replaced by its backends and their options.
    A backend also named on its own keeps the preset's place and options, with its own options
    on top (as ``+backend=<preset> backend.<name>.<option>=...`` does in Hydra)."""
    presets = plugins.presets()
    expanded: list[tuple[Any, Any]] = []
    from_preset: dict[str, int] = {}  # backend -> its index in expanded, for backends a preset brought
    explicit = []
    for name, values in items:
        preset = presets.get(name) if isinstance(name, str) else None
        if preset is None:
            explicit.append((name, values))
            continue
        if values:
            raise ConfigError(f"preset '{name}' takes no options of its own; set its backends' options "
                              f"instead ({', '.join(f'backend.{b}.<option>' for b in preset.backends)})")
        for backend, options in preset.backends.items():
            if backend in from_preset:
                raise ConfigError(f"backend '{backend}' is in two presets of the stack; combine presets that "
                                  "share no backend, or list the backends yourself")
            from_preset[backend] = len(expanded)
            expanded.append((backend, dict(options)))
    for name, values in explicit:
        index = from_preset.pop(name, None) if isinstance(name, str) else None
        if index is None:
            expanded.append((name, values))
            continue
        if values is not None and not isinstance(values, Mapping):  # parse_options names the problem
            expanded.append((name, values))
            continue
        if isinstance(values, DictConfig):
            values = OmegaConf.to_container(values, resolve=True)
        expanded[index] = (name, {**expanded[index][1], **(values or {})})
    return expanded


def describe_options(options_class: type) -> str:
    """'key: type = default' for every option, for error messages and docs."""
    parts = []
    for f in dataclasses.fields(options_class):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "???")
        parts.append(f"{f.name}: {type_name_of(f.type)} = {default!r}")
    return ", ".join(parts)


def type_name_of(annotation: Any) -> str:
    """"bool", "list[float]", "Optional[int]" (a generic's ``__name__`` would drop its arguments);
    a string annotation (``from __future__ import annotations``) as written."""
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("typing.", "")


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` has the type a dataclass field declares (no string coercion: ``"yes"``
    is not a bool and ``"0.1"`` is not a float)."""
    if annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        args = typing.get_args(annotation)
        return isinstance(value, (list, tuple)) and all(_accepts(args[0], v) for v in value) if args else \
            isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, Mapping)
    return True


def check_option_name(backend: Backend, key: str) -> None:
    """ConfigError unless ``key`` is one of ``backend``'s options (the message lists them)."""
    fields = [f.name for f in dataclasses.fields(backend.options_class)]
    if key not in fields:
        raise ConfigError(f"backend '{backend.name}' has no option '{key}'.{did_you_mean(key, fields)} "
                          f"Valid options: {describe_options(backend.options_class)}")


def _check_types(backend: Backend, values: Mapping[str, Any]) -> None:
    hints = typing.get_type_hints(backend.options_class)
    for key, value in values.items():
        check_option_name(backend, key)
        annotation = hints.get(key, Any)
        if not _accepts(annotation, value):
            raise ConfigError(f"backend.{backend.name}.{key}={value!r} is not a valid {type_name_of(annotation)}")
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"backend.{backend.name}.{key}={value!r} is not allowed: numbers must be finite")


def parse_options(backend: Backend, values: Any) -> Any:
    """Typed options for ``backend`` from a (possibly partial) mapping, None (the defaults) or an
    instance of its options class; an unknown key or a value of the wrong type raises
    ConfigError naming the setting, the value and what is allowed."""
    if isinstance(values, backend.options_class):
        return values
    if isinstance(values, DictConfig):
        values = OmegaConf.to_container(values, resolve=True)
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"options for backend '{backend.name}' must be a mapping of option -> value "
                          f"(or None for the defaults), got {values!r}. Valid options: "
                          f"{describe_options(backend.options_class)}")
    _check_types(backend, values)
    schema = OmegaConf.structured(backend.options_class)
    try:
        merged = OmegaConf.merge(schema, values or {})
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        detail = str(exc).splitlines()[0]
        raise ConfigError(f"invalid options for backend '{backend.name}': {detail}. "
                          f"Valid options: {describe_options(backend.options_class)}") from None


def option_defaults() -> dict[str, dict[str, Any]]:
    """Every registered backend's default options (what a reproducing command can leave out)."""
    return {name: dataclasses.asdict(b.options_class()) for name, b in plugins.backends().items()}


def backend_of_options(options: Any) -> str | None:
    """The backend whose options class ``options`` is an instance of (an options object is a
    handle on its backend, as torchao's configs are), or None."""
    if not dataclasses.is_dataclass(options) or isinstance(options, type):
        return None
    owners = sorted(name for name, b in plugins.backends().items() if type(options) is b.options_class)
    if len(owners) > 1:
        raise ConfigError(f"{type(options).__name__} is the options class of {', '.join(owners)}; name the backend: "
                          f"{{'{owners[0]}': {type(options).__name__}(...)}}")
    return owners[0] if owners else None


def build_stack(selection: Mapping[str, Any] | Sequence[Any] | str | Any) -> Stack:
    """Resolve a backend name, a list of names or options objects (``CompileOptions(regional=True)``),
    or a mapping name -> options into a Stack in stage order, refusing unknown names, bad options
    and incompatible combinations."""
    entries = _entries(selection)
    _check_pairs(entries)
    _check_options_compatible(entries)
    return Stack(tuple(entries))


def check_names(selection: Sequence[str]) -> None:
    """Refuse what a stack's backend names decide alone (unknown or repeated names, an empty stack,
    backends that never combine), before the options are known: a command line names its stacks
    before the options given for them are composed, and an incompatibility that depends on an
    option (``offload.mode``) is judged by :func:`build_stack` once they are."""
    _check_pairs(_entries(selection))


def _entries(selection: Mapping[str, Any] | Sequence[Any] | str | Any) -> list[StackEntry]:
    """The selection's backends with their validated options, in stage order."""
    if isinstance(selection, str) or backend_of_options(selection):
        selection = [selection]
    if isinstance(selection, Mapping):
        items = list(selection.items())
    elif isinstance(selection, Sequence):
        items = []
        for item in selection:
            owner = backend_of_options(item)
            if owner is None and dataclasses.is_dataclass(item):
                raise ConfigError(f"{type(item).__name__} is not the options class of any registered backend")
            items.append((owner, item) if owner else (item, None))
    else:
        raise ConfigError(f"a stack is a backend name, a list of names or a mapping name -> options; "
                          f"got {selection!r}")
    items = expand_presets(items)
    if not items:
        raise ConfigError("the stack is empty: name at least one backend "
                          f"(known backends: {', '.join(sorted(plugins.backends()))})")
    entries = []
    for name, values in items:
        if not isinstance(name, str):
            raise ConfigError(f"backend names are strings; got {name!r}")
        backend = lookup_backend(name)
        options = parse_options(backend, values)
        backend.validate_options(options)
        entries.append(StackEntry(backend, options))
    entries.sort(key=lambda e: e.backend.stage)  # stable: ties keep the typed order
    return entries


def _check_options_compatible(entries: Sequence[StackEntry]) -> None:
    for entry in entries:
        reason = entry.backend.incompatibility(entry.options, [e for e in entries if e is not entry])
        if reason:
            raise ConfigError(f"backend '{entry.name}' cannot be used in this stack: {reason}")


def _check_pairs(entries: Sequence[StackEntry]) -> None:
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
