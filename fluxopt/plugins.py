"""The plugin manager: built-in plugins from ``fluxopt_plugins/`` first, then every installed
distribution's entry point in the group ``fluxopt``.

Registration hooks are collected into name -> spec tables; two specs with one name are an
error that names both distributions, so a third-party plugin can never silently shadow
a built-in.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import pluggy

from fluxopt import hookspecs
from fluxopt.errors import ConfigError, did_you_mean

ENTRY_POINT_GROUP = "fluxopt"

# fluxopt's own rings, registered first (each a subpackage that the kernel names only here, by
# string: the kernel never imports a ring).
CORE_PLUGINS = ("fluxopt.zoo", "fluxopt.report", "fluxopt.profile", "fluxopt.scale", "fluxopt.history")


# Where the built-in plugins live (``fluxopt_plugins/`` in the source tree). Imported by name: the core
# discovers them like any plugin and never depends on one.
BUILTIN_PACKAGE = "fluxopt_plugins"


def builtin_plugin_modules() -> list[str]:
    """Every public module or package of the built-in plugin package."""
    package = importlib.import_module(BUILTIN_PACKAGE)
    return sorted(f"{BUILTIN_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
                  if not m.name.startswith("_"))


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    """Core plugins, built-ins, then entry points; a hook implementation that matches no hook
    specification (a misspelt name) is refused, naming the plugin and the function."""
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for module_name in (*CORE_PLUGINS, *builtin_plugin_modules()):
        pm.register(importlib.import_module(module_name), name=module_name)
    try:
        pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    except Exception as exc:  # noqa: BLE001 - a broken plugin: one line naming it, not its traceback
        raise ConfigError(f"{_failing_entry_point()}: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}; "
                          "fix or uninstall it (every fluxopt command loads every installed plugin)") from None
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        known = ", ".join(sorted(n for n in dir(hookspecs) if n.startswith("fluxopt_")))
        raise ConfigError(f"plugin {_origin(pm, exc.plugin)}: {exc}. Known hooks: {known}") from None
    return pm


def _failing_entry_point() -> str:
    """Which installed plugin fails to import: its entry point and distribution."""
    for dist in importlib.metadata.distributions():
        for ep in dist.entry_points:
            if ep.group != ENTRY_POINT_GROUP:
                continue
            try:
                ep.load()
            except Exception:  # noqa: BLE001 - this is the one we are looking for
                return f"the plugin '{ep.name}' ({ep.value}) of {dist.metadata['Name']} {dist.version} failed to import"
    return "an installed plugin failed to import"


def _origin(pm: pluggy.PluginManager, plugin: object) -> str:
    """Human name of where a plugin comes from: its distribution, or the built-in module."""
    for plug, dist in pm.list_plugin_distinfo():
        if plug is plugin:
            return f"{dist.project_name} {dist.version}"
    return f"fluxopt built-in ({pm.get_name(plugin)})"


def _collect(hook_name: str, kind: str) -> dict[str, Any]:
    pm = get_plugin_manager()
    hook = getattr(pm.hook, hook_name)
    table: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for impl in hook.get_hookimpls():
        specs: Iterable[Any] = impl.function() or ()
        for spec in specs:
            origin = _origin(pm, impl.plugin)
            if spec.name in table:
                raise ConfigError(f"two plugins register the {kind} '{spec.name}': "
                                  f"{origins[spec.name]} and {origin}; uninstall one of them")
            table[spec.name] = spec
            origins[spec.name] = origin
    return table


@lru_cache(maxsize=1)
def backends() -> dict[str, Any]:
    """All registered backends by name."""
    return _collect("fluxopt_backends", "backend")


@lru_cache(maxsize=1)
def presets() -> dict[str, Any]:
    """All registered presets by name; a preset named like a backend is refused."""
    table = _collect("fluxopt_presets", "preset")
    clash = sorted(set(table) & set(backends()))
    if clash:
        raise ConfigError(f"the preset '{clash[0]}' has the name of a backend; presets and backends share "
                          "+backend=<name>, so a plugin must rename one of them")
    return table


@lru_cache(maxsize=1)
def models() -> dict[str, Any]:
    """All registered model specs by name."""
    return _collect("fluxopt_models", "model")


def model(name: str) -> Any:
    """The registered model spec ``name``; ConfigError listing the known ones otherwise."""
    registry = models()
    if name not in registry:
        raise ConfigError(f"model={name!r} is not a known model.{did_you_mean(name, registry)} "
                          f"Known models: {', '.join(sorted(registry))}")
    return registry[name]


@lru_cache(maxsize=1)
def metrics() -> dict[str, Any]:
    """All registered fidelity metrics by name."""
    return _collect("fluxopt_metrics", "metric")


class _Relay:
    """``pm.hook`` without the plugins a run disabled: each hook a subset caller."""

    def __init__(self, pm: pluggy.PluginManager, disabled: Iterable[str]):
        self._pm = pm
        self._without = [pm.get_plugin(name) for name in disabled]

    def __getattr__(self, name: str) -> Any:
        return self._pm.subset_hook_caller(name, remove_plugins=self._without)


def plugin_names() -> list[str]:
    """The registered plugins' names (module names; an entry point's name for third-party ones)."""
    return sorted(name for name, _ in get_plugin_manager().list_name_plugin())


def check_disabled(names: Iterable[str]) -> list[str]:
    """``disabled_plugins`` checked against the registered plugins."""
    known = plugin_names()
    for name in names:
        if name not in known:
            raise ConfigError(f"disabled_plugins has {name!r}, which is not a registered plugin."
                              f"{did_you_mean(name, known)} Plugins: {', '.join(known)}")
    return list(names)


def hook(disabled: Iterable[str] = ()) -> Any:
    """The hook relay for firing event hooks, without the plugins named in ``disabled``."""
    pm = get_plugin_manager()
    disabled = list(disabled)
    return _Relay(pm, disabled) if disabled else pm.hook
