"""The history ring: the results store (SQLite), ``fluxopt-report import | compare | history``.

The statistics are checked on constructed samples (exact ratios of medians, interval bounds, the
direction of A and B); the CLI end to end with the fault plugin's ``fault_sleepy`` backend, whose
speed is set by an environment variable, as a slower library would change it."""

from __future__ import annotations

import dataclasses
import itertools
import json
import multiprocessing
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from _records import run, stack
from conftest import run_cli

from fluxopt.errors import ConfigError
from fluxopt.history import store as store_module
from fluxopt.history.compare import (
    Speed,
    compare,
    ratio_of_medians,
    render_markdown,
    speed_verdict,
)
from fluxopt.history.store import ResultsStore, find_records, run_identity
from fluxopt.record import LatencyStats, read_record

REPO = Path(__file__).resolve().parent.parent


def _timed(record, name: str, samples: list[float]):
    """``record`` with stack ``name``'s latency samples replaced (speedup re-derived as the runner does)."""
    from fluxopt.record import speedup_of

    target = record.baseline if name == "baseline" else next(s for s in record.stacks if s.stack == name)
    target.latency = LatencyStats.from_samples(samples)
    for s in record.stacks:
        if s.latency and record.baseline.latency:
            d = speedup_of(record.baseline.latency, s.latency)
            s.speedup, s.speedup_uncertainty, s.within_noise = d.value, d.uncertainty, d.within_noise
    return record


def _runs(stack_samples: list[float], *, psnr: float = 40.0, started: str = "2026-12-01T00:00:00", **fields):
    record = run([stack("fp8_max", 2.0, psnr=psnr)], started=started, **fields)
    record.provenance["invocation"] = started
    return _timed(record, "fp8_max", stack_samples)


# --------------------------------------------------------------------------- statistics
def test_ratio_of_medians_is_b_over_a_and_uses_medians_not_means():
    est = ratio_of_medians([1.0, 1.0, 1.0, 10.0], [2.0, 2.0, 2.0, 2.0])
    assert est.ratio == 2.0  # the mean of A (3.25) would give 0.615
    assert ratio_of_medians([2.0] * 4, [1.0, 1.0, 1.0, 10.0]).ratio == 0.5


def test_the_interval_contains_the_ratio_and_narrows_with_confidence_and_samples():
    a = [1.00, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97]
    b = [1.10, 1.12, 1.08, 1.11, 1.09, 1.13, 1.07]
    est = ratio_of_medians(a, b)
    assert est.low <= est.ratio <= est.high and est.low < est.high
    assert 1.0 < est.low and est.high < 1.25
    narrow = ratio_of_medians(a, b, confidence=0.5)
    assert est.low < narrow.low <= narrow.high < est.high
    same = ratio_of_medians(a, list(reversed(a)))
    assert same.low < 1.0 < same.high
    assert ratio_of_medians(a * 4, b * 4).high - ratio_of_medians(a * 4, b * 4).low < est.high - est.low


def test_speed_verdict_needs_the_whole_interval_beyond_the_threshold():
    a = [1.00, 1.01, 0.99, 1.00, 1.01]
    slower_3 = [x * 1.03 for x in a]
    slower_20 = [x * 1.20 for x in a]
    assert speed_verdict(ratio_of_medians(a, slower_3), 0.05) == (Speed.SAME, False)  # within the threshold
    assert speed_verdict(ratio_of_medians(a, slower_3), 0.01) == (Speed.SLOWER, True)
    assert speed_verdict(ratio_of_medians(a, slower_20), 0.05) == (Speed.SLOWER, True)
    assert speed_verdict(ratio_of_medians(slower_20, a), 0.05) == (Speed.FASTER, False)
    assert speed_verdict(ratio_of_medians(a, a), 0.0) == (Speed.SAME, False)
    # one sample on a side: no interval, the ratio against the threshold
    assert speed_verdict(ratio_of_medians([1.0], [1.04]), 0.05) == (Speed.SAME, False)
    assert speed_verdict(ratio_of_medians([1.0], [1.06]), 0.05) == (Speed.SLOWER, True)
    assert speed_verdict(ratio_of_medians([1.06], [1.0]), 0.05) == (Speed.FASTER, False)


