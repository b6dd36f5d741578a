"""Time budgets: a stack over ``budget.stack_s`` is stopped and recorded with the phase it reached;
once the run has spent ``budget.run_s``, the stacks left are recorded as not run. Either way the
verdict is negative and the other stacks' results stand."""

from __future__ import annotations

import pytest

from conftest import read_result, run_cli

from fluxopt.config import run_config
from fluxopt.errors import ConfigError

SLOW = "fault_slow: {delay_s: 2}"  # the test plugin's backend: 2 s more per transformer call


def test_a_stack_over_its_budget_is_stopped_with_the_phase_it_reached(tmp_path, plugin_env):
    proc = run_cli(f"stacks=[{{{SLOW}}},{{fault_slow: {{build_s: 60}}}},fuse_qkv]", "budget.stack_s=3",
                   "bench.iterations=1", "save_images=false", f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    slow, slow_build, fast = read_result(tmp_path)["stacks"]
    assert slow["status"] == "failed" and slow["phase"] in ("build", "warmup", "timing", "fidelity")
    assert slow["reason"].startswith(f"over budget: stopped during {slow['phase']} after ")
    assert slow["reason"].endswith("(budget.stack_s=3)") and 2.5 < slow["elapsed_s"] < 15
    # stopped mid-build: the record keeps the build phases it ran, the one it was stopped in included
    assert slow_build["phase"] == "build" and slow_build["reason"].startswith("over budget: stopped during build")
    assert 2 < slow_build["build_phases_s"]["slow_build"] <= slow_build["elapsed_s"] < 15
    assert fast["status"] == "ok"  # the next stack runs with a budget of its own
    assert "fault_slow: over budget" in proc.stderr


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
def test_a_budget_must_be_positive_seconds(value):
    """The rule, as the CLI and the API both reach it (the config's one validation)."""
    with pytest.raises(ConfigError, match=rf"^budget\.run_s(=|: ).*{value}"):
        run_config({"budget": {"run_s": value}})


def test_a_bad_budget_is_one_line_from_the_command_line(tmp_path):
    proc = run_cli("budget.stack_s=-1", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "budget.stack_s" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
