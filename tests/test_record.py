"""The derived figures of a record, computed in one place (fluxopt.record) for the runner that
writes them and the reader that checks them: the noise rule, the speedup and its uncertainty, a
metric's summary and the gate, and how closely a stored figure must match its re-derivation."""

from __future__ import annotations

import json
import math

import _records as records
import pytest

from fluxopt.record import (SCHEMA_VERSION, LatencyStats, UnreadableRecord, gate_verdict, judge_metric, read_record, speedup_of,
                            within_noise, write_record)


@pytest.mark.parametrize(("speedup", "sigma", "spread", "expected"), [
    (1.05, 0.03, 0.0, True), (0.95, 0.03, 0.0, True), (1.07, 0.03, 0.0, False), (0.93, 0.03, 0.0, False),
    (1.059, 0.03, 0.0, True),  # just inside 2 sigma: still noise
    (1.08, None, 0.1, True), (0.92, None, 0.1, True), (1.08, None, 0.05, False), (1.08, None, 0.0, None),
    (1.5, 0.01, 0.6, True),  # within the spread of baselines in other runs, whatever its own sigma
])
def test_the_noise_rule(speedup, sigma, spread, expected):
    assert within_noise(speedup, sigma, spread) is expected


def test_speedup_is_the_ratio_of_medians_with_relative_spreads_in_quadrature():
    base, stack = LatencyStats.from_samples([1.0, 1.02, 0.98]), LatencyStats.from_samples([0.5, 0.51, 0.49])
    s = speedup_of(base, stack)
    assert s.value == pytest.approx(2.0)
    assert s.uncertainty == pytest.approx(2.0 * math.hypot(0.02 / 1.0, 0.01 / 0.5))
    assert s.within_noise is False
    assert speedup_of(base, LatencyStats.from_samples([1.0, 1.2, 0.8])).within_noise is True
    one = LatencyStats.from_samples([0.5])
    assert speedup_of(base, one).uncertainty is None and speedup_of(one, base).uncertainty is None
    assert speedup_of(base, one).within_noise is None


@pytest.mark.parametrize(("values", "higher", "threshold", "worst", "passed"), [
    ([30.0, 25.0], True, 25.0, 25.0, True),   # at the threshold: passes
    ([30.0, 24.9], True, 25.0, 24.9, False),
    ([0.1, 0.3], False, 0.3, 0.3, True),      # lower is better: the largest is the worst
    ([0.1, 0.31], False, 0.3, 0.31, False),
    ([0.1, 0.31], False, None, 0.31, None),   # no threshold: reported, not judged
    ([30.0, None], True, 20.0, math.nan, False),  # a value that was not finite (stored as null) fails
    ([30.0, float("nan")], True, None, math.nan, None),
])
def test_a_metric_is_judged_on_its_worst_prompt(values, higher, threshold, worst, passed):
    m = judge_metric(values, higher, threshold)
    assert (m["worst"] == worst) or (math.isnan(worst) and math.isnan(m["worst"]))
    assert m["passed"] is passed and m["threshold"] == threshold and m["higher_is_better"] is higher
    if not math.isnan(worst):
        assert m["mean"] == pytest.approx(sum(values) / len(values))


def test_the_gate_names_every_failure_and_a_threshold_it_cannot_judge():
    metrics = {"psnr": judge_metric([19.0], True, 20.0), "latent_rel_l2": judge_metric([0.5], False, 0.25),
               "ssim": judge_metric([0.9], True, 0.75)}
    passed, reason = gate_verdict(metrics, {"lpips": "no weights", "clip": "no model"}, {"lpips": 0.1})
    assert passed is False
    assert reason == "psnr 19 (needs >= 20); latent_rel_l2 0.5 (needs <= 0.25); lpips has a threshold but is not " \
                     "available (no weights)"
    assert gate_verdict({"ssim": metrics["ssim"]}, {"clip": "no model"}, {}) == (True, None)


def test_a_stored_figure_is_accepted_within_float_rounding_and_not_beyond(tmp_path):
    path = tmp_path / "result.json"
    write_record(path, records.run([records.stack("fuse_qkv", 1.5)]))
    data = json.loads(path.read_text())
    data["stacks"][0]["speedup"] *= 1 + 1e-9  # another order of the same float operations
    path.write_text(json.dumps(data))
    assert read_record(path).edited == []
    data["stacks"][0]["speedup"] *= 1 + 1e-4
    path.write_text(json.dumps(data))
    assert read_record(path).edited


