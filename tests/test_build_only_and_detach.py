"""``build_only=true`` (build each stack, measure nothing) and ``detach=true`` (run in the
background): a build-only sweep's records and verdict, the command line the background process
gets (no ``detach``, the output directory fixed and announced), and bad input answered at once,
before anything is started. A background build-only run followed by a warm measuring run is
tested end to end in tests/test_aoti.py."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from conftest import read_result, run_cli

from fluxopt.scale.detach import background_command, is_detach_override
from fluxopt.record import record_from_json
from fluxopt.sweep import pin_output_dir
from fluxopt.runner import can_reuse


@pytest.mark.parametrize(("arg", "expected"), [("detach=true", True), ("+detach=true", True), ("++detach=1", True),
                                               ("~detach", True), ("detached=true", False),
                                               ("backend.x.detach=true", False), ("+backend=compile", False)])
def test_every_spelling_of_the_detach_override_is_recognised(arg, expected):
    assert is_detach_override(arg) is expected


def test_the_background_command_has_no_detach_and_a_fixed_output_directory():
    argv = ["+backend=aoti", "detach=true", "build_only=true"]
    now = dt.datetime(2026, 11, 26, 7, 30, 5)
    path, args = pin_output_dir(argv, multirun=False, now=now)
    assert path.parts[:2] == ("outputs", "2026-11-26") and path.name.startswith("07-30-05-")
    assert args == [*argv, f"hydra.run.dir={path}"]
    assert pin_output_dir(argv, multirun=False, now=now)[0] != path  # two commands in the same second: two directories
    path, args = background_command(argv, multirun=False)
    assert args == ["+backend=aoti", "build_only=true", f"hydra.run.dir={path}"]
    sweep, args = background_command(["-m", "+backend=compile,fbcache", "+detach=true"], multirun=True)
    assert sweep.parts[0] == "multirun" and args == ["-m", "+backend=compile,fbcache", f"hydra.sweep.dir={sweep}"]


def test_a_detached_sweep_starts_in_the_background(tmp_path, monkeypatch, capsys):
    """The sweep's directory is pinned before the command is checked; ``detach`` must survive it."""
    from fluxopt import cli
    from fluxopt.scale import detach

    started = []
    monkeypatch.setattr(detach, "start", lambda argv, multirun: started.append((argv, multirun)) or (1, tmp_path))
    with pytest.raises(SystemExit) as exit_:
        cli._main(["-m", "+backend=fuse_qkv,channels_last", "detach=true", f"hydra.sweep.dir={tmp_path}"])
    assert exit_.value.code == 0 and len(started) == 1
    argv, multirun = started[0]
    assert multirun and "detach=true" in argv and f"hydra.sweep.dir={tmp_path}" in argv
    assert "running in the background" in capsys.readouterr().err
    assert not (tmp_path / "sweep.json").exists()  # nothing ran here


def test_detach_is_refused_without_the_ring_that_runs_it(tmp_path, capsys):
    from fluxopt import cli

    with pytest.raises(SystemExit) as exit_:
        cli._main(["+backend=fuse_qkv", "detach=true", "disabled_plugins=[fluxopt.scale]", f"hydra.run.dir={tmp_path}"])
    assert exit_.value.code == 2
    assert "detach=true: no plugin runs commands in the background" in capsys.readouterr().err


def test_a_given_output_directory_is_kept():
    path, args = background_command(["detach=true", "hydra.run.dir=/data/run1", "+backend=compile"], multirun=False)
    assert path == Path("/data/run1") and args == ["hydra.run.dir=/data/run1", "+backend=compile"]


def test_bad_input_is_refused_before_anything_starts_in_the_background(tmp_path):
    run_dir = tmp_path / "never"
    proc = run_cli("+backend=compile", "backend.compile.mode=fastest", "detach=true", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 2
    assert "backend.compile.mode" in proc.stderr and "running in the background" not in proc.stderr
    assert not run_dir.exists()


def test_a_build_only_result_never_stands_for_a_measurement():
    config = {"model": {"name": "tiny"}, "bench": {}, "fidelity": {}, "backend": {"compile": {}}, "device": "cpu",
              "resume": True}
    built = record_from_json({"schema_version": 3, "model": {"name": "tiny"}, "complete": True, "mode": "stack",
                              "build_only": True, "config": {**config, "build_only": True},
                              "stacks": [{"stack": "compile", "status": "ok"}]})
    assert not can_reuse(built, {**config, "build_only": False})
    assert can_reuse(built, {**config, "build_only": True})


def test_a_build_only_sweep_builds_every_stack_measures_nothing_and_says_so(tmp_path):
    proc = run_cli("-m", "+backend=fuse_qkv,channels_last", "build_only=true", f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [read_result(p.parent) for p in tmp_path.glob("*/result.json")]
    assert len(runs) == 2
    for data in runs:
        assert data["build_only"] is True and data["complete"] is True and data["baseline"] is None
        (stack,) = data["stacks"]
        assert stack["status"] == "ok" and stack["build_s"] is not None
        assert stack["latency"] is None and stack["speedup"] is None and stack["fidelity"] is None
    assert "**Verdict: every requested stack built (build_only: nothing was measured).**" in \
        (tmp_path / "summary.md").read_text()


def test_a_launcher_of_a_disabled_ring_is_refused_by_name(tmp_path, capsys):
    from fluxopt import cli

    with pytest.raises(SystemExit) as exit_:
        cli._main(["-m", "+backend=fuse_qkv,channels_last", "hydra/launcher=fluxopt_joblib",
                   "disabled_plugins=[fluxopt.scale]", f"hydra.sweep.dir={tmp_path}"])
    assert exit_.value.code == 2
    assert "hydra/launcher=fluxopt_joblib: no plugin provides it" in capsys.readouterr().err
