"""Bake-offs: sweeps with a summary, fault tolerance, resume, reproducibility, isolation."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import read_result, run_cli
from PIL import Image

from fluxopt.files import write_json_atomic

FAULTS = "fault_apply,fault_build,fault_nan,fault_oom,fault_needs_cuda"


@pytest.fixture(scope="module")
def fault_sweep(tmp_path_factory, plugin_env):
    """One sweep in which every stack but one fails or is skipped, in a different phase each."""
    sweep = tmp_path_factory.mktemp("sweep")
    # As typed in a shell: -m +backend=...,'[fuse_qkv,fault_nan]',fuse_qkv (the shell drops the quotes).
    # fuse_qkv: a lossless stack that builds in no time (what is under test is the sweep, not a backend)
    args = ("-m", f"+backend={FAULTS},[fuse_qkv,fault_nan],fuse_qkv", "bench.iterations=2", f"hydra.sweep.dir={sweep}")
    proc = run_cli(*args, env=plugin_env)
    assert proc.returncode == 1, proc.stderr[-4000:]  # failed stacks make the sweep's verdict negative
    assert "requested stack(s) failed" in proc.stderr
    return sweep, args, proc


def _rows(sweep: Path) -> dict[str, dict]:
    return {row["stack"]: row for row in json.loads((sweep / "summary.json").read_text())["rows"]}


@pytest.mark.xdist_group("fault_sweep")  # one worker builds the shared fixture once
def test_sweep_records_each_failure_with_phase_and_goes_on(fault_sweep):
    sweep, _, _ = fault_sweep
    rows = _rows(sweep)
    assert rows["fuse_qkv"]["status"] == "ok" and rows["fuse_qkv"]["fidelity"]["passed"]
    assert (rows["fault_apply"]["status"], rows["fault_apply"]["phase"]) == ("failed", "apply")
    assert "injected failure while applying" in rows["fault_apply"]["reason"]
    assert (rows["fault_build"]["status"], rows["fault_build"]["phase"]) == ("failed", "build")
    assert (rows["fault_oom"]["status"], rows["fault_oom"]["phase"]) == ("failed", "warmup")
    assert rows["fault_oom"]["reason"].startswith("out of memory")
    assert (rows["fault_nan"]["status"], rows["fault_nan"]["phase"]) == ("failed", "fidelity")
    assert "non-finite" in rows["fault_nan"]["reason"]
    assert rows["fuse_qkv+fault_nan"]["status"] == "failed"  # composed in stage order
    assert rows["fault_needs_cuda"]["status"] == "skipped"
    assert "needs an NVIDIA GPU" in rows["fault_needs_cuda"]["reason"]


@pytest.mark.xdist_group("fault_sweep")  # one worker builds the shared fixture once
def test_sweep_summary_files(fault_sweep):
    sweep, _, proc = fault_sweep
    for name in ("summary.md", "summary.csv", "summary.json", "speedup_vs_fidelity.png", "grid.png"):
        assert (sweep / name).stat().st_size > 0, name
    md = (sweep / "summary.md").read_text()
    assert "| fuse_qkv | ok |" in md and "## Noise" in md and "random weights" in md
    with open(sweep / "summary.csv") as handle:
        stacks = {row["stack"] for row in csv.DictReader(handle)}
    assert {"fuse_qkv", "fault_apply", "fuse_qkv+fault_nan", "fault_needs_cuda"} <= stacks
    assert Image.open(sweep / "grid.png").size[0] > 200
    assert "sweep summary of 7 run(s)" in proc.stdout


@pytest.mark.xdist_group("fault_sweep")  # one worker builds the shared fixture once
def test_report_regenerates_summary_from_result_files_alone(fault_sweep, tmp_path):
    sweep, _, _ = fault_sweep
    before = json.loads((sweep / "summary.json").read_text())
    for name in ("summary.md", "summary.csv", "summary.json", "grid.png", "speedup_vs_fidelity.png"):
        (sweep / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "fluxopt.cli.report", str(sweep)], capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr  # the sweep's injected faults: the same negative verdict as the sweep's
    after = json.loads((sweep / "summary.json").read_text())
    assert after["rows"] == before["rows"] and after["failures"] == before["failures"] and before["failures"]
    assert (sweep / "grid.png").exists() and (sweep / "summary.md").exists()


@pytest.mark.xdist_group("fault_sweep")  # one worker builds the shared fixture once
def test_restarted_sweep_skips_complete_jobs_and_force_keeps_old_results(fault_sweep, plugin_env):
    sweep, args, _ = fault_sweep
    job = sweep / "+backend=fuse_qkv,bench.iterations=2"
    result = job / "result.json"
    before = result.read_text()
    proc = run_cli("-m", "+backend=fuse_qkv", "bench.iterations=2", f"hydra.sweep.dir={sweep}", env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "is complete and passed for this config; skipping" in proc.stderr
    assert result.read_text() == before
    proc = run_cli("-m", "+backend=fuse_qkv", "bench.iterations=2", "resume=false", f"hydra.sweep.dir={sweep}",
                   env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = list(job.glob("result.*.json"))
    assert len(kept) == 1 and kept[0].read_text() == before  # never overwritten
    assert read_result(job)["complete"] and result.read_text() != before


def test_incomplete_result_is_not_skipped(tmp_path):
    run_dir = tmp_path / "run"
    write_json_atomic(run_dir / "result.json", {"schema_version": 1, "complete": False, "config": {}})
    proc = run_cli("+backend=fuse_qkv", "bench.iterations=1", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_result(run_dir)["complete"] is True


@pytest.mark.slow
@pytest.mark.xdist_group("aoti_two_runs")  # one worker builds the shared fixture once
def test_no_backend_compares_everything_available_and_lists_skipped(aoti_then_default_bakeoff):
    proc, data = aoti_then_default_bakeoff.bakeoff_proc, aoti_then_default_bakeoff.bakeoff
    assert proc.returncode == 1, proc.stderr[-3000:]  # the fault plugin's stacks fail
    assert data["mode"] == "bakeoff"
    stacks = {s["stack"]: s for s in data["stacks"]}
    assert stacks["compile"]["status"] == "ok" and stacks["aoti"]["status"] == "ok"
    assert stacks["fault_needs_cuda"]["status"] == "skipped"
    assert stacks["fault_apply"]["status"] == "failed"  # recorded, the others still ran
    assert all(len(s["backends"]) == 1 for s in data["stacks"])
    assert "fault_needs_cuda" in proc.stdout and "skipped" in proc.stdout


def test_reproduce_from_saved_hydra_config(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    proc = run_cli("+backend=fuse_qkv", "bench.iterations=2", "bench.seed=5", f"hydra.run.dir={first}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The documented way to re-run a run exactly: its saved, fully composed config as the primary config.
    proc = run_cli("--config-path", str(first / ".hydra"), "--config-name", "config", f"hydra.run.dir={second}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_result(first), read_result(second)
    assert a["config"] == b["config"] and b["seed"] == 5
    assert len(a["stacks"][0]["images"]) == len(b["stacks"][0]["images"]) == 2  # one per prompt
    for img_a, img_b in zip(a["stacks"][0]["images"], b["stacks"][0]["images"]):
        assert np.array_equal(np.asarray(Image.open(first / img_a)), np.asarray(Image.open(second / img_b)))
    for key in ("python", "packages", "git", "device", "cpu", "hostname"):
        assert a["environment"][key] == b["environment"][key]


def test_json_writes_are_atomic(tmp_path):
    path = tmp_path / "result.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["result.json"]


def test_global_state_does_not_leak_between_stacks(tmp_path):
    """A stack measured after another that patched Inductor flags (and, through Dynamo's eager
    backend, compiled nothing with them: the flags are what could leak) gives the same outputs as alone."""
    import torch._inductor.config as inductor_config
    from hydra import compose, initialize_config_module

    from fluxopt.config import register_configs
    from fluxopt.runner import Run
    from fluxopt.stack import build_stack

    register_configs()
    with initialize_config_module(config_module="fluxopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["bench.iterations=1", "bench.steps=2"])
    flags_before = inductor_config.save_config()
    leaky = build_stack({"compile": {"backend": "eager", "inductor_config": {"epilogue_fusion": False,
                                                                          "max_autotune_gemm": True}}})
    alone = build_stack({"compile": {"regional": True}})  # compiled by Inductor: what leaked flags would change
    after = Run(cfg, tmp_path / "after", stacks=[leaky, alone]).execute().to_json()
    single = Run(cfg, tmp_path / "alone", stacks=[alone]).execute().to_json()
    assert [s["status"] for s in after["stacks"]] == ["ok", "ok"], after["stacks"]
    assert after["stacks"][0]["options"]["compile"]["inductor_config"]["max_autotune_gemm"] is True
    assert inductor_config.save_config() == flags_before
    img_after = [np.asarray(Image.open(tmp_path / "after" / p)) for p in after["stacks"][1]["images"]]
    img_alone = [np.asarray(Image.open(tmp_path / "alone" / p)) for p in single["stacks"][0]["images"]]
    assert len(img_after) == len(img_alone) > 0  # an empty comparison must not pass
    assert all(np.array_equal(x, y) for x, y in zip(img_after, img_alone))


def test_one_stack_measured_twice_with_other_options_keeps_both_images_and_profiles(tmp_path):
    """A plan may hold one backend list twice (different options): neither overwrites the other's files."""
    from hydra import compose, initialize_config_module

    from fluxopt.config import register_configs
    from fluxopt.runner import Run
    from fluxopt.stack import build_stack

    register_configs()
    with initialize_config_module(config_module="fluxopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["bench.iterations=1", "bench.steps=6", "bench.profile=true"])
    stacks = [build_stack({"fixed_cache": {"warmup_steps": 1, "interval": k}}) for k in (3, 4)]
    data = Run(cfg, tmp_path, stacks=stacks).execute().to_json()
    first, second = data["stacks"]
    assert first["stack"] == second["stack"] == "fixed_cache"
    assert first["images"] and second["images"] and not set(first["images"]) & set(second["images"])
    assert first["profile"]["trace"] != second["profile"]["trace"]
    # the middle step (3) is a predicted one in both; the profile is of a computed step near it
    for record in (first, second):
        schedule = record["stats"]["fixed_cache"]["schedule"]
        assert schedule[3] == "." and schedule[record["profile"]["step"]] == "C", (schedule, record["profile"])
        assert record["profile"]["steps_profiled"][0] == 3 and record["profile"]["breakdown_ms"]["gemm"] > 0
        top = record["profile"]["top_kernels"]  # the costliest ops by name (aten ops on a CPU), within the total
        assert top and any(k["category"] == "gemm" for k in top)
        assert sum(k["ms"] for k in top) <= sum(record["profile"]["breakdown_ms"].values()) + 0.01  # each rounded
    for record in (first, second):
        assert all((tmp_path / p).is_file() for p in [*record["images"], record["profile"]["trace"]])
        # the trace kept is the computed step's, with its timings (each window's trace is written as it stops)
        ops = [e for e in json.loads((tmp_path / record["profile"]["trace"]).read_text())["traceEvents"]
               if e.get("cat") == "cpu_op" and e["name"] in ("aten::mm", "aten::addmm", "aten::linear")]
        assert ops and all(e["dur"] > 0 for e in ops)
    assert sorted(p.name for p in (tmp_path / "profiles").iterdir()) == ["baseline.json", "fixed_cache-2.json",
                                                                          "fixed_cache.json"]  # no window left behind
