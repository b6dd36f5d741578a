"""Shared fixtures: an isolated artifact cache per session, helpers to run the CLI, and
in-process registration of test-only plugins."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

# The suite never downloads: Hugging Face's hub is offline for every test and every CLI process it
# starts (set before the fork server imports the hub, which reads it once), so a command that sets
# it itself still runs in the fork server.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Under pytest-xdist (one worker per core): one torch/OpenMP thread per worker and per CLI process it
# starts (the variable is inherited), instead of every process spreading over every core.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def fluxopt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every CLI subprocess) of a session uses one fresh cache directory, shared by
    the xdist workers (the cache is locked and verified for concurrent processes, which the suite
    then exercises too; what one worker compiles the other reuses). Tests that need a cold cache
    make their own."""
    root = tmp_path_factory.getbasetemp()
    shared = root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root
    path = shared / "fluxopt-cache"
    path.mkdir(exist_ok=True)
    os.environ["FLUXOPT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def fluxopt_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs of the suite (and of its CLI subprocesses) go to a results store of the session's own,
    never to fluxopt.sqlite in the checkout. Tests of the store make their own."""
    path = tmp_path_factory.getbasetemp() / "fluxopt.sqlite"
    os.environ["FLUXOPT_STORE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe():
    """The embedded tiny model, loaded once (tests that mutate it must load their own)."""
    from fluxopt.serving import load_model

    return load_model("tiny", device="cpu")


def run_cli(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: int = 600, fresh: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m fluxopt ARGS`` in a process of its own, as a user would run it: a child of this
    worker's fork server (tests/_fork_server.py), which has the heavy libraries imported already,
    or a new interpreter (``fresh``, or an environment the server cannot give: what importing the
    libraries prints is seen only there)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    server = None if fresh else _fork_server()
    if server is not None and server.takes(full_env):
        return server.run(list(args), full_env, cwd or REPO, timeout)
    return subprocess.run([sys.executable, "-m", "fluxopt", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def start_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Iterator[Any]:
    """``python -m fluxopt ARGS`` started and left running, for a test that signals it mid-run: a
    child of this worker's fork server where the environment allows (:meth:`_ForkServer.start`),
    else a new interpreter; either way an object with Popen's ``pid``, ``poll``, ``send_signal``,
    ``kill``, ``wait``, ``communicate`` and ``returncode``. A command still running when the block
    ends (a failed assertion) is killed, so the server is free for the worker's next test."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    server = _fork_server()
    if server is not None and server.takes(full_env):
        proc = server.start(list(args), full_env, cwd or REPO)
    else:
        proc = subprocess.Popen([sys.executable, "-m", "fluxopt", *args], cwd=cwd or REPO, env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


class _Started:
    """A command running in a child of the fork server, which answers with its exit status when it
    ends; the server takes no other command until then."""

    def __init__(self, server: _ForkServer, pid: int, tmp: tempfile.TemporaryDirectory, argv: list[str]) -> None:
        self.server, self.pid, self.tmp, self.argv = server, pid, tmp, argv
        self.returncode: int | None = None

    def _finish(self, timeout: float) -> int | None:
        if self.returncode is None:
            done = self.server._reply(timeout)
            if done is None:
                return None
            self.returncode = done["returncode"]
            self.server.lock.release()
        return self.returncode

    def poll(self) -> int | None:
        return self._finish(0)

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        if self.returncode is None:
            os.killpg(self.pid, signal.SIGKILL)  # the child's group: what it started goes too

    def wait(self, timeout: float = 600) -> int:
        code = self._finish(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(["python", "-m", "fluxopt", *self.argv], timeout)
        return code

    def communicate(self, timeout: float = 600) -> tuple[str, str]:
        self.wait(timeout)
        return tuple(Path(self.tmp.name, name).read_text(errors="replace") for name in ("stdout", "stderr"))


class _ForkServer:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_fork_server.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, cwd=REPO)
        self.pending = b""
        try:
            hello = self._reply(300)
            if hello is None:
                raise RuntimeError("no answer within 300 s")
            if hello.get("hazard"):
                raise RuntimeError(hello["hazard"])
        except BaseException:
            self.proc.kill()
            raise
        self.env, self.set_by_imports = hello["env"], hello["set_by_imports"]
        self.lock = threading.Lock()

    def _reply(self, timeout: float) -> dict[str, Any] | None:
        """The server's next reply line, or None when none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                raise RuntimeError("the fork server exited")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def takes(self, env: dict[str, str]) -> bool:
        from _fork_server import runs_here

        return self.proc.poll() is None and runs_here(env, self.env, self.set_by_imports)

    def start(self, argv: list[str], env: dict[str, str], cwd: Path) -> _Started:
        """Start a command and return while it runs; the server is this command's until it ends."""
        self.lock.acquire()
        tmp = tempfile.TemporaryDirectory()
        request = {"argv": argv, "env": env, "cwd": str(cwd), "stdout": str(Path(tmp.name, "stdout")),
                   "stderr": str(Path(tmp.name, "stderr"))}
        self.proc.stdin.write(json.dumps(request).encode() + b"\n")
        return _Started(self, self._reply(60)["pid"], tmp, argv)

    def run(self, argv: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
        started = self.start(argv, env, cwd)
        command = ["python", "-m", "fluxopt", *argv]
        try:
            try:
                started.wait(timeout)
            except subprocess.TimeoutExpired:
                started.kill()
                started.wait(60)
                raise subprocess.TimeoutExpired(command, timeout, *started.communicate()) from None
            return subprocess.CompletedProcess(command, started.returncode, *started.communicate())
        finally:
            started.tmp.cleanup()


_SERVER: list[_ForkServer | None] = []


def _fork_server() -> _ForkServer | None:
    """This worker's fork server, started on first use (None with FLUXOPT_TEST_FORK_SERVER=0)."""
    if os.environ.get("FLUXOPT_TEST_FORK_SERVER", "1") == "0":
        return None
    if not _SERVER:
        try:
            _SERVER.append(_ForkServer())
        except (OSError, RuntimeError, ValueError) as exc:  # no server: every command gets a new interpreter
            warnings.warn(f"the fork server did not start ({exc}); CLI tests start new interpreters", stacklevel=2)
            _SERVER.append(None)
    return _SERVER[0]


def read_result(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())


@pytest.fixture
def register_plugin():
    """Register a test plugin in-process for one test; the registry is rebuilt afterwards."""
    from fluxopt import plugins

    registered = []

    def _register(module: Any, name: str) -> None:
        plugins.get_plugin_manager().register(module, name=name)
        registered.append(module)
        _clear(plugins)

    yield _register
    pm = plugins.get_plugin_manager()
    for module in registered:
        pm.unregister(module)
    _clear(plugins)


def _clear(plugins: Any) -> None:
    for fn in (plugins.backends, plugins.presets, plugins.models, plugins.metrics):
        fn.cache_clear()


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Install the example third-party plugin and the test-only fault plugin (real
    ``pip install`` of their packages, entry points included) into a private target directory;
    returns the environment under which ``python -m fluxopt`` sees them."""
    import shutil

    target = tmp_path_factory.mktemp("site")
    sources = tmp_path_factory.mktemp("plugin-src")  # a private copy: xdist workers build concurrently
    copies = [shutil.copytree(src, sources / src.name, ignore=shutil.ignore_patterns("build", "*.egg-info"))
              for src in (REPO / "examples" / "fluxopt-example-plugin", REPO / "tests" / "fault_plugin")]
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), *map(str, copies)], check=True, capture_output=True, text=True)
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


# aoti as the default bake-off runs it (default options), in bf16 as on a GPU: the dtype whose
# roundings a whole-graph package must reproduce (eager_rounding); small shapes.
SMALL_BF16_ARGS = ("bench.steps=2", "bench.height=64", "bench.width=64", "model.dtype=bfloat16")


def _wait_complete(run_dir: Path, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            data = json.loads((run_dir / "result.json").read_text())
            if data.get("complete"):
                return data
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(1)
    raise AssertionError(f"the background build did not finish in {timeout_s} s: "
                         + (run_dir / "fluxopt.out").read_text()[-3000:])


@dataclasses.dataclass
class AotiThenBakeoff:
    cold: dict[str, Any]  # the background aoti build's record
    bakeoff: dict[str, Any]  # the default bake-off's record
    bakeoff_proc: subprocess.CompletedProcess[str]
    console: str  # what the detaching command and the background build printed, and the bake-off's stderr


@pytest.fixture(scope="session")
def aoti_then_default_bakeoff(tmp_path_factory: pytest.TempPathFactory,
                              plugin_env: dict[str, str]) -> AotiThenBakeoff:
    """Two processes on one fresh artifact cache, as a user pays a long build once: ``+backend=aoti
    build_only=true detach=true`` builds cold in the background and measures nothing; then the
    default bake-off (``python -m fluxopt`` with no stack: every backend this machine can run, the
    fault plugin's included), whose aoti stack starts warm from that cache. The tests that use it
    share the xdist group ``aoti_two_runs``, so one worker runs it once."""
    cache = tmp_path_factory.mktemp("aoti-cache")  # its own: what the cold build writes is told apart
    cold_dir, warm_dir = tmp_path_factory.mktemp("aoti-cold"), tmp_path_factory.mktemp("bakeoff")
    env = {"FLUXOPT_CACHE_DIR": str(cache)}
    proc = run_cli("+backend=aoti", *SMALL_BF16_ARGS, "build_only=true", "detach=true", f"hydra.run.dir={cold_dir}",
                   env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pid = int(re.search(r"running in the background \(pid (\d+)\)", proc.stderr).group(1))
    try:  # a session of its own: closing the terminal (SIGHUP to the session) does not stop it
        assert os.getsid(pid) == pid != os.getsid(0)
    except ProcessLookupError:
        pass  # already finished: nothing left to check
    cold = _wait_complete(cold_dir, 500)
    bakeoff = run_cli(*SMALL_BF16_ARGS, "bench.iterations=1", f"hydra.run.dir={warm_dir}", env={**plugin_env, **env})
    return AotiThenBakeoff(cold, read_result(warm_dir), bakeoff,
                           proc.stderr + (cold_dir / "fluxopt.out").read_text() + bakeoff.stderr)
