"""Launching fluxopt under torchrun for stacks that need several processes (one per GPU).

A backend says how many processes it needs (``Backend.processes(options)``); when a requested
stack needs more than one, :func:`maybe_relaunch` re-executes the same command line under
``python -m torch.distributed.run --standalone --nproc-per-node N -m fluxopt ...``. Inside,
every rank runs the same Hydra job in lock-step; only rank 0 writes ``result.json``, images,
reports and the sweep summary (:func:`writes_results`), the others work in a scratch directory.

NVLink multicast stays off in the launched environment (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``).
"""

from __future__ import annotations

import datetime as _dt
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from fluxopt.environment import LAUNCHED_ENV, MULTICAST_OFF, in_torchrun
from fluxopt.errors import ConfigError
from fluxopt.sweep import pin_output_dir


def torchrun_command(argv: Sequence[str], nproc: int, env: Mapping[str, str] | None = None,
                     now: _dt.datetime | None = None,
                     python: str | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that re-run ``python -m fluxopt ARGV`` with ``nproc`` ranks.

    Hydra's output directory defaults use ``${now:...}``, which the ranks would resolve a moment
    apart; the directory is pinned here (unless given) so every rank uses the same one.
    """
    _, args = pin_output_dir(argv, multirun=any(a in ("-m", "--multirun") for a in argv), now=now)
    cmd = [python or sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", "-m", "fluxopt", *args]
    new_env = {**(os.environ if env is None else env), **MULTICAST_OFF, LAUNCHED_ENV: "1"}
    return cmd, new_env


def maybe_relaunch(argv: Sequence[str], nproc: int) -> int | None:
    """Re-run under torchrun with ``nproc`` ranks when that is more than one; returns its exit
    status (None: run here as usual)."""
    if in_torchrun() or nproc <= 1:
        return None
    import torch

    if torch.cuda.device_count() < nproc:
        return None  # run here: the backend's requirement check refuses the stack with the reason
    if any(a.startswith("hydra/launcher=") for a in argv):
        raise ConfigError(f"a stack that needs {nproc} processes launches its own ranks with torchrun and cannot run "
                          "under another hydra/launcher; run it with the default launcher (or one SLURM job "
                          "per sweep job with gpus_per_node=world_size)")
    cmd, env = torchrun_command(argv, nproc)
    print(f"fluxopt: the stack needs {nproc} processes; launching: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd, env=env)


def init_rank() -> None:
    """Inside torchrun: bind this rank to its GPU and join the process group (NCCL), before any
    model is loaded on ``cuda``. Nothing outside torchrun or without CUDA."""
    if "LOCAL_RANK" not in os.environ:
        return
    for key, value in MULTICAST_OFF.items():
        os.environ.setdefault(key, value)
    import torch
    import torch.distributed as dist

    if not torch.cuda.is_available() or dist.is_initialized():
        return
    local = int(os.environ["LOCAL_RANK"])
    if local >= torch.cuda.device_count():
        return  # the backend's requirement check reports it
    torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local))
