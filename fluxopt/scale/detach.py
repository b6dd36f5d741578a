"""Running a fluxopt command in the background (``detach=true``).

A build that takes longer than a terminal session, an SSH connection or a job's time slice
(AOTInductor with max-autotune, a TensorRT engine on the full model) is started once in a process
of its own session, so closing the terminal does not stop it. The command runs with its output
directory fixed up front (``hydra.run.dir``, or ``hydra.sweep.dir`` for a sweep), printed before
this process returns, with its console output in ``fluxopt.out`` there. Stopped midway, the
same command with that directory finishes it: a complete, passing result is kept, and a stack's
build reuses what the artifact cache kept (compiled kernels, tuning results, finished packages).
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

OUTPUT_FILE = "fluxopt.out"


def is_detach_override(arg: str) -> bool:
    """``detach=...`` in any Hydra spelling (``+detach=``, ``++detach=``, ``~detach``)."""
    return arg.lstrip("+~").split("=", 1)[0] == "detach"


def output_dir(argv: Sequence[str], multirun: bool, now: _dt.datetime | None = None) -> tuple[Path, list[str]]:
    """The directory the detached command will write to, and ``argv`` without ``detach`` and with
    that directory set: the one given by ``hydra.run.dir`` / ``hydra.sweep.dir``, else a new one
    in the default layout (``outputs/DATE/TIME-ID`` or ``multirun/DATE/TIME-ID``)."""
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    args = [a for a in argv if not is_detach_override(a)]
    given = [a.removeprefix(key) for a in args if a.startswith(key)]
    if given:
        return Path(given[-1]), args
    now = now or _dt.datetime.now()
    path = Path("multirun" if multirun else "outputs") / now.strftime("%Y-%m-%d") / \
        f"{now.strftime('%H-%M-%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    return path, [*args, key + str(path)]


def start(argv: Sequence[str], multirun: bool, env: dict[str, str] | None = None) -> tuple[int, Path]:
    """Start ``python -m fluxopt`` with ``argv`` (minus ``detach``) in a new session, its stdin
    closed and its stdout and stderr appended to ``<output dir>/fluxopt.out``; return its pid
    and the output directory."""
    directory, args = output_dir(argv, multirun)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / OUTPUT_FILE, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "fluxopt", *args], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ if env is None else env))
    return process.pid, directory
