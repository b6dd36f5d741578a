"""``stacks=``: any list of stacks measured against one baseline by the CLI itself, with the same
preflight, provenance and directory rules as one stack; ``fluxopt-report publish`` turns such a run
into a published record and page."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, read_result, run_cli

pytestmark = pytest.mark.xdist_group("stack_list")  # one worker runs the shared listed run once


@pytest.fixture(scope="module")
def listed_run(tmp_path_factory):
    """Two stacks from a YAML file (one with options) against one baseline, in one process."""
    where = tmp_path_factory.mktemp("listed")
    plan = where / "plan.yaml"
    plan.write_text("stacks:\n  - fuse_qkv\n  - [fuse_qkv, channels_last]\n"
                    "  - fixed_cache: {interval: 2, warmup_steps: 1}\n")
    run_dir = where / "run"
    proc = run_cli(f"stacks={plan}", "bench.iterations=1", "save_images=false", f"hydra.run.dir={run_dir}")
    return proc, run_dir, plan


def test_every_listed_stack_is_measured_against_one_baseline(listed_run):
    proc, run_dir, plan = listed_run
    result = read_result(run_dir)
    assert [s["stack"] for s in result["stacks"]] == ["fuse_qkv", "fuse_qkv+channels_last", "fixed_cache"]
    assert result["baseline"]["status"] == "ok" and result["requested"] == [s["stack"] for s in result["stacks"]]
    assert result["stacks"][2]["options"]["fixed_cache"]["interval"] == 2
    # the record holds the list measured (not the file's name, whose content can change) and the command
    assert result["config"]["stacks"] == [{"fuse_qkv": {}}, {"fuse_qkv": {}, "channels_last": {}},
                                          {"fixed_cache": {"interval": 2, "warmup_steps": 1}}]
    assert f"stacks={plan}" in result["provenance"]["command"]
    statuses = [s["status"] for s in result["stacks"]]
    assert proc.returncode == (0 if statuses == ["ok"] * 3 else 1), proc.stderr[-2000:]


def test_the_page_ends_with_the_command_that_produced_it(listed_run):
    _, run_dir, plan = listed_run
    page = (run_dir / "report.md").read_text()
    assert "## Reproduce" in page and f"stacks={plan}" in page.split("## Reproduce")[1]


def test_publish_copies_the_record_and_renders_its_page_once(listed_run, tmp_path):
    _, run_dir, _ = listed_run
    dest = tmp_path / "docs" / "2026-12-02-cpu-list"
    report = [sys.executable, "-m", "fluxopt.cli.report", "publish", str(run_dir), str(dest)]
    proc = subprocess.run(report, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert (dest / "result.json").read_bytes() == (run_dir / "result.json").read_bytes()
    assert "## Reproduce" in (dest / "report.md").read_text()
    again = subprocess.run(report, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and "never overwritten" in again.stderr and len(again.stderr.splitlines()) == 1


def test_an_edited_record_is_not_published(listed_run, tmp_path):
    _, run_dir, _ = listed_run
    edited = tmp_path / "edited"
    edited.mkdir()
    data = json.loads((run_dir / "result.json").read_text())
    data["stacks"][0]["speedup"] = 9.9
    (edited / "result.json").write_text(json.dumps(data))
    proc = subprocess.run([sys.executable, "-m", "fluxopt.cli.report", "publish", str(edited), str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and "was edited" in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["stacks=[fuse_qkv]", "+backend=channels_last"], "stacks= and +backend= both choose"),
    (["stacks=/no/such/plan.yaml"], "stacks=/no/such/plan.yaml: no such file"),
    (["stacks=[fuse_qkv,[fuse_qk]]"], "unknown backend 'fuse_qk'"),
    (["stacks=[]"], "stacks=[] is not allowed"),
    (["stacks=[fuse_qkv,trt_fp8]", "device=cpu"], "stack 'trt_fp8' cannot run here"),
])
def test_a_bad_list_is_one_line_before_anything_loads(args, message, tmp_path):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode in (1, 2) and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "result.json").exists()


@pytest.mark.parametrize("plan", sorted((REPO / "benchmarks" / "plans").glob("*.yaml")), ids=lambda p: p.name)
def test_every_committed_plan_builds_its_stacks(plan):
    """A plan is run on a GPU lease, where a misspelt backend or option would cost device time:
    each entry reads and builds here (names, options, conflicts), before anything loads."""
    from fluxopt.config import read_stack_list
    from fluxopt.stack import build_stack

    entries = read_stack_list(str(plan))
    assert all(build_stack(entry).name for entry in entries)