def test_compare_names_a_slower_stack_and_not_the_faster_direction():
    ref = _runs([0.50, 0.51, 0.49, 0.50, 0.52], started="2026-12-01T00:00:00")
    slow = _runs([0.60, 0.61, 0.59, 0.60, 0.62], started="2026-12-02T00:00:00")
    result = compare([ref], [slow], "ref", "new")
    assert [r.split(":")[0] for r in result.regressions] == ["fp8_max"]
    row = next(c for c in result.stacks if c.name == "fp8_max")
    assert row.speed is Speed.SLOWER and row.estimate.ratio == pytest.approx(1.2)
    assert "REGRESSION" in render_markdown(result)
    back = compare([slow], [ref], "new", "ref")
    assert back.regressions == [] and next(c for c in back.stacks if c.name == "fp8_max").speed is Speed.FASTER
    assert json.loads(json.dumps(result.to_json()))["regressions"] == result.regressions


def test_a_lost_fidelity_gate_or_a_broken_stack_is_a_regression_and_unmatched_stacks_are_listed():
    ref = _runs([0.5] * 3)
    worse = _runs([0.5] * 3, psnr=10.0, started="2026-12-02T00:00:00")
    assert any("fidelity gate passed in A, fails in B" in r for r in compare([ref], [worse]).regressions)
    assert compare([worse], [ref]).regressions == []
    assert any("gate failed in A, passes in B" in n for c in compare([worse], [ref]).stacks for n in c.notes)

    broken = _runs([0.5] * 3, started="2026-12-03T00:00:00")
    broken.stacks[0] = dataclasses.replace(broken.stacks[0], status="failed", latency=None, fidelity=None,
                                           speedup=None, speedup_uncertainty=None, within_noise=None,
                                           reason="build: out of memory", phase="build")
    assert any("ran in A, failed in B before it was timed (build: out of memory)" in r
               for r in compare([ref], [broken]).regressions)

    other = _runs([0.5] * 3, started="2026-12-04T00:00:00")
    other.stacks[0].options = {"fp8_max": {"kernel": "flash"}}
    result = compare([ref], [other])
    assert [c.name for c in result.stacks] == ["baseline"]
    assert result.only_a == result.only_b == ["fp8_max (flux-mini on ?, 256x256, 8 steps)"]
    assert compare([ref], [other], stacks=["fp8_max"]).stacks == []


def test_the_interval_resamples_both_sides_and_is_reproducible():
    spread = [1.0, 1.1, 0.9, 1.05, 0.95]
    a_only = ratio_of_medians(spread, [1.0] * 5)
    b_only = ratio_of_medians([1.0] * 5, spread)
    assert a_only.low < a_only.ratio < a_only.high and b_only.low < b_only.ratio < b_only.high
    many = [1.0 + 0.013 * ((7 * i) % 23) for i in range(40)]
    assert ratio_of_medians(many, many[::-1]) == ratio_of_medians(many, many[::-1])  # seeded
    with pytest.raises(ValueError):
        ratio_of_medians([1.0], [])
    with pytest.raises(ValueError):
        ratio_of_medians([], [1.0])


def test_the_interval_is_the_central_percentile_range_of_the_bootstrap():
    """A = [1, 1], B = [1, 2]: a resampled median of B is 1, 1.5 or 2 with probability 1/4, 1/2,
    1/4. The central 40 % of the ratios is then all 1.5; the central 60 % reaches 1 and 2."""
    narrow = ratio_of_medians([1.0, 1.0], [1.0, 2.0], confidence=0.4)
    assert (narrow.low, narrow.ratio, narrow.high) == (1.5, 1.5, 1.5)
    wide = ratio_of_medians([1.0, 1.0], [1.0, 2.0], confidence=0.6)
    assert (wide.low, wide.high) == (1.0, 2.0)


