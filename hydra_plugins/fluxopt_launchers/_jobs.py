"""What fluxopt's launchers add to the engines' own: the command's invocation id travels with
each job (so the sweep's verdict counts it, on any node), and a job whose process dies is
recorded in its directory instead of aborting the sweep."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig, open_dict

from fluxopt.environment import INVOCATION_ENV
from fluxopt.files import move_aside
from fluxopt.record import RESULT_FILE, UnreadableRecord, read_record, write_record
from fluxopt.runner import job_record

log = logging.getLogger("fluxopt")


def carry_invocation(config: DictConfig) -> None:
    """Set the invocation id in ``hydra.job.env_set``: Hydra exports it in the job's process,
    wherever that runs (a Ray node or a SLURM host does not inherit this process's environment)."""
    invocation = os.environ.get(INVOCATION_ENV)
    if invocation:
        with open_dict(config):
            config.hydra.job.env_set[INVOCATION_ENV] = invocation


def job_dir(job_config: DictConfig) -> Path:
    """Where a sweep job writes its result (``hydra.sweep.dir``/``hydra.sweep.subdir``)."""
    return Path(str(job_config.hydra.sweep.dir)) / str(job_config.hydra.sweep.subdir)


def record_crashed_job(job_config: DictConfig, reason: str) -> Path:
    """Record, from the launching process, that a job's process died (killed, out of memory,
    lost node): its record is marked incomplete with the reason, or written if the job died
    before writing one, so the summary lists it and the sweep's verdict is negative.
    Returns the job's directory."""
    directory = job_dir(job_config)
    path = directory / RESULT_FILE
    try:
        record = read_record(path)
    except UnreadableRecord:
        move_aside(path, "unreadable")
        record = None
    if record is None:
        record = job_record(job_config, {"invocation": os.environ.get(INVOCATION_ENV),
                                         "overrides": list(job_config.hydra.overrides.task)})
    record.complete, record.job_crash = False, reason
    write_record(path, record)
    return directory


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
