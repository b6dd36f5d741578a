"""Hand-edited and damaged records, as a hostile user (or a bad disk) leaves them: the one reader
refuses what it cannot use with the reason, re-derives every derived figure from the raw samples
and metric values, and marks a record whose stored figures disagree as edited; every consumer
(summary, ``fluxopt-report``, ``--best``, ``apply_stack`` from a result) then shows it, never
trusts or picks it, and the verdict is "incomplete", never "passed"."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fluxopt.record import RunRecord, StackRecord, UnreadableRecord, read_record, speedup_of, write_record
from fluxopt.record import LatencyStats
from fluxopt.report.summary import write_summary
from fluxopt.sweep import sweep_lock, verdict_of, write_expected


def _fidelity(psnr: list[float], threshold: float = 20.0) -> dict:
    from fluxopt.record import gate_verdict, judge_metric

    metrics = {"psnr": judge_metric(psnr, True, threshold)}
    passed, reason = gate_verdict(metrics, {}, {"psnr": threshold})
    return {"passed": passed, "reason": reason, "metrics": metrics, "unavailable": {},
            "thresholds": {"psnr": threshold}}


def make_record(base=(1.0, 1.1, 0.9), stack=(0.5, 0.55, 0.45), psnr=(35.0, 33.0), name="fuse_qkv",
                overrides=("+backend=fuse_qkv",)) -> RunRecord:
    baseline = StackRecord(stack="baseline", backends=[], status="ok", lossless=True,
                           latency=LatencyStats.from_samples(base))
    s = StackRecord(stack=name, backends=name.split("+"), status="ok", lossless=False,
                    latency=LatencyStats.from_samples(stack), fidelity=_fidelity(list(psnr)),
                    options={n: {} for n in name.split("+")})
    sp = speedup_of(baseline.latency, s.latency)
    s.speedup, s.speedup_uncertainty, s.within_noise = sp.value, sp.uncertainty, sp.within_noise
    return RunRecord(model={"name": "tiny", "trained": False, "dtype": "float32"}, baseline=baseline, stacks=[s],
                     complete=True, mode="stack", requested=[name], shapes={"height": 64, "width": 64, "steps": 2,
                                                                             "guidance_scale": 3.5,
                                                                             "max_sequence_length": 32},
                     provenance={"overrides": list(overrides)}, prompts=["a", "b"], seed=0)


def write(directory: Path, record: RunRecord) -> Path:
    path = directory / "result.json"
    write_record(path, record)
    return path


def edit(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def report(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """``fluxopt-report DIR ARGS`` in this process (the same entry point, without a fresh interpreter)."""
    import contextlib
    import io

    from fluxopt.cli import report as report_cli

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            report_cli.main([str(directory), *args])
        except SystemExit as stop:
            code = stop.code or 0
    return subprocess.CompletedProcess([], code, out.getvalue(), err.getvalue())


def test_a_record_written_is_read_back_whole_and_not_edited(tmp_path):
    record = make_record()
    back = read_record(write(tmp_path, record))
    assert back.edited == [] and back.failures() == []
    assert back.stacks[0].speedup == pytest.approx(2.0) and back.stacks[0].passed_gate


# Hand edits of a stored derived figure: (id, edit, what the reader must name)
EDITS = [
    ("speedup", lambda d: d["stacks"][0].update(speedup=9.99), "speedup 9.99"),
    ("uncertainty", lambda d: d["stacks"][0].update(speedup_uncertainty=0.0001), "speedup_uncertainty"),
    ("within_noise", lambda d: d["stacks"][0].update(within_noise=True), "within_noise"),
    ("median", lambda d: d["stacks"][0]["latency"].update(median=0.1), "latency.median"),
    ("mean", lambda d: d["stacks"][0]["latency"].update(mean=0.1), "latency.mean"),
    ("std", lambda d: d["stacks"][0]["latency"].update(std=0.0), "latency.std"),
    ("min", lambda d: d["stacks"][0]["latency"].update(min=0.01), "latency.min"),
    ("p90", lambda d: d["stacks"][0]["latency"].update(p90=0.01), "latency.p90"),
    ("n", lambda d: d["stacks"][0]["latency"].update(n=30), "latency.n"),
    ("baseline median", lambda d: d["baseline"]["latency"].update(median=5.0), "baseline.latency.median"),
    ("psnr worst", lambda d: d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(worst=99.0), "psnr.worst"),
    ("psnr mean", lambda d: d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(mean=99.0), "psnr.mean"),
    ("gate flipped", lambda d: d["stacks"][0]["fidelity"].update(passed=False), "fidelity.passed"),
    ("samples faster", lambda d: d["stacks"][0]["latency"].update(samples=[0.1, 0.1, 0.1]), "speedup"),
    ("metric values", lambda d: d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(per_prompt=[5.0, 5.0]),
     "psnr.worst"),
    ("status of a failing gate", lambda d: (d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(
        per_prompt=[5.0, 5.0], worst=5.0, mean=5.0, passed=False)), "fidelity.passed"),
    ("threshold lowered", lambda d: (d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(threshold=40.0),
                                     d.update(config={"fidelity": {"lossy": {"psnr": 20.0}}})), "threshold"),
]


@pytest.mark.parametrize("change, named", [(e[1], e[2]) for e in EDITS], ids=[e[0] for e in EDITS])
def test_an_edited_figure_is_detected_shown_and_never_trusted(tmp_path, change, named):
    path = write(tmp_path, make_record())
    edit(path, change)
    record = read_record(path)
    assert record.edited and any(named in why for why in record.edited), record.edited
    assert any(why.startswith("edited: ") for why in record.failures())
    assert verdict_of(tmp_path).passed is False
    proc = report(tmp_path)
    assert proc.returncode == 1, proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "**Verdict: every requested stack passed.**" not in summary and "edited" in summary
    best = report(tmp_path, "--best")
    assert best.returncode == 1 and "edited" in best.stderr


def test_an_edited_speedup_is_never_picked_over_an_honest_one(tmp_path):
    honest, edited = tmp_path / "a", tmp_path / "b"
    write(honest, make_record(stack=(0.8, 0.85, 0.75), name="channels_last", overrides=("+backend=channels_last",)))
    path = write(edited, make_record())
    edit(path, lambda d: d["stacks"][0].update(speedup=50.0))
    proc = report(tmp_path, "--best")
    assert proc.returncode == 0 and proc.stdout.startswith("best: channels_last"), proc.stdout
    assert "fuse_qkv: its record was edited" in proc.stdout


# Damaged files: (id, content or edit, what the reason must contain)
DAMAGE = [
    ("not json", "{not json", "not valid JSON"),
    ("empty", "", "not valid JSON"),
    ("a list", "[]", "expected a JSON object"),
    ("no stacks", lambda d: d.pop("stacks"), "no 'stacks' list"),
    ("stacks not a list", lambda d: d.update(stacks={}), "no 'stacks' list"),
    ("no schema", lambda d: d.pop("schema_version"), "schema_version None"),
    ("future schema", lambda d: d.update(schema_version=99), "schema_version 99"),
    ("no model", lambda d: d.pop("model"), "no model name"),
    ("model without name", lambda d: d.update(model={}), "no model name"),
    ("stack without name", lambda d: d["stacks"][0].pop("stack"), "no 'stack' name"),
    ("bad status", lambda d: d["stacks"][0].update(status="great"), "status 'great'"),
    ("no status", lambda d: d["stacks"][0].pop("status"), "status None"),
    ("samples removed", lambda d: d["stacks"][0]["latency"].pop("samples"), "no usable raw samples"),
    ("negative sample", lambda d: d["stacks"][0]["latency"].update(samples=[-1.0, 0.5]), "no usable raw samples"),
    ("null sample", lambda d: d["stacks"][0]["latency"].update(samples=[None, 0.5]), "no usable raw samples"),
    ("metric values removed", lambda d: d["stacks"][0]["fidelity"]["metrics"]["psnr"].pop("per_prompt"),
     "no per-prompt values"),
    ("unknown field", lambda d: d.update(speedup_override=3), "unknown fields"),
    ("unknown stack field", lambda d: d["stacks"][0].update(verdict="pass"), "unknown fields"),
    ("config not an object", lambda d: d.update(config=[1]), "'config' is not an object"),
]


@pytest.mark.parametrize("damage, reason", [(d[1], d[2]) for d in DAMAGE], ids=[d[0] for d in DAMAGE])
def test_a_damaged_record_is_named_with_why_and_makes_the_verdict_incomplete(tmp_path, damage, reason):
    good, bad = tmp_path / "good", tmp_path / "bad"
    write(good, make_record(name="channels_last", overrides=("+backend=channels_last",)))
    path = write(bad, make_record())
    if callable(damage):
        edit(path, damage)
    else:
        path.write_text(damage)
    with pytest.raises(UnreadableRecord, match="result.json"):
        read_record(path)
    proc = report(tmp_path)
    assert proc.returncode == 1
    summary = (tmp_path / "summary.md").read_text()
    assert "incomplete" in summary and str(path) in summary and reason in summary, summary
    assert json.loads((tmp_path / "summary.json").read_text())["passed"] is False


def test_binary_garbage_is_unreadable_not_a_crash(tmp_path):
    (tmp_path / "result.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UnreadableRecord):
        read_record(tmp_path / "result.json")
    assert report(tmp_path).returncode == 1


def test_a_directory_named_like_a_record_is_unreadable(tmp_path):
    (tmp_path / "job" / "result.json").mkdir(parents=True)
    assert verdict_of(tmp_path).incomplete


def test_an_empty_directory_is_no_verdict_of_passed(tmp_path):
    assert verdict_of(tmp_path).passed is False


# ------------------------------------------------------------------------------- sweeps
def test_an_expected_job_without_a_result_fails_the_verdict_by_name(tmp_path):
    write_expected(tmp_path, [["+backend=fuse_qkv"], ["+backend=channels_last"]], "python -m fluxopt -m ...",
                   search=False)
    write(tmp_path / "a", make_record())
    verdict = verdict_of(tmp_path)
    assert not verdict.passed and any("+backend=channels_last" in why and "no result" in why
                                      for why in verdict.incomplete), verdict
    write_summary(tmp_path)
    assert "never started" in (tmp_path / "summary.md").read_text()
    write(tmp_path / "b", make_record(name="channels_last", overrides=("+backend=channels_last",)))
    assert verdict_of(tmp_path).passed


def test_records_of_an_earlier_sweep_in_the_directory_do_not_count_for_this_one(tmp_path):
    write(tmp_path / "old", make_record(name="channels_last", overrides=("+backend=channels_last",)))
    edit(tmp_path / "old" / "result.json", lambda d: d["stacks"][0].update(status="failed", reason="old"))
    write_expected(tmp_path, [["+backend=fuse_qkv"]], "python -m fluxopt -m +backend=fuse_qkv", search=False)
    write(tmp_path / "a", make_record())
    assert verdict_of(tmp_path).passed


def test_a_second_sweep_into_a_locked_directory_is_refused_naming_the_running_one(tmp_path):
    from fluxopt.errors import ConfigError

    with sweep_lock(tmp_path, "python -m fluxopt -m +backend=compile,fbcache"):
        with pytest.raises(ConfigError, match=r"in use by a running sweep \(pid \d+.*\+backend=compile,fbcache"):
            with sweep_lock(tmp_path, "python -m fluxopt -m +backend=aoti"):
                pass
    with sweep_lock(tmp_path, "again"):  # released: free again
        pass


# ------------------------------------------------------------------------------- the property
DERIVED = [
    ("stacks", 0, "speedup"), ("stacks", 0, "speedup_uncertainty"), ("stacks", 0, "within_noise"),
    ("stacks", 0, "latency", "median"), ("stacks", 0, "latency", "mean"), ("stacks", 0, "latency", "std"),
    ("stacks", 0, "latency", "min"), ("stacks", 0, "latency", "max"), ("stacks", 0, "latency", "p90"),
    ("stacks", 0, "latency", "n"), ("baseline", "latency", "median"), ("baseline", "latency", "std"),
    ("stacks", 0, "fidelity", "passed"), ("stacks", 0, "fidelity", "metrics", "psnr", "worst"),
    ("stacks", 0, "fidelity", "metrics", "psnr", "mean"), ("stacks", 0, "fidelity", "metrics", "psnr", "passed"),
]


@settings(max_examples=60, deadline=None)
@given(where=st.sampled_from(DERIVED), value=st.one_of(st.floats(allow_nan=False, allow_infinity=False),
                                                        st.integers(-10**6, 10**6), st.booleans(), st.none()),
       samples=st.lists(st.floats(0.01, 10.0), min_size=2, max_size=6))
def test_any_edit_to_a_stored_derived_figure_is_detected(tmp_path_factory, where, value, samples):
    directory = tmp_path_factory.mktemp("record")
    path = write(directory, make_record(stack=tuple(samples)))
    data = json.loads(path.read_text())
    node = data
    for key in where[:-1]:
        node = node[key]
    stored = node[where[-1]]
    if value == stored or (isinstance(value, (int, float)) and isinstance(stored, (int, float))
                           and not isinstance(value, bool) and not isinstance(stored, bool)
                           and abs(value - stored) <= 1e-6 * max(abs(stored), 1e-12)):
        return  # not an edit
    node[where[-1]] = value
    path.write_text(json.dumps(data))
    try:
        record = read_record(path)
    except UnreadableRecord:
        return  # a value of the wrong shape: refused, which is detection too
    assert record.edited, (where, value, stored)


def test_the_job_list_says_what_who_and_when_and_an_earlier_one_is_kept(tmp_path, monkeypatch):
    import datetime as dt

    from fluxopt.environment import INVOCATION_ENV
    from fluxopt.sweep import read_expected

    monkeypatch.setenv(INVOCATION_ENV, "abc123")
    write_expected(tmp_path, [["+backend=a"]], "python -m fluxopt -m +backend=a", search=False)
    first = json.loads((tmp_path / "sweep.json").read_text())
    assert first["invocation"] == "abc123" and first["command"] == "python -m fluxopt -m +backend=a"
    assert first["search"] is False and first["jobs"] == [["+backend=a"]]
    assert dt.datetime.fromisoformat(first["started"]).utcoffset() == dt.timedelta(0)
    write_expected(tmp_path, [], "python -m fluxopt -m hydra/sweeper=fluxopt_search", search=True)
    assert [p.name.startswith("sweep.previous-") for p in tmp_path.glob("sweep.previous-*.json")] == [True]
    assert read_expected(tmp_path) == (None, None)  # a search's trials are not known in advance
    (tmp_path / "sweep.json").write_text("{broken")
    assert "cannot be read" in read_expected(tmp_path)[1]


def test_a_job_is_matched_by_its_own_overrides_not_hydras(tmp_path):
    write_expected(tmp_path, [["+backend=fuse_qkv", "hydra/launcher=fluxopt_joblib", "+hydra.job.env_set.X=1",
                               "++hydra.sweep.dir=elsewhere", "~hydra.callbacks.x"]], "cmd", search=False)
    write(tmp_path / "a", make_record(overrides=("+backend=fuse_qkv",)))
    assert verdict_of(tmp_path).passed


def test_summary_rows_show_noise_from_other_runs_warm_starts_and_what_was_not_run(tmp_path):
    from fluxopt.report.summary import summary_rows

    fast = make_record(base=(1.0, 1.005, 0.995), stack=(0.952, 0.9545, 0.9495))
    slow = make_record(base=(1.1, 1.2, 1.0), stack=(0.5, 0.52, 0.48), name="channels_last")
    fast.stacks[0].stats = {"artifacts": {"compile": {"cache_hit": True}}}
    slow.stacks[0].stats = {"artifacts": {"compile": {"cache_hit": True}, "x": {"cache_hit": False}}}
    slow.requested = ["channels_last", "compile"]
    slow.complete = False
    for name, record in (("a", fast), ("b", slow)):
        write(tmp_path / name, record)
    records = [read_record(tmp_path / n / "result.json") for n in ("a", "b")]
    rows = {(row["stack"], row["run"]): (row, machine) for row, machine in summary_rows(records, tmp_path)}
    row, machine = rows[("fuse_qkv", "a")]
    # 1.05x: its own sigma says "not noise", but the two runs' baselines differ by 10%: noise
    assert machine["within_noise"] is False
    assert row["speedup"].endswith("(noise)") and machine["within_noise_sweep"] is True
    assert row["warm start"] == "cache hit" and machine["baseline_median_s"] == 1.0 and machine["model"] == "tiny"
    row, machine = rows[("channels_last", "b")]
    assert "(noise)" not in row["speedup"] and row["warm start"] == "cold build" and row["device"] == "?"
    row, machine = rows[("compile", "b")]
    assert row["status"] == "not run (the job ended before it)" and machine["status"] == "not run"
    assert len(rows) == 3
    slow.interrupted = True
    write(tmp_path / "b", slow)
    rows = {(row["stack"], row["run"]): row for row, _ in summary_rows(
        [read_record(tmp_path / n / "result.json") for n in ("a", "b")], tmp_path)}
    assert rows[("compile", "b")]["status"] == "not run (the job was interrupted)"


def test_the_verdict_sorts_failures_from_what_could_not_be_judged(tmp_path):
    from fluxopt.sweep import collect

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "result.json").write_text("{broken")  # read first: the others are still collected
    failed = make_record(name="channels_last", overrides=("+backend=channels_last",))
    failed.stacks[0].status, failed.stacks[0].reason = "failed", "build: boom"
    write(tmp_path / "b", failed)
    write(tmp_path / "c", make_record())
    edit(tmp_path / "c" / "result.json", lambda d: d["stacks"][0].update(speedup=9.0))
    assert len(collect(tmp_path).records) == 2
    verdict = verdict_of(tmp_path)
    assert verdict.failures == ["b: channels_last: build: boom"]
    assert verdict.incomplete[0].startswith(str(tmp_path / "a" / "result.json"))
    assert verdict.incomplete[1].startswith("c: edited: fuse_qkv.speedup 9.0")
    (tmp_path / "sweep.json").write_text(json.dumps({"jobs": "all of them"}))
    assert any("the sweep's job list has no 'jobs' list" in why for why in verdict_of(tmp_path).incomplete)
    (tmp_path / "sweep.json").write_text(json.dumps({"jobs": [["+backend=x"], "+backend=y"]}))
    assert any("has no 'jobs' list" in why for why in verdict_of(tmp_path).incomplete)
    (tmp_path / "sweep.json").write_text("[]")
    assert any("has no 'jobs' list" in why for why in verdict_of(tmp_path).incomplete)
    write_expected(tmp_path, [["+backend=compile"], []], "cmd", search=False)
    missing = [why for why in verdict_of(tmp_path).incomplete if "no result" in why]
    assert missing == ["job 0 (+backend=compile): no result: it never started, or its process was killed before "
                       "writing one", "job 1 (no overrides): no result: it never started, or its process was killed "
                       "before writing one"]


def test_a_searchs_verdict_is_whether_some_trial_met_the_gate(tmp_path):
    write(tmp_path / "a", make_record())
    edit(tmp_path / "a" / "result.json", lambda d: d["stacks"][0].update(status="failed", reason="a trial missed"))
    (tmp_path / "search.json").write_text(json.dumps({"best": {"stack": "fuse_qkv"}, "trials": []}))
    assert verdict_of(tmp_path).passed  # a failing trial is part of searching
    (tmp_path / "search.json").write_text(json.dumps({"best": None, "trials": []}))
    assert verdict_of(tmp_path).failures[0].startswith("search: no trial met its fidelity gate")