@pytest.mark.parametrize(("field", "value"), [("within_noise", 0), ("within_noise", 1), ("speedup", "1.5")])
def test_a_figure_of_another_type_is_an_edit(tmp_path, field, value):
    path = tmp_path / "result.json"
    write_record(path, records.run([records.stack("fuse_qkv", 1.5)]))
    data = json.loads(path.read_text())
    data["stacks"][0][field] = value
    path.write_text(json.dumps(data))
    assert read_record(path).edited


def test_a_passing_gate_stored_over_an_unavailable_threshold_is_an_edit(tmp_path):
    path = tmp_path / "result.json"
    write_record(path, records.run([records.stack("fuse_qkv", 1.5)]))
    data = json.loads(path.read_text())
    data["stacks"][0]["fidelity"]["unavailable"] = {"lpips": "no weights"}
    data["stacks"][0]["fidelity"]["thresholds"]["lpips"] = 0.1
    path.write_text(json.dumps(data))
    assert any("fidelity.passed True is not False" in why for why in read_record(path).edited)


@pytest.mark.parametrize(("change", "says"), [
    (lambda d: d["stacks"][0].update(latency=[1.0]), "latency is not an object"),
    (lambda d: d["stacks"][0]["latency"].update(samples=[0.0, 0.5]), "no usable raw samples"),
    (lambda d: d["stacks"][0]["latency"].update(samples=[True, 0.5]), "no usable raw samples"),
    (lambda d: d["stacks"][0].update(fidelity=[1]), "fidelity is not an object"),
    (lambda d: d["stacks"][0]["fidelity"].update(metrics=[1]), "fidelity.metrics is not an object"),
    (lambda d: d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(threshold="20"), "threshold is not a number"),
    (lambda d: d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(higher_is_better=None), "no per-prompt values"),
    (lambda d: d["stacks"][0]["fidelity"]["metrics"]["psnr"].update(per_prompt=[]), "no per-prompt values"),
    (lambda d: d.update(protocol="2"), "has protocol '2', not a measurement protocol number"),
    (lambda d: d.update(protocol=0), "has protocol 0"),
    (lambda d: d.update(protocol=True), "has protocol True"),
])
def test_a_field_of_the_wrong_shape_names_the_file_and_the_field(tmp_path, change, says):
    path = tmp_path / "result.json"
    write_record(path, records.run([records.stack("fuse_qkv", 1.5)]))
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    with pytest.raises(UnreadableRecord) as info:
        read_record(path)
    assert str(info.value).startswith(f"{path}: ") and says in str(info.value)


def test_a_record_round_trips_and_keeps_what_the_reader_does_not_store(tmp_path):
    record = records.run([records.stack("fuse_qkv", 1.5)])
    record.edited = ["x"]
    data = record.to_json()
    assert "edited" not in data and "path" not in data and data["schema_version"] == SCHEMA_VERSION
    assert read_record(write_record(tmp_path / "r.json", record) or tmp_path / "r.json").to_json() == \
        json.loads(json.dumps(data))


def test_latency_statistics_are_those_of_the_samples():
    s = LatencyStats.from_samples([0.4, 0.1, 0.3, 0.2, 1.0])
    assert (s.median, s.min, s.max, s.n) == (0.3, 0.1, 1.0, 5)
    assert s.mean == pytest.approx(0.4) and s.std == pytest.approx(0.35355339059327373)
    assert s.p90 == pytest.approx(0.76)  # numpy's linear interpolation at the 90th percentile
    assert s.samples == [0.4, 0.1, 0.3, 0.2, 1.0]  # in the order measured
    two = LatencyStats.from_samples([1.0, 3.0])
    assert two.std == pytest.approx(1.4142135623730951)  # two samples have a spread
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


def test_the_noise_rule_includes_its_boundaries():
    assert within_noise(1.5, None, 0.5) is True and within_noise(1.5, 0.25) is True
    assert within_noise(1.5, 0.2499) is False


