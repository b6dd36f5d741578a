"""A built wheel (not only the editable checkout) carries every package, the Hydra configs and
the built-in plugins, and works when installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

# one wheel build per worker that runs these tests: two builds of the checkout at once share its
# build/ directory and break each other
pytestmark = pytest.mark.xdist_group("wheel")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(REPO)], check=True, capture_output=True, text=True)
    (path,) = out.glob("fluxopt-*.whl")
    return path


def test_wheel_contains_every_source_package_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for init in (REPO / "fluxopt").rglob("__init__.py"):
        rel = init.relative_to(REPO).as_posix()
        if "/weights/" not in rel:
            assert rel in names, f"{rel} missing from the wheel"
    for path in (REPO / "fluxopt_plugins").rglob("*.py"):
        assert "fluxopt_plugins/" + path.relative_to(REPO / "fluxopt_plugins").as_posix() in names
    for path in (REPO / "fluxopt_plugins" / "flux_mini" / "weights").rglob("*"):
        if path.is_file():
            assert "fluxopt_plugins/flux_mini/weights/" + path.relative_to(REPO / "fluxopt_plugins/flux_mini/weights").as_posix() in names
    for path in (REPO / "conf").rglob("*.yaml"):
        assert "fluxopt/conf/" + path.relative_to(REPO / "conf").as_posix() in names
    assert any(n.endswith("entry_points.txt") for n in names)
    build_info = json.loads(zipfile.ZipFile(wheel).read("fluxopt/_build_info.json"))
    assert build_info["revision"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                     text=True).stdout.strip()


def test_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True, text=True)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-m", "fluxopt", "+backend=fuse_qkv", "bench.iterations=1",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a new interpreter: what the libraries print while they are imported stays off the console too
    # (the suite's other CLI tests run in children of a fork server, where those imports are done)
    assert all(line.startswith("fluxopt") for line in proc.stderr.splitlines() if line.strip()), proc.stderr[-3000:]
    check = subprocess.run([sys.executable, "-c", "import fluxopt, fluxopt_plugins; print(fluxopt.__file__)"],
                           cwd=workdir, env=env, capture_output=True, text=True, check=True)
    assert check.stdout.startswith(str(target))
    git = json.loads((tmp_path / "run" / "result.json").read_text())["environment"]["git"]
    assert git["source"] == "recorded at install" and len(git["revision"]) == 40  # known without a checkout
    # Hydra's plugin scan (which imports every public module under hydra_plugins) leaves fluxopt's
    # engines alone: on a machine without Ray or submitit it would print an import error each run
    scan = subprocess.run([sys.executable, "-c", "import sys; from hydra.core.plugins import Plugins; "
                           "Plugins.instance(); print(sorted(m for m in sys.modules if 'fluxopt_launchers' in m))"],
                          cwd=workdir, env=env, capture_output=True, text=True, check=True)
    assert scan.stdout.strip() == "['hydra_plugins.fluxopt_launchers']", scan.stdout
    assert "Error importing" not in proc.stderr + scan.stderr


def test_a_copy_of_the_source_inside_another_repository_records_no_revision(tmp_path):
    """Built from a copy that is not its own git checkout (vendored into some other repository),
    the package must not record that other repository's revision as its own."""
    import shutil

    outer = tmp_path / "outer"
    copy = outer / "vendor" / "fluxopt"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", "build", "*.egg-info", "outputs", "multirun",
                                                              "docs", "tests", "benchmarks", ".whl", "__pycache__"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(outer)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "vendored"], check=True)
    out = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(out), str(copy)], check=True, capture_output=True, text=True)
    (path,) = out.glob("fluxopt-*.whl")
    with zipfile.ZipFile(path) as archive:
        info = json.loads(archive.read("fluxopt/_build_info.json"))
    assert info == {"revision": None, "dirty": None}
    # the sender of a copy names its revision (the GPU machine's copy is built this way)
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    env = {**os.environ, "FLUXOPT_SOURCE_REVISION": revision + "+dirty"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "told"), str(copy)], check=True, capture_output=True, text=True, env=env)
    (path,) = (tmp_path / "told").glob("fluxopt-*.whl")
    with zipfile.ZipFile(path) as archive:
        assert json.loads(archive.read("fluxopt/_build_info.json")) == {"revision": revision, "dirty": True}
