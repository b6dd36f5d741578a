"""An interrupted run continues: the same command in its directory keeps the baseline (its
outputs read back from the verified reference file) and the stacks it finished, and measures only
what is left; without a reference that matches its record, everything is measured again."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import read_result, run_cli, start_cli

pytestmark = pytest.mark.xdist_group("resume_interrupted")
ARGS = ("stacks=[fuse_qkv,{fault_slow: {delay_s: 0.4}}]", "bench.iterations=1", "save_images=false")


def _interrupted(run_dir: Path, plugin_env: dict[str, str]) -> dict:
    """The run stopped (SIGINT) while its second stack runs; its record as it was left."""
    with start_cli(*ARGS, f"hydra.run.dir={run_dir}", env=plugin_env) as proc:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            try:
                if len(json.loads((run_dir / "result.json").read_text())["stacks"]) == 2:  # the slow one begun
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        time.sleep(1.5)  # into the slow stack
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
    assert proc.returncode == 130
    return read_result(run_dir)


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, plugin_env):
    run_dir = tmp_path_factory.mktemp("resume") / "run"
    first = _interrupted(run_dir, plugin_env)
    proc = run_cli(*ARGS, f"hydra.run.dir={run_dir}", env=plugin_env)
    return first, proc, run_dir


def test_the_same_command_continues_with_the_baseline_and_the_finished_stacks(resumed):
    first, proc, run_dir = resumed
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "continuing it with its baseline" in proc.stderr
    second = read_result(run_dir)
    assert second["complete"] is True and [s["stack"] for s in second["stacks"]] == ["fuse_qkv", "fault_slow"]
    assert second["baseline"]["latency"]["samples"] == first["baseline"]["latency"]["samples"]  # not measured again
    assert second["stacks"][0] == first["stacks"][0]  # the finished stack kept as it was
    assert first["stacks"][-1]["reason"].startswith("interrupted during ")  # the interrupted one measured again
    assert second["stacks"][1]["status"] == "ok" and second["stacks"][1]["fidelity"]["passed"]
    assert second["provenance"]["resumed"] == {"baseline_from": first["started"], "stacks_kept": ["fuse_qkv"]}
    assert list(run_dir.glob("result.previous-*.json"))  # the interrupted record is kept


def test_only_a_reference_that_matches_its_record_is_resumed_from(tmp_path):
    """The saved outputs are checked against the sha256 the record holds; anything else (damaged,
    missing, another measurement or measurement protocol, a finished or edited record, resume=false)
    is measured again."""
    import dataclasses

    import numpy as np
    import torch

    from _records import run, stack
    from fluxopt.measure import PROTOCOL, Sample
    from fluxopt.runner import REFERENCE_FILE, can_resume, load_reference, save_reference

    samples = [Sample("a cat", 3, np.random.default_rng(0).random((8, 8, 3), dtype=np.float32), torch.randn(1, 16, 64))]
    record = run([stack("fuse_qkv", 1.5)], complete=False)
    record.protocol = PROTOCOL
    record.config = {"model": {"name": "flux-mini"}, "bench": {"iterations": 5}, "resume": True}
    record.baseline.stats["reference"] = save_reference(tmp_path / REFERENCE_FILE, samples)
    config = dict(record.config)
    assert can_resume(record, config, tmp_path)
    (back,) = load_reference(tmp_path / REFERENCE_FILE, record.baseline.stats["reference"])
    assert (back.prompt, back.seed) == ("a cat", 3) and np.array_equal(back.image, samples[0].image)
    assert torch.equal(back.latents, samples[0].latents)
    assert not can_resume(record, {**config, "resume": False}, tmp_path)
    assert not can_resume(record, {**config, "bench": {"iterations": 3}}, tmp_path)
    assert not can_resume(dataclasses.replace(record, complete=True), config, tmp_path)
    assert not can_resume(dataclasses.replace(record, edited=["x"]), config, tmp_path)
    for other in (None, PROTOCOL - 1):  # measured under another protocol, or before records kept it
        assert not can_resume(dataclasses.replace(record, protocol=other), config, tmp_path)
    (tmp_path / REFERENCE_FILE).write_bytes(b"not the baseline's outputs")
    assert not can_resume(record, config, tmp_path)
    (tmp_path / REFERENCE_FILE).unlink()
    assert not can_resume(record, config, tmp_path)


def _slow_build_backend(register_plugin) -> None:
    """``slow_build_probe``: a backend whose build takes 1.5 s, registered in-process."""
    import types
    from dataclasses import dataclass

    from fluxopt import Backend, Stage, hookimpl

    @dataclass
    class Options:
        build_s: float = 1.5

    class SlowBuild(Backend):
        name = "slow_build_probe"
        options_class = Options
        stage = Stage.WEIGHTS

        def apply(self, pipe, options, ctx):
            pass

        def build(self, pipe, options, ctx):
            time.sleep(options.build_s)

    plugin = types.ModuleType("slow_build_probe")
    plugin.fluxopt_backends = hookimpl(lambda: [SlowBuild()])
    register_plugin(plugin, "slow_build_probe")


def _benchmark(pipe, output_dir: Path):
    import fluxopt

    return fluxopt.benchmark(pipe, ["slow_build_probe"], output_dir=output_dir, name="tiny", trained=False,
                             height=64, width=64, steps=2, warmup=0, iterations=1, prompts=["a red cube"])


def test_a_long_phase_keeps_its_time_on_record_while_it_runs(tmp_path, monkeypatch, register_plugin, tiny_pipe):
    """The heartbeat rewrites the record during a phase, so a process that ends without answering
    (its machine taken away) in a build of minutes leaves the time the stack had run, not the
    moment its build began; and no beat lands after the final record."""
    import threading

    from fluxopt import runner

    _slow_build_backend(register_plugin)
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.1)
    seen: list[float] = []  # the in-progress stack's time on record, as a reader saw it during the build
    marked: list[bool] = []  # whether each record that showed it in progress called itself complete
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            try:
                record = json.loads((tmp_path / "result.json").read_text())
            except (OSError, ValueError):
                record = {"stacks": []}
            building = [s["elapsed_s"] for s in record["stacks"] if s["phase"] == "build" and s["status"] == "failed"]
            seen.extend(building)
            marked.extend([record["complete"]] if building else [])
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        _benchmark(tiny_pipe, tmp_path)
    finally:
        done.set()
        watcher.join()
    assert seen and max(seen) >= 0.8, seen  # without the heartbeat: the time at the build's start only
    assert marked and all(m is False for m in marked)  # a record with a stack in progress is never a finished one
    time.sleep(0.3)  # a late beat would overwrite the final record
    final = read_result(tmp_path)
    assert final["complete"] is True and final["stacks"][0]["status"] == "ok"


def test_a_heartbeat_that_cannot_write_says_so_once_and_the_run_goes_on(tmp_path, monkeypatch, register_plugin,
                                                                        tiny_pipe, caplog):
    import threading

    from fluxopt import runner

    _slow_build_backend(register_plugin)
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.1)
    write = runner.write_record

    def failing_in_the_heartbeat(path, record):
        if threading.current_thread().name == "fluxopt-record-heartbeat":
            raise RuntimeError("dictionary changed size during iteration")
        write(path, record)

    monkeypatch.setattr(runner, "write_record", failing_in_the_heartbeat)
    with caplog.at_level("DEBUG", logger="fluxopt"):
        record = _benchmark(tiny_pipe, tmp_path)
    said = [r for r in caplog.records if "heartbeat could not write" in r.getMessage()]
    assert len(said) > 1 and [r.levelname for r in said].count("WARNING") == 1  # every beat failed, one line shown
    assert said[0].getMessage() == "the record's heartbeat could not write it: dictionary changed size during iteration"
    assert record.complete and read_result(tmp_path)["stacks"][0]["status"] == "ok"