def test_the_uncertainty_weighs_each_side_by_its_own_median():
    base, stack = LatencyStats.from_samples([2.0, 2.2, 1.8]), LatencyStats.from_samples([1.0, 1.05, 0.95])
    s = speedup_of(base, stack)
    assert s.value == pytest.approx(2.0) and s.uncertainty == pytest.approx(2.0 * math.hypot(0.2 / 2.0, 0.05 / 1.0))
    assert speedup_of(base, LatencyStats.from_samples([1.0])).value == pytest.approx(2.0)


def _with_step_latency(tmp_path):
    record = records.run([records.stack("fuse_qkv", 1.5)])
    record.stacks[0].step_latency = LatencyStats.from_samples([0.02, 0.021, 0.019])
    path = tmp_path / "result.json"
    write_record(path, record)
    return path


@pytest.mark.parametrize("key", ["median", "mean", "std", "min", "max", "p90", "n"])
def test_every_stored_latency_statistic_is_checked_per_step_too(tmp_path, key):
    path = _with_step_latency(tmp_path)
    assert read_record(path).stacks[0].step_latency.median == 0.02
    data = json.loads(path.read_text())
    data["stacks"][0]["step_latency"][key] = 99
    data["stacks"][0]["latency"][key] = 99
    path.write_text(json.dumps(data))
    edited = read_record(path).edited
    assert any(f"fuse_qkv.step_latency.{key} 99" in why for why in edited), edited
    assert any(f"fuse_qkv.latency.{key} 99" in why for why in edited), edited


def test_a_non_finite_output_keeps_its_failed_gate_and_reason(tmp_path):
    record = records.run([records.stack("fuse_qkv", 1.5)])
    stack = record.stacks[0]
    stack.fidelity = {"passed": False, "reason": "non-finite values (NaN/inf) in the output", "non_finite": True,
                      "metrics": {}, "unavailable": {}, "thresholds": {"psnr": 20.0}}
    stack.status, stack.phase, stack.reason = "failed", "fidelity", "fidelity: non-finite"
    write_record(tmp_path / "result.json", record)
    back = read_record(tmp_path / "result.json")
    assert back.edited == [] and back.stacks[0].fidelity["passed"] is False
    assert back.stacks[0].fidelity["reason"] == "non-finite values (NaN/inf) in the output"


def test_the_gate_reason_is_re_derived_with_the_metrics(tmp_path):
    path = tmp_path / "result.json"
    write_record(path, records.run([records.stack("fuse_qkv", 1.5, psnr=10.0)]))
    fidelity = read_record(path).stacks[0].fidelity
    assert fidelity["reason"] == "psnr 10 (needs >= 20)" and fidelity["metrics"]["psnr"]["worst"] == 10.0


def test_a_record_without_a_baseline_round_trips(tmp_path):
    record = records.run([])
    record.baseline = None
    write_record(tmp_path / "result.json", record)
    assert read_record(tmp_path / "result.json").baseline is None


def test_what_cannot_be_read_is_named_with_the_reason(tmp_path):
    (tmp_path / "result.json").mkdir()
    with pytest.raises(UnreadableRecord, match=f"^{tmp_path / 'result.json'}: Is a directory"):
        read_record(tmp_path / "result.json")
    path = tmp_path / "r.json"
    write_record(path, records.run([records.stack("fuse_qkv", 1.5)]))
    data = json.loads(path.read_text())
    data["stacks"][0] = "fuse_qkv"
    path.write_text(json.dumps(data))
    with pytest.raises(UnreadableRecord, match=rf"^{path}: stacks\[0\] is not an object"):
        read_record(path)


def _stored(tmp_path, record):
    path = tmp_path / "result.json"
    write_record(path, record)
    return path, json.loads(path.read_text())


def test_consumers_see_the_re_derived_metrics_gate_and_reason_not_the_stored_ones(tmp_path):
    path, data = _stored(tmp_path, records.run([records.stack("fuse_qkv", 1.5, psnr=30.0)]))
    fidelity = data["stacks"][0]["fidelity"]
    fidelity["metrics"]["psnr"].update(worst=99.0, passed=False)
    fidelity.update(passed=False, reason="made up")
    path.write_text(json.dumps(data))
    record = read_record(path)
    assert record.path == path
    stack = record.stacks[0]
    assert stack.worst("psnr") == 30.0 and stack.passed_gate and stack.fidelity["reason"] is None
    assert stack.fidelity["metrics"]["psnr"]["passed"] is True
    assert any("psnr.passed False is not True" in why for why in record.edited)


