"""The plugin manager: built-in plugins from ``plugins/`` first, then every installed
distribution's entry point in the group ``fluxopt``.

Registration hooks are collected into name -> spec tables; two specs with one name are an
error that names both distributions, so a third-party plugin can never silently shadow
a built-in.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

import pluggy

from fluxopt import hookspecs
from fluxopt.errors import ConfigError

ENTRY_POINT_GROUP = "fluxopt"

# Core modules that are plugins themselves (models and metrics).
CORE_PLUGINS = ("fluxopt.models", "fluxopt.fidelity")


def builtin_plugin_modules() -> list[str]:
    """Every module of the ``fluxopt_plugins`` package (``plugins/`` in the source tree)."""
    import fluxopt_plugins

    return sorted(f"fluxopt_plugins.{m.name}" for m in pkgutil.iter_modules(fluxopt_plugins.__path__)
                  if not m.name.startswith("_"))


@lru_cache(maxsize=1)
def get_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(ENTRY_POINT_GROUP)
    pm.add_hookspecs(hookspecs)
    for module_name in (*CORE_PLUGINS, *builtin_plugin_modules()):
        pm.register(importlib.import_module(module_name), name=module_name)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return pm


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
def models() -> dict[str, Any]:
    """All registered model specs by name."""
    return _collect("fluxopt_models", "model")


@lru_cache(maxsize=1)
def metrics() -> dict[str, Any]:
    """All registered fidelity metrics by name."""
    return _collect("fluxopt_metrics", "metric")


def config_paths() -> list[str]:
    """Hydra search-path entries contributed by plugins."""
    return [p for p in get_plugin_manager().hook.fluxopt_config_path() if p]


def hook() -> Any:
    """The hook relay, for firing event hooks."""
    return get_plugin_manager().hook
