"""The scale ring: running fluxopt on more than one process or machine. torchrun relaunch for
stacks that need several GPUs, detached background runs, the GPU pool of local parallel
launchers, the Hydra launchers (joblib, Ray, submitit) and the search sweeper.

The command line reaches it only through hooks (``fluxopt_engine_selected``,
``fluxopt_check_job``, ``fluxopt_launch``), so ``disabled_plugins=[fluxopt.scale]`` runs every
command in this one process and refuses what only this ring can do (``detach=true``, its
launchers and sweeper).
"""

from __future__ import annotations

import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fluxopt.hookspecs import hookimpl
from fluxopt.scale import detach as _detach
from fluxopt.scale import launchers, search, torchrun
from fluxopt.scale.launchers import gpus_per_local_job

LOCAL_GPUS_RESOLVER = "fluxopt_gpus_per_local_job"  # a local launcher's default GPUs per job


@hookimpl
def fluxopt_register_configs() -> None:
    """The launchers' configs ask ``${fluxopt_gpus_per_local_job:}`` for their default GPUs per job."""
    if not OmegaConf.has_resolver(LOCAL_GPUS_RESOLVER):
        OmegaConf.register_new_resolver(LOCAL_GPUS_RESOLVER, gpus_per_local_job, use_cache=True)


@hookimpl
def fluxopt_engine_selected(group: str, name: str) -> bool | None:
    launchers.check_installed(group, name)
    launchers.register_engine(name)
    return (group, name) in launchers.ENGINE_PLUGINS or None


@hookimpl
def fluxopt_check_job(config: DictConfig, multirun: bool) -> None:
    hydra: Any = config.get("hydra") or {}
    if multirun and "launcher" in hydra:
        launchers.check_resources(hydra.launcher)
    if str((hydra.get("sweeper") or {}).get("_target_", "")).endswith("FluxoptSearchSweeper"):
        search.limits_from(config)
        search.search_space(search.backends_from(config))


@hookimpl
def fluxopt_launch(argv: list[str], processes: int, detach: bool, multirun: bool) -> int | None:
    if detach:
        pid, directory = _detach.start(argv, multirun)
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        print(f"fluxopt: running in the background (pid {pid}); console output in {directory / _detach.OUTPUT_FILE}, "
              f"results in {directory}. Once it has stopped (fluxopt.out ends with its verdict), the same command "
              f"with {key}={directory} finishes what it left", file=sys.stderr)
        return 0
    status = torchrun.maybe_relaunch(argv, processes)
    if status is None:
        torchrun.init_rank()
    return status