def test_a_status_that_contradicts_a_consistent_gate_is_an_edit_either_way(tmp_path):
    path, data = _stored(tmp_path, records.run([records.stack("fuse_qkv", 1.5, psnr=10.0)]))
    data["stacks"][0].update(status="ok", phase=None, reason=None)  # the gate itself left as measured: failing
    path.write_text(json.dumps(data))
    record = read_record(path)
    assert any("status 'ok' but its fidelity gate fails (psnr 10" in why for why in record.edited)
    stack = record.stacks[0]
    assert (stack.status, stack.phase, stack.reason) == ("failed", "fidelity", "fidelity: psnr 10 (needs >= 20)")
    path, data = _stored(tmp_path, records.run([records.stack("fuse_qkv", 1.5, psnr=30.0)]))
    data["stacks"][0].update(status="failed", phase="fidelity", reason="fidelity: psnr")
    path.write_text(json.dumps(data))
    assert any("status 'failed' for fidelity but its metrics pass" in why for why in read_record(path).edited)
    data["stacks"][0].update(phase="build", reason="build: boom")  # a failure elsewhere is not contradicted
    path.write_text(json.dumps(data))
    assert read_record(path).edited == []


@pytest.mark.parametrize("lossless", [True, False])
def test_thresholds_are_checked_against_the_configured_gate_of_the_stack_s_kind(tmp_path, lossless):
    record = records.run([records.stack("fuse_qkv", 1.5, threshold=30.0)])
    record.stacks[0].lossless = lossless
    kind, other = ("lossless", "lossy") if lossless else ("lossy", "lossless")
    record.config = {"fidelity": {kind: {"psnr": 30.0}, other: {"psnr": 99.0}}}
    path, _ = _stored(tmp_path, record)
    assert read_record(path).edited == []
    record.config = {"fidelity": {kind: {"psnr": 31.0}, other: {"psnr": 30.0}}}
    path, _ = _stored(tmp_path, record)
    assert any(f"is not the configured fidelity.{kind}.psnr=31.0" in why for why in read_record(path).edited)


def test_a_baseline_of_the_wrong_shape_is_named(tmp_path):
    path, data = _stored(tmp_path, records.run([records.stack("fuse_qkv", 1.5)]))
    data["baseline"] = ["not", "an", "object"]
    path.write_text(json.dumps(data))
    with pytest.raises(UnreadableRecord, match=rf"^{path}: baseline is not an object"):
        read_record(path)
    data["baseline"] = {"stack": "baseline", "status": "ok", "step_latency": {"samples": [-1]}}
    path.write_text(json.dumps(data))
    with pytest.raises(UnreadableRecord, match=rf"^{path}: baseline.step_latency has no usable raw samples"):
        read_record(path)


def test_the_oldest_published_records_schema_1_read_without_edits():
    """The H100 records written before the typed record (schema 1) stored the std of a single
    timed sample as 0.0 (and from it a speedup uncertainty of 0.0): the same figures as a later
    schema's None, not edits. Any other disagreement with the samples is still an edit."""
    from pathlib import Path

    from fluxopt.record import record_from_json

    path = Path(__file__).resolve().parent.parent / "docs/results/2026-11-24-h100-compile-warm-start.json"
    data = json.loads(path.read_text())["runs"][0]["result"]
    assert data["schema_version"] == 1 and data["stacks"][0]["latency"]["n"] == 1
    record = record_from_json(data, path)
    assert not record.edited and record.stacks[0].latency.std is None
    assert record.stacks[0].speedup_uncertainty is None and record.stacks[0].within_noise is None
    assert record.stacks[0].speedup == pytest.approx(record.baseline.latency.median / record.stacks[0].latency.median)
    tampered = json.loads(json.dumps(data))
    tampered["stacks"][0]["latency"]["median"] *= 2
    assert any("latency.median" in e for e in record_from_json(tampered, path).edited)