def test_speed_verdict_at_its_boundaries():
    from fluxopt.history.compare import RatioEstimate

    # the interval decides: its lower end above 1 + threshold, its upper end below 1 - threshold
    assert speed_verdict(RatioEstimate(1.2, 1.04, 1.3, 5, 5), 0.05) == (Speed.SAME, False)
    assert speed_verdict(RatioEstimate(1.2, 1.25, 1.3, 5, 5), 0.25) == (Speed.SAME, False)  # == 1 + threshold
    assert speed_verdict(RatioEstimate(1.2, 1.26, 1.3, 5, 5), 0.25) == (Speed.SLOWER, True)
    assert speed_verdict(RatioEstimate(0.8, 0.7, 0.75, 5, 5), 0.25) == (Speed.SAME, False)  # == 1 - threshold
    assert speed_verdict(RatioEstimate(0.8, 0.7, 0.74, 5, 5), 0.25) == (Speed.FASTER, False)
    assert speed_verdict(RatioEstimate(0.8, 0.7, 0.76, 5, 5), 0.25) == (Speed.SAME, False)
    # one sample on a side: the ratio against the threshold, whatever an interval says
    assert speed_verdict(RatioEstimate(1.25, 1.3, 1.5, 1, 5), 0.25) == (Speed.SAME, False)
    assert speed_verdict(RatioEstimate(0.75, 0.5, 0.6, 5, 1), 0.25) == (Speed.SAME, False)
    assert speed_verdict(RatioEstimate(1.3, 1.0, 1.1, 1, 5), 0.25) == (Speed.SLOWER, True)
    assert speed_verdict(RatioEstimate(0.7, 0.9, 1.1, 5, 1), 0.25) == (Speed.FASTER, False)


def test_compare_bookkeeping_names_sides_pools_runs_and_reports_fidelity():
    from fluxopt.record import judge_metric

    ref = _runs([0.50, 0.51, 0.49], started="2026-12-01T00:00:00")
    ref2 = _runs([0.50, 0.52, 0.48], started="2026-12-01T01:00:00")
    new = _runs([0.60, 0.61, 0.59], started="2026-12-02T00:00:00")
    for record, err in ((ref, 0.01), (ref2, 0.03), (new, 0.02)):
        record.stacks[0].fidelity["metrics"]["latent_rel_l2"] = judge_metric([err, err / 2], False, None)
    result = compare([ref, ref2], [new], "ref", "new")
    row = next(c for c in result.stacks if c.name == "fp8_max")
    assert row.a.runs == [ref, ref2] and len(row.a.samples) == 6
    assert row.a.worst("psnr") == 40.0 and row.a.worst("latent_rel_l2") == 0.03  # lower is better: the largest
    assert row.a.metrics() == ["latent_rel_l2", "psnr"]
    assert row.to_json()["fidelity"]["latent_rel_l2"] == {"a": 0.03, "b": 0.02}
    assert row.regressions == ["20.0 % slower (median latency 0.5 s -> 0.6 s; more than 5 % with 95% confidence)"]
    assert row.notes == [] and result.to_json()["a"] == "ref" and result.to_json()["b"] == "new"
    assert render_markdown(result).startswith("# fluxopt compare: ref → new")
    assert compare([ref], [new], max_regression=0.0).regressions  # a threshold of 0 is allowed
    with pytest.raises(ValueError):
        compare([ref], [new], max_regression=-0.01)
    only_baseline = compare([ref], [new], stacks=["baseline"])
    assert [c.name for c in only_baseline.stacks] == ["baseline"] and only_baseline.only_a == only_baseline.only_b == []


def test_compare_reads_the_reason_of_a_lost_gate_and_tells_broken_sides_apart():
    ref = _runs([0.5] * 3)
    worse = _runs([0.5] * 3, psnr=10.0, started="2026-12-02T00:00:00")
    [lost] = compare([ref], [worse]).regressions
    assert lost == f"fp8_max: fidelity gate passed in A, fails in B ({worse.stacks[0].fidelity['reason']})"
    assert "psnr 10" in lost
    passing_then_failing = compare([ref], [_runs([0.5] * 3, started="2026-12-05T00:00:00"), worse])
    assert passing_then_failing.regressions == [lost]  # the failing run's reason, not the passing one's

    def broken(started: str):
        record = _runs([0.5] * 3, started=started)
        record.stacks[0] = dataclasses.replace(record.stacks[0], status="failed", latency=None, fidelity=None,
                                               speedup=None, speedup_uncertainty=None, within_noise=None,
                                               reason="apply: no GPU", phase="apply")
        return record

    both = compare([broken("2026-12-03T00:00:00")], [broken("2026-12-04T00:00:00")])
    row = next(c for c in both.stacks if c.name == "fp8_max")
    assert row.regressions == [] and row.notes == ["not timed in either (A: apply: no GPU; B: apply: no GPU)"]
    fixed = compare([broken("2026-12-03T00:00:00")], [ref])
    assert next(c for c in fixed.stacks if c.name == "fp8_max").notes == [
        "failed in A before it was timed (apply: no GPU), runs in B"]


