"""The Hydra engines fluxopt ships configs for (launchers that run sweep jobs, the search
sweeper), what each needs installed, and the checks on their settings that must fail before a
sweep starts rather than hang inside it (a Ray task asking for a GPU this machine lacks waits
forever)."""

from __future__ import annotations

import importlib.util
from typing import Any

from fluxopt.errors import ConfigError

# (config group, name) -> (Hydra plugin module, how to install it).
ENGINE_PLUGINS = {
    ("hydra/launcher", "fluxopt_joblib"): ("hydra_plugins.hydra_joblib_launcher", "pip install 'fluxopt[launchers]'"),
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "pip install 'fluxopt[launchers]'"),
    ("hydra/launcher", "fluxopt_ray"): ("hydra_plugins.hydra_ray_launcher", "pip install 'fluxopt[ray]'"),
    ("hydra/launcher", "fluxopt_submitit_local"): ("hydra_plugins.hydra_submitit_launcher",
                                                   "pip install 'fluxopt[slurm]'"),
    ("hydra/launcher", "fluxopt_slurm"): ("hydra_plugins.hydra_submitit_launcher", "pip install 'fluxopt[slurm]'"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "pip install 'fluxopt[slurm]'"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "pip install 'fluxopt[slurm]'"),
    ("hydra/sweeper", "fluxopt_search"): ("hydra_plugins.hydra_optuna_sweeper", "pip install 'fluxopt[search]'"),
}


# fluxopt's own Hydra plugin classes (package hydra_plugins.fluxopt_launchers), by config name.
FLUXOPT_ENGINES = {
    "fluxopt_ray": "hydra_plugins.fluxopt_launchers._ray_launcher.FluxoptRayLauncher",
    "fluxopt_submitit_local": "hydra_plugins.fluxopt_launchers._submitit_launcher.FluxoptSubmititLocalLauncher",
    "fluxopt_slurm": "hydra_plugins.fluxopt_launchers._submitit_launcher.FluxoptSlurmLauncher",
    "fluxopt_search": "hydra_plugins.fluxopt_launchers._search_sweeper.FluxoptSearchSweeper",
}


def register_engine(name: str) -> None:
    """Register fluxopt's plugin class for a launcher/sweeper config with Hydra, by name: only the
    engine a run asks for is imported (Hydra's scan of ``hydra_plugins`` would import them all,
    failing loudly for engines not installed, and misses editable installs)."""
    if name not in FLUXOPT_ENGINES:
        return
    from hydra.core.plugins import Plugins

    module, _, cls = FLUXOPT_ENGINES[name].rpartition(".")
    Plugins.instance().register(getattr(importlib.import_module(module), cls))


def check_installed(group: str, name: str) -> None:
    """Refuse a launcher or sweeper whose Hydra plugin is not installed, saying how to get it."""
    if (group, name) not in ENGINE_PLUGINS:
        return
    module, install = ENGINE_PLUGINS[(group, name)]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        kind = "launcher" if group.endswith("launcher") else "sweeper"
        raise ConfigError(f"{group}={name} needs the Hydra {kind} plugin '{module}', which is not installed ({install})")


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpus_per_local_job() -> int:
    """The default GPUs per job of a launcher that runs jobs on this machine: one where GPUs
    exist, none on a CPU machine (a default that asks for a GPU would refuse every CPU sweep)."""
    return 1 if local_gpus() else 0


def check_resources(launcher: Any) -> None:
    """GPUs a job asks its engine for, against what a local engine can give (``launcher`` is
    ``hydra.launcher`` of a composed job). A remote Ray cluster is not checked: it may have them."""
    target = str(launcher.get("_target_", ""))
    if target.endswith("FluxoptRayLauncher"):
        ray = launcher.get("ray") or {}
        wanted = (ray.get("remote") or {}).get("num_gpus") or 0
        if (ray.get("init") or {}).get("address") is None and wanted > local_gpus():
            raise ConfigError(f"hydra.launcher.ray.remote.num_gpus={wanted}, but this machine has {local_gpus()} "
                              "GPU(s) and no Ray cluster is given (hydra.launcher.ray.init.address): Ray would wait "
                              "forever; use num_gpus=0 to run the jobs on the CPU")
    elif target.endswith("FluxoptSubmititLocalLauncher"):
        wanted = launcher.get("gpus_per_node") or 0
        if wanted > local_gpus():
            raise ConfigError(f"hydra.launcher.gpus_per_node={wanted}, but this machine has {local_gpus()} GPU(s); "
                              "use gpus_per_node=0 to run the jobs on the CPU")
