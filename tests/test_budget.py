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


class _Clock:
    """A stand-in for ``time.perf_counter`` that moves only when a fake generation runs."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _caller(clock: _Clock, seconds: float | list[float], calls: list[str]):
    """A pipeline caller whose calls take ``seconds`` each (a list: one after another) on ``clock``."""
    import itertools
    import types

    import numpy as np
    import torch

    from fluxopt.measure import Sample

    class Caller:
        device = types.SimpleNamespace(is_gpu=False)

        durations = iter(seconds) if isinstance(seconds, list) else itertools.repeat(seconds)

        def __call__(self, prompt, seed):
            calls.append(prompt)
            took = next(self.durations)
            clock.now += took
            return Sample(prompt, seed, np.zeros((2, 2, 3), np.float32), torch.zeros(1)), took, took / 4

    return Caller()


@pytest.mark.parametrize(("seconds", "calls_made", "timed"), [
    (1.0, 2 + 5, 5),  # fast: every warm-up and timed call
    (4.0, 2 + 4, 4),  # the fifth timed call would start 16 s in, past 15
    (5.0, 2 + 3, 3),  # the fourth would start exactly at 15 s: the time is spent
    (20.0, 1 + 2, 2),  # slow: one warm-up call and the two timed calls a spread needs
])
def test_max_time_bounds_the_warmup_and_the_timing_of_a_slow_stack(monkeypatch, seconds, calls_made, timed):
    """pytest-benchmark's max_time: once the warm-up, then the timing, has spent
    ``bench.max_time_s``, no further call starts; the fidelity outputs are timed calls."""
    import fluxopt.measure as measure_module

    clock, calls = _Clock(), []
    monkeypatch.setattr(measure_module, "time", clock)
    m = measure_module.measure(_caller(clock, seconds, calls), ["a", "b"], 0, warmup=2, iterations=5, max_time_s=15)
    assert len(calls) == calls_made and m.latency.n == timed and [s.prompt for s in m.samples] == ["a", "b"]
    clock.now, calls[:] = 0.0, []
    unbounded = measure_module.measure(_caller(clock, seconds, calls), ["a", "b"], 0, warmup=2, iterations=5)
    assert len(calls) == 7 and unbounded.latency.n == 5


def test_max_time_never_adds_calls_beyond_those_asked_for(monkeypatch):
    import fluxopt.measure as measure_module

    clock, calls = _Clock(), []
    monkeypatch.setattr(measure_module, "time", clock)
    m = measure_module.measure(_caller(clock, 10.0, calls), ["a"], 0, warmup=0, iterations=1, max_time_s=1)
    assert len(calls) == 1 and m.latency.n == 1 and m.first_call_s == 10.0  # the one timed call is the first


def test_outputs_are_the_first_timed_call_of_each_prompt_and_a_prompt_the_timing_missed_gets_its_own(monkeypatch):
    """Every call cycles over the prompts with seed + prompt index, so the timed calls already make
    the outputs the baseline is compared with; only prompts past the timed calls cost a call more."""
    import fluxopt.measure as measure_module

    clock, calls = _Clock(), []
    monkeypatch.setattr(measure_module, "time", clock)
    phases = []
    m = measure_module.measure(_caller(clock, 20.0, calls), ["a", "b", "c", "d"], 7, warmup=3, iterations=5,
                               max_time_s=15, on_phase=lambda name: phases.append((name, len(calls))))
    assert calls == ["a", "a", "b", "c", "d"]  # one warm-up, two timed (a, b), then untimed outputs c and d
    assert phases == [("warmup", 0), ("timing", 1)]  # a failure is attributed to the phase it happened in
    assert [(s.prompt, s.seed) for s in m.samples] == [("a", 7), ("b", 8), ("c", 9), ("d", 10)]
    assert m.latency.n == 2 and m.first_call_s == 20.0


@pytest.mark.parametrize(("warmup", "first_call_s", "timed"), [
    (2, 9.0, [3.0, 4.0, 5.0]),  # the first call compiles: it is the first warm-up, outside the statistics
    (0, 9.0, [9.0, 2.0, 3.0]),  # no warm-up asked for: the first call is timed, and is still the first call
])
def test_the_first_call_is_recorded_as_such_and_only_timed_calls_make_the_statistics(monkeypatch, warmup,
                                                                                     first_call_s, timed):
    import fluxopt.measure as measure_module

    clock, calls = _Clock(), []
    monkeypatch.setattr(measure_module, "time", clock)
    m = measure_module.measure(_caller(clock, [9.0, 2.0, 3.0, 4.0, 5.0], calls), ["a", "b"], 0, warmup=warmup,
                               iterations=3)
    assert m.first_call_s == first_call_s and m.latency.samples == timed
    assert m.step_latency.samples == [t / 4 for t in timed]


@pytest.mark.parametrize("value", ["-1", "0", "inf", "nan", "abc", "true"])
def test_max_time_must_be_positive_seconds(value):
    with pytest.raises(ConfigError, match=rf"^bench\.max_time_s(=|: ).*{value}"):
        run_config({"bench": {"max_time_s": value}})


def test_the_full_bench_bounds_each_stacks_timing_and_the_report_says_when_a_stack_got_fewer_calls():
    from fluxopt.config import BENCHES
    from fluxopt.record import LatencyStats
    from fluxopt.report.tables import latency_text

    assert BENCHES["full"].max_time_s is not None and BENCHES["quick"].max_time_s is None
    assert latency_text(LatencyStats.from_samples([2.0, 2.5]), planned=5) == "2.250 ± 0.354 (n=2)"
    assert latency_text(LatencyStats.from_samples([2.0] * 5), planned=5) == "2.000 ± 0.000"
    assert latency_text(LatencyStats.from_samples([2.0]), planned=5) == "2.000 (n=1)"


def test_a_slow_stack_is_timed_on_fewer_calls_end_to_end(tmp_path, plugin_env):
    """The tiny model's 4 steps take a fraction of a second; fault_slow's take 1.2 s a generation,
    past the 1 s limit after its first warm-up call and its second timed one."""
    proc = run_cli("stacks=[{fault_slow: {delay_s: 0.3}}]", "bench.warmup=2", "bench.iterations=3",
                   "bench.max_time_s=1", "save_images=false", f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = read_result(tmp_path)
    assert data["baseline"]["latency"]["n"] == 3 and data["stacks"][0]["latency"]["n"] == 2
    report = (tmp_path / "report.md").read_text()
    assert "bench.max_time_s" in report and "(n=2)" in report


@pytest.mark.parametrize(("seconds", "timed"), [
    ([9.0, 5.0] + [5.0] * 5, 3),  # steady: the mean is exact after the 3 calls a standard error needs
    ([9.0, 5.0] + [4.0, 6.0, 4.0, 6.0, 4.0], 5),  # noisy (rse 7 %, then 5 %): every planned call
    ([9.0, 5.0] + [5.0, 5.2, 5.0, 5.05, 5.0], 4),  # rse 1.3 % after 3 calls, 0.9 % after 4
])
def test_the_timing_stops_once_the_mean_is_known_to_the_target_precision(monkeypatch, seconds, timed):
    """bench.target_rse: after at least 3 timed calls, none more starts once the relative standard
    error of the mean is at or below the target; the warm-up is untouched."""
    import fluxopt.measure as measure_module

    clock, calls = _Clock(), []
    monkeypatch.setattr(measure_module, "time", clock)
    m = measure_module.measure(_caller(clock, seconds, calls), ["a", "b"], 0, warmup=2, iterations=5,
                               target_rse=0.01)
    assert m.latency.n == timed and len(calls) == 2 + timed and m.latency.samples == seconds[2:2 + timed]
    assert [s.prompt for s in m.samples] == ["a", "b"]
    clock.now, calls[:] = 0.0, []
    unbounded = measure_module.measure(_caller(clock, seconds, calls), ["a", "b"], 0, warmup=2, iterations=5)
    assert unbounded.latency.n == 5


def test_the_precision_target_and_the_time_limit_each_stop_the_timing(monkeypatch):
    """Whichever comes first: a slow, noisy stack still stops at max_time_s with two calls."""
    import fluxopt.measure as measure_module

    clock, calls = _Clock(), []
    monkeypatch.setattr(measure_module, "time", clock)
    m = measure_module.measure(_caller(clock, [20.0, 10.0, 30.0, 10.0], calls), ["a"], 0, warmup=1,
                               iterations=5, max_time_s=15, target_rse=0.01)
    assert m.latency.samples == [10.0, 30.0]


@pytest.mark.parametrize(("totals", "target", "enough"), [
    ([5.0, 5.0], 0.5, False),  # two calls never suffice, however close
    ([5.0, 5.0, 5.0], 0.001, True),
    ([2.0, 4.0, 3.0], 0.2, True),  # std 1, n 3, mean 3: rse 0.19245
    ([2.0, 4.0, 3.0], 0.19, False),
    ([5.0, 5.0, 5.0], None, False),  # no target: every planned call runs
])
def test_precise_enough(totals, target, enough):
    from fluxopt.measure import precise_enough

    assert precise_enough(totals, target) is enough


def test_a_mean_known_exactly_to_the_target_is_precise_enough():
    from fluxopt.measure import precise_enough
    from fluxopt.record import LatencyStats

    totals = [2.0, 4.0, 3.0]
    assert precise_enough(totals, LatencyStats.from_samples(totals).rse)  # "at or below"


def test_relative_standard_error_of_the_mean():
    from fluxopt.record import LatencyStats

    assert LatencyStats.from_samples([2.0, 4.0]).rse == pytest.approx(2 ** 0.5 / 2 ** 0.5 / 3)
    assert LatencyStats.from_samples([2.0, 4.0, 3.0, 3.0]).rse == pytest.approx(0.8165 / 2 / 3, rel=1e-4)
    assert LatencyStats.from_samples([3.0]).rse is None  # one sample: no spread measured


@pytest.mark.parametrize(("value", "rule"), [("-1", "fraction between 0 and 1"), ("0", "fraction between 0 and 1"),
                                             ("1", "fraction between 0 and 1"), ("1.5", "fraction between 0 and 1"),
                                             ("nan", "fraction between 0 and 1"), ("abc", "Float"), ("true", "Float")])
def test_target_rse_must_be_a_fraction(value, rule):
    with pytest.raises(ConfigError, match=rf"^bench\.target_rse(=|: ).*{value}.*{rule}"):
        run_config({"bench": {"target_rse": value}})


def test_the_full_bench_stops_on_precision_and_the_report_says_so():
    from fluxopt.config import BENCHES
    from fluxopt.report.tables import timed_calls

    assert BENCHES["full"].target_rse is not None and BENCHES["quick"].target_rse is None
    text = timed_calls({"iterations": 5, "max_time_s": 30.0, "target_rse": 0.005})
    assert text == ("5 timed calls (at least 2 once they took 30 s: bench.max_time_s; at least 3 once the mean "
                    "was known to 0.5 % relative standard error: bench.target_rse; n in the table where fewer)")
    assert timed_calls({"iterations": 5, "max_time_s": None, "target_rse": None}) == "5 timed calls"


def test_a_steady_stack_is_timed_on_fewer_calls_end_to_end(tmp_path):
    """On the tiny model a 50 % target is met after the 3 calls a standard error needs."""
    proc = run_cli("+backend=fuse_qkv", "bench.iterations=6", "bench.target_rse=0.5", "save_images=false",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = read_result(tmp_path)
    assert data["baseline"]["latency"]["n"] == 3 and data["stacks"][0]["latency"]["n"] == 3
    report = (tmp_path / "report.md").read_text()
    assert "bench.target_rse" in report and "(n=3)" in report