def test_compare_skips_unrunnable_stacks_and_runs_without_a_baseline():
    ref = run([stack("fbcache", 1.5, status="skipped"), stack("fp8_max", 2.0)], started="2026-12-01T00:00:00")
    new = run([stack("fp8_max", 2.0)], started="2026-12-02T00:00:00")
    new.baseline = None
    result = compare([ref], [new])
    assert [c.name for c in result.stacks] == ["fp8_max"]  # the skipped stack neither matched nor listed
    assert result.only_a == ["baseline (flux-mini on ?, 256x256, 8 steps)"] and result.only_b == []


# --------------------------------------------------------------------------- the store
def _text(record) -> str:
    return json.dumps(record.to_json())


def test_store_adds_once_updates_a_resumed_run_and_selects_by_label_and_revision(tmp_path):
    path = tmp_path / "s.sqlite"
    first = _runs([0.5] * 3, environment={"git": {"revision": "abc123def"}, "packages": {"torch": "2.11.0"}})
    with ResultsStore(path) as store:
        assert store.add(first, _text(first), label="ref") == "added"
        assert store.add(first, _text(first)) == "unchanged"
        finished = dataclasses.replace(first, finished="2026-12-01T01:00:00")
        assert run_identity(finished) == run_identity(first)
        assert store.add(finished, _text(finished)) == "updated"
        assert store.count() == 1
        assert [r.label for r in store.select(label="ref").runs] == ["ref"]  # the label survives the update
        assert store.select(label="nope").runs == []
        assert len(store.select(revision="abc1").runs) == 1 and store.select(revision="abd").runs == []
        assert store.select(revision="a%").runs == []  # LIKE's wildcards are plain characters
        assert store.schema_version == store_module.SCHEMA_VERSION
        assert store.integrity() == "ok"
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_store_refuses_edited_records_and_rederives_what_it_reads(tmp_path):
    record = _runs([0.5] * 3)
    edited = record.to_json()
    edited["stacks"][0]["speedup"] = 9.0
    path = tmp_path / "result.json"
    path.write_text(json.dumps(edited))
    with ResultsStore(tmp_path / "s.sqlite") as store:
        with pytest.raises(Exception, match="edited"):
            store.add(read_record(path), path.read_text())
        store.add(record, _text(record))
        # a row edited inside the database is named, never used
        store._db.execute("UPDATE runs SET record = replace(record, '\"speedup\": 2.0', '\"speedup\": 3.0')")
        selection = store.select()
        assert selection.runs == [] and "edited" in selection.unusable[0]


def test_store_migrates_an_older_schema_and_refuses_a_newer_one(tmp_path, monkeypatch):
    path = tmp_path / "s.sqlite"
    record = _runs([0.5] * 3)
    with ResultsStore(path) as store:
        store.add(record, _text(record))
    monkeypatch.setattr(store_module, "MIGRATIONS", (*store_module.MIGRATIONS, "ALTER TABLE runs ADD COLUMN note TEXT;"))
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", len(store_module.MIGRATIONS))
    with ResultsStore(path) as store:
        assert store.schema_version == len(store_module.MIGRATIONS) and store.count() == 1
        assert "note" in [row[1] for row in store._db.execute("PRAGMA table_info(runs)")]
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="schema version 2; this fluxopt reads up to 1"):
        ResultsStore(path)
    (tmp_path / "junk.sqlite").write_text("not a database")
    with pytest.raises(ConfigError, match="is not a fluxopt results store"):
        ResultsStore(tmp_path / "junk.sqlite")


