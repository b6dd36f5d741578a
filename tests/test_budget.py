"""Time budgets: a stack over ``budget.stack_s`` is stopped and recorded with the phase it reached;
once the run has spent ``budget.run_s``, the stacks left are recorded as not run. Either way the
verdict is negative and the other stacks' results stand."""

from __future__ import annotations

import pytest

from conftest import read_result, run_cli

SLOW = "fault_slow: {delay_s: 2}"  # the test plugin's backend: 2 s more per transformer call


def test_a_stack_over_its_budget_is_stopped_with_the_phase_it_reached(tmp_path, plugin_env):
    proc = run_cli(f"stacks=[{{{SLOW}}},fuse_qkv]", "budget.stack_s=3", "bench.iterations=1", "save_images=false",
                   f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    slow, fast = read_result(tmp_path)["stacks"]
    assert slow["status"] == "failed" and slow["phase"] in ("build", "warmup", "timing", "fidelity")
    assert slow["reason"].startswith(f"over budget: stopped during {slow['phase']} after ")
    assert slow["reason"].endswith("(budget.stack_s=3)") and 2.5 < slow["elapsed_s"] < 15
    assert fast["status"] == "ok"  # the next stack runs with a budget of its own
    assert "fault_slow: over budget" in proc.stderr


def test_a_stack_stopped_mid_build_keeps_the_build_phases_it_ran(tmp_path, plugin_env):
    proc = run_cli("stacks=[{fault_slow: {build_s: 60}}]", "budget.stack_s=2", "bench.iterations=1",
                   "save_images=false", f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (slow,) = read_result(tmp_path)["stacks"]
    assert slow["phase"] == "build" and slow["reason"].startswith("over budget: stopped during build")
    assert 1 < slow["build_phases_s"]["slow_build"] <= slow["elapsed_s"] < 10  # the phase it was stopped in


def test_the_stacks_left_when_the_run_budget_is_spent_are_not_run(tmp_path, plugin_env):
    proc = run_cli(f"stacks=[{{{SLOW}}},fuse_qkv]", "budget.run_s=4", "bench.iterations=1", "save_images=false",
                   f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    data = read_result(tmp_path)
    assert data["complete"] is True and data["baseline"]["status"] == "ok"
    slow, fast = data["stacks"]
    assert slow["reason"].startswith(("over budget:", "not run: over the run's budget"))
    assert fast["reason"] == "not run: over the run's budget (budget.run_s=4)"


@pytest.mark.parametrize("value", ["-1", "0", "inf", "nan", "abc"])
def test_a_budget_must_be_positive_seconds(tmp_path, value):
    proc = run_cli(f"budget.stack_s={value}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "budget.stack_s" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
