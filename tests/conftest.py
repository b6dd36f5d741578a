"""Shared fixtures: an isolated artifact cache per session, helpers to run the CLI, and
in-process registration of test-only plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent

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
            timeout: int = 600) -> subprocess.CompletedProcess[str]:
    """``python -m fluxopt ARGS`` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fluxopt", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