def _add_many(path: str, worker: int, count: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    with ResultsStore(Path(path)) as store:
        for i in range(count):
            record = _runs([0.5, 0.51, 0.49], started=f"2026-12-01T{worker:02d}:{i:02d}:00")
            store.add(record, _text(record), label=f"w{worker}")


def test_parallel_writers_lose_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_add_many, args=(str(path), w, 15)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert [p.exitcode for p in workers] == [0] * 4
    with ResultsStore(path) as store:
        assert store.count() == 60 and store.integrity() == "ok"
        assert store.labels() == ["w0", "w1", "w2", "w3"]
        assert sum(1 for _ in store._db.execute("SELECT 1 FROM stacks")) == 120


def test_find_records_reads_published_bundles_and_names_what_it_cannot_use(tmp_path):
    record = _runs([0.5] * 3)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(_text(record))
    old = record.to_json() | {"schema_version": 99}  # written by a newer fluxopt
    (tmp_path / "published.json").write_text(json.dumps({"runs": [{"command": "x", "result": record.to_json()},
                                                                   {"command": "y", "result": old}]}))
    (tmp_path / "other.json").write_text(json.dumps({"kernels": []}))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "result.json").write_text("{")
    found = find_records([tmp_path])
    assert len(found.records) == 2 and found.not_records == 1
    assert len(found.unusable) == 2
    assert any("published.json#runs[1]: has schema_version 99" in u for u in found.unusable)
    assert any("broken/result.json" in u for u in found.unusable)


