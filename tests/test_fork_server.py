"""The suite's fork server (tests/_fork_server.py) must never hand a command a process that fails
where a new interpreter would not: on a GPU machine, a library whose import initializes CUDA
leaves the server with a context no forked child can use."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import _fork_server

HERE = Path(__file__).parent


def test_a_server_whose_imports_left_no_cuda_context_can_fork():
    assert _fork_server.fork_hazard() is None  # torch is imported here, CUDA untouched on this machine


def test_a_server_whose_imports_initialized_cuda_answers_why_and_serves_nothing():
    """The server, with a torch whose CUDA was initialized by the imports (faked: this machine has no
    GPU), says why in its first line and exits; run_cli then starts new interpreters."""
    script = textwrap.dedent(f"""
        import sys, types
        sys.path.insert(0, {str(HERE)!r})
        sys.modules["torch"] = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
        import _fork_server
        _fork_server.PRELOAD = ("torch",)
        _fork_server.serve()
    """)
    proc = subprocess.run([sys.executable, "-c", script], input='{"argv": []}\n', capture_output=True, text=True,
                          timeout=60)
    hello, *rest = proc.stdout.splitlines()
    assert "initialized CUDA" in json.loads(hello)["hazard"]
    assert rest == [] and proc.returncode == 0  # no child forked for the request
