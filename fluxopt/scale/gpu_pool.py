"""Pinning Hydra multirun jobs to GPUs of one host.

A launcher that runs jobs in parallel processes (``hydra/launcher=fluxopt_joblib``) gives each
job the whole machine; :class:`GpuPoolCallback` narrows ``CUDA_VISIBLE_DEVICES`` to one entry
of a pool (``hydra.callbacks.fluxopt_gpu_pool.gpus=[0,1]``) in the job's process, in
``on_job_start``: before the task function runs and so before torch initialises CUDA (torch
is imported by then, but CUDA is initialised lazily, on first use).

Worker processes of joblib/loky are reused for later jobs, and CUDA cannot be moved to another
device once initialised in a process. So the GPU belongs to the *worker process*, not the job:
the first job a worker runs claims slot ``job.num % len(gpus)`` (the next free slot if another
worker holds it) with an exclusive ``flock`` on ``<sweep dir>/.gpu_pool/slot-<i>.lock``, held
until the worker exits; the worker's later jobs keep that GPU. Two live workers never share a
slot unless there are more workers than GPUs (then a warning, and slots are shared).

Every job records its assignment in ``result.json`` under ``environment.gpu_assignment``
(pool, slot, ``CUDA_VISIBLE_DEVICES``, job number, pid, whether CUDA was already initialised).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fluxopt.environment import GPU_ASSIGNMENT_ENV

log = logging.getLogger("fluxopt")


# Held for the life of the process (a worker keeps its GPU): slot index -> open lock file.
_claimed: dict[str, Any] = {}


def _try_lock(path: Path) -> Any | None:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - kept open on purpose: the lock is the claim
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        return None
    return handle


def claim_slot(pool: list[str], job_num: int, lock_dir: Path) -> tuple[int, bool]:
    """The pool slot of this process: its existing claim, else ``job_num % len(pool)`` or the next
    free one (locked until the process exits). Returns (slot, exclusive)."""
    if "slot" in _claimed:
        return _claimed["slot"], _claimed["exclusive"]
    n = len(pool)
    for k in range(n):
        slot = (job_num + k) % n
        handle = _try_lock(lock_dir / f"slot-{slot}.lock")
        if handle is not None:
            _claimed.update(slot=slot, exclusive=True, handle=handle)
            return slot, True
    slot = job_num % n
    log.warning("GPU pool %s: every slot is held by another worker (more workers than GPUs); "
                "job %s shares slot %s", pool, job_num, slot)
    _claimed.update(slot=slot, exclusive=False, handle=None)
    return slot, False


def assign(pool: list[str], job_num: int, lock_dir: Path) -> dict[str, Any]:
    """Set ``CUDA_VISIBLE_DEVICES`` for this process from the pool; returns the record."""
    import torch

    initialised = torch.cuda.is_initialized()
    slot, exclusive = claim_slot(pool, job_num, lock_dir)
    visible = pool[slot]
    if initialised and os.environ.get("CUDA_VISIBLE_DEVICES") != visible:
        log.warning("job %s: CUDA is already initialised in this process with CUDA_VISIBLE_DEVICES=%s; "
                    "the assignment %s cannot take effect", job_num, os.environ.get("CUDA_VISIBLE_DEVICES"), visible)
    os.environ["CUDA_VISIBLE_DEVICES"] = visible
    record = {"pool": pool, "slot": slot, "exclusive": exclusive, "cuda_visible_devices": visible,
              "job_num": job_num, "pid": os.getpid(), "hostname": socket.gethostname(),
              "cuda_initialized_before": initialised}
    os.environ[GPU_ASSIGNMENT_ENV] = json.dumps(record)
    return record


class GpuPoolCallback(Callback):
    """Hydra callback: one GPU of ``gpus`` per job process (inactive while ``gpus`` is empty)."""

    def __init__(self, gpus: list[Any] | None = None) -> None:
        self.pool = [str(g) for g in (gpus or [])]

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.pool:
            return
        n_jobs = (config.hydra.get("launcher") or {}).get("n_jobs")
        if isinstance(n_jobs, int) and n_jobs > len(self.pool):
            log.warning("hydra.launcher.n_jobs=%s exceeds the GPU pool %s: workers will share GPUs",
                        n_jobs, self.pool)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if not self.pool or config.hydra.mode != RunMode.MULTIRUN:
            return
        lock_dir = Path(config.hydra.sweep.dir) / ".gpu_pool"
        record = assign(self.pool, int(config.hydra.job.num), lock_dir)
        log.info("job %s: CUDA_VISIBLE_DEVICES=%s (GPU pool slot %s, pid %s)", record["job_num"],
                 record["cuda_visible_devices"], record["slot"], record["pid"])