# --------------------------------------------------------------------------- end to end
def _report(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fluxopt.cli.report", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300, cwd=REPO)


SWEEP_JOBS = 3  # 3 pairs of separate runs, 6 comparisons in both orders
# Runs at one speed are judged at this threshold; the slower "library" (2x) is caught at the default.
# fault_sleepy pads each generation to its floor, so what is left between runs at one speed is the
# sleep's own overshoot and the work after the VAE (a few ms), far below it.
CPU_NOISE = 0.25


@pytest.mark.xdist_group("history_e2e")
def test_compare_tells_a_slower_library_from_noise_end_to_end(tmp_path, plugin_env, capsys):
    """Three runs of one stack at one speed never raise a false alarm against each other at a
    threshold above this machine's noise (6 comparisons of the stack); a run where the stack's
    "library" sleeps twice as long is exit 1 with the stack named at the default threshold, through
    directories and through store labels (the gate as CI runs it: a child process)."""
    store = tmp_path / "store.sqlite"
    env = {**plugin_env, "FLUXOPT_STORE": str(store), "FLUXOPT_FAULT_STEP_SLEEP_S": "0.15"}
    common = ["+backend=fault_sleepy", "bench.iterations=4", "bench.steps=2", "save_images=false",
              "disabled_plugins=[fluxopt.report]"]  # no pages or plots per job: this test reads records
    # one after the other: a second process competing for the CPU makes the tiny model's own compute,
    # the part of each generation that is not asleep, vary by more than the threshold
    def run(*args: str, **extra: str) -> None:
        proc = run_cli(*args, *common, env={**env, **extra})
        assert proc.returncode == 0, proc.stderr[-2000:]

    run("-m", f"bench.seed=range(0,{SWEEP_JOBS})", "label=ref", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    run("label=candidate", f"hydra.run.dir={tmp_path / 'slow'}", FLUXOPT_FAULT_STEP_SLEEP_S="0.3")

    jobs = sorted(p.parent for p in (tmp_path / "sweep").rglob("result.json"))
    assert len(jobs) == SWEEP_JOBS
    records = [read_record(j / "result.json") for j in jobs]
    slow_record = read_record(tmp_path / "slow" / "result.json")
    # the stack under test only: the tiny model's baseline is pure CPU work, whose median moves by
    # several percent between processes on a shared CI machine (the sleep dominates the stack's time)
    guarded = ["fault_sleepy"]
    for a, b in itertools.permutations(records, 2):
        same = compare([a], [b], stacks=guarded, max_regression=CPU_NOISE)
        assert same.regressions == [], render_markdown(same)
    for a in records:
        assert [r.split(":")[0] for r in compare([a], [slow_record], stacks=guarded).regressions] == ["fault_sleepy"]

    from fluxopt.cli.report import main as report

    with pytest.raises(SystemExit) as same:
        report(["compare", str(jobs[0]), str(jobs[1]), "--stack", "fault_sleepy", "--max-regression", str(CPU_NOISE)])
    out = capsys.readouterr()
    assert same.value.code == 0, out.out + out.err
    assert "same within noise" in out.out and "No regression" in out.out
    with pytest.raises(SystemExit) as worse:
        report(["compare", str(jobs[0]), str(tmp_path / "slow"), "--stack", "fault_sleepy"])
    out = capsys.readouterr()
    assert worse.value.code == 1, out.out + out.err
    assert "regression: fault_sleepy:" in out.err

    # the runs added themselves to the store; labels pool the sweep's runs
    by_label = _report("compare", "ref", "candidate", "--store", str(store), "--stack", "fault_sleepy", "--json")
    assert by_label.returncode == 1, by_label.stderr
    data = json.loads(by_label.stdout)
    assert data["stacks"][0]["runs"] == {"a": SWEEP_JOBS, "b": 1}
    assert data["stacks"][0]["ratio"]["low"] > 1.5 and data["only_in_a"] == [] == data["only_in_b"]

    with pytest.raises(SystemExit) as history:
        report(["history", "--store", str(store), "--stack", "fault_sleepy", "--plot", str(tmp_path / "h.png")])
    out = capsys.readouterr()
    assert history.value.code == 0, out.err
    assert out.out.count("| ref |") == SWEEP_JOBS and "| candidate |" in out.out
    assert (tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["compare", "nowhere", "nothing"], "A=nowhere is not a directory, and there is no results store"),
    (["compare", ".", ".", "--max-regression", "-1"], "--max-regression=-1.0 is not a fraction"),
    (["compare", "fluxopt/zoo", "fluxopt/zoo"], "A=fluxopt/zoo holds no readable fluxopt record"),
    (["import", "nowhere"], "no such file or directory: nowhere"),
    (["history", "--store", "missing.sqlite"], "no such results store"),
    (["history", "--plot", "x.jpg"], "--plot=x.jpg is not a .png file"),
])
def test_bad_report_input_is_one_line_exit_2(args, message, tmp_path, monkeypatch, capsys):
    from fluxopt.cli.report import main

    monkeypatch.setenv("FLUXOPT_STORE", str(tmp_path / "none.sqlite"))
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_import_backfills_the_published_records_once(tmp_path, monkeypatch, capsys):
    from fluxopt.cli.report import main

    monkeypatch.chdir(REPO)
    store = tmp_path / "s.sqlite"
    with pytest.raises(SystemExit) as stop:
        main(["import", "docs/results", "--store", str(store), "--label", "published"])
    first = capsys.readouterr()
    assert stop.value.code == 0 and "not used" not in first.err, first.err  # every published record, schema 1 too
    added = int(first.out.split(" run(s) added")[0])
    assert added >= 50
    with pytest.raises(SystemExit) as stop:
        main(["import", "docs/results", "--store", str(store)])
    assert stop.value.code == 0 and f"0 run(s) added, 0 updated, {added} already there" in capsys.readouterr().out
    with ResultsStore(store) as s:
        assert len(s.select(label="published").runs) == added


