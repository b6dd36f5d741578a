"""Faults a real user meets: concurrent runs, corrupt or truncated checkpoints, a full disk,
Ctrl-C and kill -9 mid-run, leftovers of earlier runs. Nothing measured is lost, nothing is
overwritten or mislabelled, and every verdict says what happened."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import run_cli, start_cli

from fluxopt import ModelLoadError, plugins
from fluxopt.errors import DiskFullError
from fluxopt.files import write_json_atomic
from fluxopt.models import load_pipeline, local_model_dir


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------------------- run directories
def test_two_runs_started_together_never_share_a_directory(tmp_path):
    args = [sys.executable, "-m", "fluxopt", "+backend=fuse_qkv", "bench.iterations=1", "save_images=false"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    results = sorted(tmp_path.glob("outputs/*/*/result.json"))
    assert len(results) == 2 and results[0].parent != results[1].parent
    for path in results:
        data = json.loads(path.read_text())
        assert data["complete"] and data["stacks"][0]["status"] == "ok"
        assert data["provenance"]["command"].endswith("+backend=fuse_qkv bench.iterations=1 save_images=false")


# ------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_cached_checkpoint_is_detected_and_rebuilt(tmp_path, damage):
    spec = plugins.model("tiny")
    directory = local_model_dir(spec, tmp_path)
    weights = sorted(directory.rglob("*.safetensors"))[0]
    good = weights.read_bytes()
    if damage == "flip":
        _flip_byte(weights)
    else:
        weights.write_bytes(good[: len(good) // 2])
    assert local_model_dir(spec, tmp_path) == directory  # verified, discarded, rebuilt in place
    assert weights.read_bytes() == good
    pipe = load_pipeline(spec, __import__("torch").device("cpu"), __import__("torch").float32, tmp_path)
    assert pipe.transformer is not None


def test_a_damaged_shipped_checkpoint_is_named(tmp_path, monkeypatch):
    import fluxopt_plugins.flux_mini as flux_mini

    copy = tmp_path / "weights"
    shutil.copytree(flux_mini.WEIGHTS_DIR, copy)
    monkeypatch.setattr(flux_mini, "WEIGHTS_DIR", copy)
    bad = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    _flip_byte(bad)
    with pytest.raises(ModelLoadError, match=f"{bad} is corrupt"):
        flux_mini.FLUX_MINI.factory(__import__("torch").device("cpu"), __import__("torch").float32)


def test_a_corrupt_checkpoint_given_by_path_names_the_file(tmp_path):
    spec = plugins.model("tiny")
    source = tmp_path / "mine"
    shutil.copytree(local_model_dir(spec, tmp_path / "cache"), source)
    bad = sorted(source.rglob("*.safetensors"))[0]
    bad.write_bytes(bad.read_bytes()[:64])
    with pytest.raises(ModelLoadError, match=f"{bad} cannot be read"):
        load_pipeline(spec, __import__("torch").device("cpu"), __import__("torch").float32, tmp_path, path=str(source))


# ------------------------------------------------------------------------------- files
def test_a_full_disk_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"measured": 1})

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError, match=f"no space left on the device while writing {path}"):
        write_json_atomic(path, {"measured": 2})
    assert json.loads(path.read_text()) == {"measured": 1}
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left behind


def test_what_cannot_be_parsed_is_moved_aside_never_overwritten(tmp_path):
    from fluxopt.cli import _previous

    path = tmp_path / "result.json"
    path.write_text("{ not json")
    assert _previous(tmp_path, {"resume": True}) == (None, None)
    assert not path.exists() and [p.name.startswith("result.unreadable-") for p in tmp_path.iterdir()] == [True]


def test_resume_skips_only_complete_passing_runs_of_the_same_measurement(tmp_path):
    from fluxopt.cli import _previous
    from fluxopt.record import SCHEMA_VERSION

    config = {"model": {"name": "tiny"}, "bench": {"iterations": 2}, "fidelity": {}, "backend": {"compile": {}},
              "device": "auto", "resume": True, "save_images": True, "verbose": False}
    passed = {"schema_version": SCHEMA_VERSION, "complete": True, "mode": "stack", "config": config,
              "model": {"name": "tiny"}, "stacks": [{"stack": "compile", "status": "ok"}]}
    path = tmp_path / "result.json"
    write_json_atomic(path, passed)
    # output paths, resume and verbosity are not part of the measurement
    assert _previous(tmp_path, {**config, "save_images": False, "verbose": True})[0].to_json()["config"] == config
    write_json_atomic(path, {**passed, "stacks": [{"stack": "compile", "status": "failed", "reason": "x"}]})
    assert _previous(tmp_path, config) == (None, None) and not path.exists()  # a failed job is measured again
    write_json_atomic(path, {**passed, "complete": False})
    assert _previous(tmp_path, config) == (None, None)  # so is an interrupted one without a baseline to keep
    write_json_atomic(path, passed)
    assert _previous(tmp_path, {**config, "bench": {"iterations": 3}}) == (None, None)  # and another measurement
    assert len(list(tmp_path.glob("result.previous-*.json"))) == 3  # all kept


def test_report_skips_a_result_of_the_wrong_shape(tmp_path):
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "result.json").write_text("[]")
    proc = subprocess.run([sys.executable, "-m", "fluxopt.cli.report", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr  # a result that cannot be used makes the verdict incomplete
    assert "not used" in proc.stderr and "expected a JSON object" in proc.stderr
    path = str(tmp_path / "job" / "result.json")
    assert [why.split(":")[0] for why in json.loads((tmp_path / "summary.json").read_text())["unusable"]] == [path]


# ------------------------------------------------------------------------------- interrupts
LONG_RUN = ("+backend=fault_slow", "backend.fault_slow.delay_s=2", "bench.iterations=3")
"""A run whose stack is still timing when the test signals it, on any machine: the test-only
``fault_slow`` backend adds 2 s to every transformer call (a CI run once finished a plain compile
stack's 60 iterations of the tiny model within the second the test waited)."""


def _wait_for_baseline(run_dir: Path, proc: Any) -> None:
    deadline = time.monotonic() + 240
    while not (run_dir / "result.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.0)


def test_ctrl_c_prints_one_line_keeps_partial_results_and_exits_130(tmp_path, plugin_env):
    run_dir = tmp_path / "run"
    with start_cli(*LONG_RUN, f"hydra.run.dir={run_dir}", env=plugin_env) as proc:
        _wait_for_baseline(run_dir, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == (f"fluxopt: error: interrupted; partial results in {run_dir}. To finish, "
                                            f"run the same command with hydra.run.dir={run_dir}")
    assert "Traceback" not in err
    data = json.loads((run_dir / "result.json").read_text())
    assert data["complete"] is False and data["interrupted"] is True and data["baseline"]["status"] == "ok"
    # the stack in progress says which phase it reached and how long it had run
    (stack,) = data["stacks"]
    assert stack["status"] == "failed" and stack["phase"] in ("load", "apply", "build", "warmup", "timing")
    assert stack["reason"].startswith(f"interrupted during {stack['phase']} after ") and stack["elapsed_s"] > 0


@pytest.mark.slow
def test_kill_9_mid_run_leaves_a_parseable_result(tmp_path, plugin_env):
    run_dir = tmp_path / "run"
    with start_cli(*LONG_RUN, f"hydra.run.dir={run_dir}", env=plugin_env) as proc:
        _wait_for_baseline(run_dir, proc)
        proc.kill()
        assert proc.wait(timeout=60) == -signal.SIGKILL
    data = json.loads((run_dir / "result.json").read_text())  # atomic writes: never half a file
    assert data["complete"] is False and data["interrupted"] is False  # it had no chance to say so
    # the stack it was measuring is on record with the last phase it began, as an interrupted stack
    (stack,) = data["stacks"]
    assert stack["status"] == "failed" and stack["phase"] in ("load", "apply", "build", "warmup", "timing")
    assert stack["reason"].startswith(f"interrupted during {stack['phase']} after at least ")
    assert stack["elapsed_s"] > 0
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".result.json.")]
    rerun = run_cli("+backend=compile", "backend.compile.backend=eager", "backend.compile.cache=false",
                    "bench.iterations=1", f"hydra.run.dir={run_dir}")
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert json.loads((run_dir / "result.json").read_text())["complete"] is True
    assert list(run_dir.glob("result.previous-*.json"))  # the interrupted record is kept
