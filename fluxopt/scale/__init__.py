"""The scale ring: running fluxopt on more than one process or machine. torchrun relaunch for
stacks that need several GPUs, detached background runs, the GPU pool of local parallel
launchers, the Hydra launchers (joblib, Ray, submitit) and the search sweeper.
"""

from __future__ import annotations

from omegaconf import OmegaConf

from fluxopt.hookspecs import hookimpl
from fluxopt.scale.launchers import gpus_per_local_job

LOCAL_GPUS_RESOLVER = "fluxopt_gpus_per_local_job"  # a local launcher's default GPUs per job


@hookimpl
def fluxopt_register_configs() -> None:
    """The launchers' configs ask ``${fluxopt_gpus_per_local_job:}`` for their default GPUs per job."""
    if not OmegaConf.has_resolver(LOCAL_GPUS_RESOLVER):
        OmegaConf.register_new_resolver(LOCAL_GPUS_RESOLVER, gpus_per_local_job, use_cache=True)