def test_the_eta_comes_from_the_last_run_of_each_stack_here_or_its_cold_one_on_a_cold_cache(tmp_path, monkeypatch):
    from fluxopt.history import eta as eta_module

    store = tmp_path / "s.sqlite"
    old = _runs([0.5] * 3, started="2026-12-01T00:00:00", environment={"device": {"name": "GPU X"}})
    old.stacks[0].elapsed_s = 300.0
    new = _runs([0.5] * 3, started="2026-12-02T00:00:00", environment={"device": {"name": "GPU X"}})
    new.stacks[0].elapsed_s = 120.0
    other = _runs([0.5] * 3, started="2026-12-03T00:00:00", environment={"device": {"name": "GPU Y"}})
    other.stacks[0].elapsed_s = 9.0
    with ResultsStore(store) as s:
        for record in (new, old, other):
            s.add(record, _text(record))
    shapes = {"height": 256, "width": 256, "steps": 8}
    expected = eta_module.past_durations(store, "flux-mini", "GPU X", shapes, generations=6)
    assert expected == {"baseline": pytest.approx(1.0 * 6), "fp8_max": 120.0}  # the newest run, this device
    new.baseline.elapsed_s = 14.0  # a record that kept the baseline's wall time: that is the estimate
    with ResultsStore(store) as s:
        s.add(new, _text(new))
    assert eta_module.past_durations(store, "flux-mini", "GPU X", shapes, 6)["baseline"] == 14.0
    assert eta_module.past_durations(store, "flux-mini", "GPU X", {**shapes, "steps": 28}, 6) == {}
    assert eta_module.past_durations(tmp_path / "none.sqlite", "flux-mini", "GPU X", shapes, 6) == {}

    # asked through the hook, as the command line asks: the history ring answers, unless disabled
    from fluxopt import Shapes, plugins
    from fluxopt.cli import console

    # the cache state picks the run: with something built in the artifact cache, the newest; with
    # nothing built (a fresh machine; a model checkpoint is not a build), the longest: the cold build
    warm, cold = tmp_path / "warm-cache", tmp_path / "cold-cache"
    (warm / "artifacts" / "compile" / "0123abcd").mkdir(parents=True)
    (cold / "artifacts" / "model" / "flux-mini").mkdir(parents=True)
    (cold / "inductor").mkdir()  # an empty compiler cache holds nothing built either
    shapes_of_run = Shapes(height=256, width=256, steps=8, guidance_scale=3.5, max_sequence_length=128)
    asked = dict(model="flux-mini", device="GPU X", shapes=shapes_of_run, stacks=["fp8_max"], generations=6,
                 config={"store": str(store), "cache": {"dir": str(warm)}})
    assert plugins.hook().fluxopt_expected_durations(**asked) == {"baseline": 14.0, "fp8_max": 120.0}
    asked_cold = {**asked, "config": {"store": str(store), "cache": {"dir": str(cold)}}}
    assert plugins.hook().fluxopt_expected_durations(**asked_cold) == {"baseline": 14.0, "fp8_max": 300.0}
    assert eta_module.past_durations(store, "flux-mini", "GPU X", shapes, 6, cold=True)["fp8_max"] == 300.0
    assert plugins.hook(["fluxopt.history"]).fluxopt_expected_durations(**asked) is None

    clock = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    tracker = console.Eta(["fp8_max", "compile"], expected)
    assert tracker.text() == "ETA over 2 min, 1 stack(s) never ran here"  # 6 s + 120 s, compile unknown
    tracker.update(1)
    clock[0] += 100.0
    assert tracker.text() == "ETA over 20 s, 1 stack(s) never ran here"
    clock[0] += 100.0
    assert tracker.text() == "ETA over 0 s, 1 stack(s) never ran here"  # over its estimate: never negative
    done = console.Eta(["fp8_max"], expected)
    done.update(1)
    assert done.text() == "ETA 2 min" and console.Eta(["compile"], {}).text() is None


def test_the_eta_reads_only_runs_of_the_coming_kind_measuring_or_build_only(tmp_path):
    """A priming ``build_only`` run's wall time leaves out the measuring: the warm run after it must
    not expect its stacks to take that long, nor a priming run expect a measuring run's time."""
    from fluxopt.history import eta as eta_module

    store = tmp_path / "s.sqlite"
    measured = _runs([0.5] * 3, started="2026-12-01T00:00:00", environment={"device": {"name": "GPU X"}})
    measured.stacks[0].elapsed_s = 40.0
    primed = _runs([0.5] * 3, started="2026-12-02T00:00:00", environment={"device": {"name": "GPU X"}},
                   build_only=True)
    primed.stacks[0].elapsed_s = 3.0
    with ResultsStore(store) as s:
        for record in (measured, primed):
            s.add(record, _text(record))
    shapes = {"height": 256, "width": 256, "steps": 8}
    assert eta_module.past_durations(store, "flux-mini", "GPU X", shapes, 6)["fp8_max"] == 40.0
    assert eta_module.past_durations(store, "flux-mini", "GPU X", shapes, 6, build_only=True)["fp8_max"] == 3.0


