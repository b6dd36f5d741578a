"""What fluxopt's launchers add to the engines' own: the command's invocation id travels with
each job (so the sweep's verdict counts it, on any node), and a job whose process dies is
recorded in its directory instead of aborting the sweep."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, open_dict

from fluxopt.environment import INVOCATION_ENV
from fluxopt.sweep import record_crashed_job

log = logging.getLogger("fluxopt")


def carry_invocation(config: DictConfig) -> None:
    """Set the invocation id in ``hydra.job.env_set``: Hydra exports it in the job's process,
    wherever that runs (a Ray node or a SLURM host does not inherit this process's environment)."""
    invocation = os.environ.get(INVOCATION_ENV)
    if invocation:
        with open_dict(config):
            config.hydra.job.env_set[INVOCATION_ENV] = invocation


def crashed_job(job_config: DictConfig, overrides: Sequence[str], error: BaseException) -> JobReturn:
    """A job whose process died: recorded on disk, returned as a completed job without a value.

    Not ``JobStatus.FAILED``: Hydra's sweepers re-raise a failed job's error and stop the sweep,
    and the point of running jobs in other processes is that the rest of the sweep finishes."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    reason = f"{type(error).__name__}: {' '.join(lines[:2]) if lines else 'no message'}"
    directory = record_crashed_job(job_config, reason)
    log.error("job %s (%s) died: %s", job_config.hydra.job.num, " ".join(overrides), reason)
    ret = JobReturn(overrides=list(overrides), working_dir=str(directory),
                    task_name=str(job_config.hydra.job.name), status=JobStatus.COMPLETED)
    ret.return_value = None
    return ret
