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

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from fluxopt.sweep import pin_output_dir

OUTPUT_FILE = "fluxopt.out"


def is_detach_override(arg: str) -> bool:
    """``detach=...`` in any Hydra spelling (``+detach=``, ``++detach=``, ``~detach``)."""
    return arg.lstrip("+~").split("=", 1)[0] == "detach"


def background_command(argv: Sequence[str], multirun: bool) -> tuple[Path, list[str]]:
    """The directory the detached command will write to, and its ``argv``: without ``detach`` (the
    background process runs it) and with that directory pinned, so this process can announce it."""
    return pin_output_dir([a for a in argv if not is_detach_override(a)], multirun)


def start(argv: Sequence[str], multirun: bool, env: dict[str, str] | None = None) -> tuple[int, Path]:
    """Start ``python -m fluxopt`` with ``argv`` (minus ``detach``) in a new session, its stdin
    closed and its stdout and stderr appended to ``<output dir>/fluxopt.out``; return its pid
    and the output directory."""
    directory, args = background_command(argv, multirun)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / OUTPUT_FILE, "ab") as out:
        process = subprocess.Popen([sys.executable, "-m", "fluxopt", *args], stdin=subprocess.DEVNULL, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True,
                                   env=dict(os.environ if env is None else env))
    return process.pid, directory
