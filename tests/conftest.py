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


@pytest.fixture(scope="session", autouse=True)
def fluxopt_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test (and every CLI subprocess) uses one fresh cache directory."""
    path = tmp_path_factory.mktemp("fluxopt-cache")
    os.environ["FLUXOPT_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_pipe():
    """The embedded tiny model, loaded once (tests that mutate it must load their own)."""
    from fluxopt.api import load_model

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


# The slowest tests and xdist groups (seconds on the 2-core CI machine, from `pytest --durations`,
# 2026-11-26), longest first. They are collected first, so pytest-xdist starts them at once and the
# short tests fill in around them; collected in file order, the last long one started late and the
# other worker idled (a 2-worker run spent ~100 s of its ~550 s on one worker alone).
SLOW_FIRST = (
    "tests/test_bakeoff.py::test_no_backend_compares_everything_available_and_lists_skipped",  # 107
    "fault_sweep",  # group: 89 s fixture + ~50 s of tests
    "aoti_two_runs",  # group: 81 s fixture
    "tests/test_engines.py::test_submitit_local_sweep_records_a_crashed_job_and_finishes_the_others",  # 47
    "tests/test_engines.py::test_ray_sweep_records_a_crashed_job_and_finishes_the_others",  # 42
    "tests/test_cli.py::test_compile_run_reports_everything_and_passes_lossless_fidelity",  # 33
    "tests/test_libstdcxx.py::test_a_real_package_is_built_and_loaded_with_the_system_compiler",  # 33
    "joblib_sweeps",  # group: 30 s fixture
    "tests/reliability/test_faults.py::test_kill_9_mid_run_leaves_a_parseable_result",  # 26
    "tests/test_bakeoff.py::test_reproduce_from_saved_hydra_config",  # 24
    "tests/test_bakeoff.py::test_global_state_does_not_leak_between_stacks",  # 22
    "tests/test_engines.py::test_search_finds_a_stack_under_limits_and_keeps_every_trial",  # 21
    "tests/test_trt_fp8.py::test_cli_stop_after_onnx_runs_end_to_end",  # 20
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Move the tests of ``SLOW_FIRST`` to the front, longest first; the rest keep their order."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def position(item: pytest.Item) -> int:
        group = item.get_closest_marker("xdist_group")
        if group is not None and group.args and group.args[0] in rank:
            return rank[group.args[0]]
        return rank.get(item.nodeid.split("[")[0], len(rank))

    items.sort(key=position)