def test_stacks_that_never_ran_here_are_counted_at_the_baseline_once_it_is_measured(monkeypatch):
    from fluxopt.cli import console

    clock = [1000.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    fresh = console.Eta(["compile", "fbcache", "aoti"], {"aoti": 300.0})  # a fresh machine knows only aoti
    fresh.update(0)
    assert fresh.text() == "ETA over 5 min, 3 stack(s) never ran here"  # the baseline's own time is unknown
    clock[0] += 60.0
    fresh.update(1)  # the baseline took 60 s
    assert fresh.text() == "ETA over 7 min, 2 stack(s) never ran here, counted at the baseline's 60 s"
    clock[0] += 90.0  # compile is over its estimate: it counts as done, never negative
    assert fresh.text() == "ETA over 6 min, 2 stack(s) never ran here, counted at the baseline's 60 s"
    resumed = console.Eta(["compile", "fbcache"], {})
    clock[0] += 30.0
    resumed.update(2)  # a resumed run reuses its baseline: no time measured for it, nothing to count at
    assert resumed.text() is None


def test_a_side_is_a_directory_a_label_or_a_revision(tmp_path, monkeypatch):
    from fluxopt.history.cli import resolve_side

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    store = tmp_path / "s.sqlite"
    at_head = _runs([0.5] * 3, started="2026-12-01T00:00:00", environment={"git": {"revision": head}})
    older = _runs([0.5] * 3, started="2026-12-02T00:00:00", environment={"git": {"revision": "0123456789abcdef"}})
    with ResultsStore(store) as s:
        s.add(at_head, _text(at_head), label="main")
        s.add(older, _text(older))
    monkeypatch.chdir(REPO)
    assert [r.started for r in resolve_side("main", str(store), "A").records] == [at_head.started]
    assert [r.started for r in resolve_side("HEAD", str(store), "A").records] == [at_head.started]  # a git name
    assert [r.started for r in resolve_side("0123456", str(store), "B").records] == [older.started]  # a prefix
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "result.json").write_text(_text(older))
    assert [r.started for r in resolve_side(str(tmp_path / "run"), None, "B").records] == [older.started]
    with pytest.raises(ConfigError, match="B=nothing-like-this is not a directory, a label in .* \\(main\\)"):
        resolve_side("nothing-like-this", str(store), "B")


@pytest.mark.parametrize(("overrides", "generations"), [
    (["bench=full"], 1 + 5),  # warm-up and timed calls (at most); the outputs are timed calls
    (["bench.warmup=1", "bench.iterations=1", "bench.prompts=[a,b,c]"], 1 + 3),  # two prompts past the timing
])
def test_the_eta_counts_the_generations_the_baseline_will_make(monkeypatch, overrides, generations):
    from hydra import compose, initialize_config_module

    from fluxopt import plugins
    from fluxopt.cli import _eta
    from fluxopt.config import register_configs

    asked, real_hook = {}, plugins.hook

    class Hook:  # the real hooks, but the ETA's question is recorded
        def __init__(self, *args, **kwargs):
            self.real = real_hook(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.real, name)

        def fluxopt_expected_durations(self, **kwargs):
            asked.update(kwargs)
            return {}

    monkeypatch.setattr(plugins, "hook", Hook)
    register_configs()
    with initialize_config_module(config_module="fluxopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    _eta(cfg)
    assert asked["generations"] == generations


def test_the_eta_expects_no_time_for_a_stack_this_machine_cannot_run(tmp_path):
    """A bake-off skips a stack whose requirements this machine lacks without loading anything: the
    ETA counts it at nothing, where it would count a stack that never ran here at the baseline's time."""
    from hydra import compose, initialize_config_module

    from fluxopt.cli import _eta
    from fluxopt.config import register_configs

    register_configs()
    with initialize_config_module(config_module="fluxopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", f"store={tmp_path / 'empty.sqlite'}"])
    eta = _eta(cfg)
    assert eta.expected["offload"] == 0.0  # needs a GPU
    assert "fuse_qkv" not in eta.expected  # runs on the CPU, never measured here
    assert "fuse_qkv" in eta.order and "offload" in eta.order
