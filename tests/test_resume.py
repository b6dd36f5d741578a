"""Resume: a result already in the output directory stands for a new run only when it completed,
passed, and measured the same thing; settings that do not change the measurement (resume itself,
output paths, verbosity, saved images) never force a new measurement. In-process, so mutation
testing sees it (the CLI tests of resume run in child processes)."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxopt.config import MEASUREMENT_KEYS
from fluxopt.record import record_from_json
from fluxopt.runner import can_reuse

CONFIG = {"model": {"name": "tiny"}, "bench": {"steps": 2, "height": 64}, "fidelity": {"lossy": {"psnr": 20.0}},
          "backend": {"compile": {"regional": True}}, "device": "cpu", "resume": True, "verbose": False,
          "save_images": True, "hydra_output": "outputs/a"}
IRRELEVANT = {"resume": [True], "verbose": [True, False], "save_images": [False, True],
              "hydra_output": ["outputs/b", "elsewhere"]}


def record(data: dict):
    return record_from_json({"schema_version": 3, "model": {"name": "tiny"}, **data})


def finished(config: dict, stacks: list | None = None, **extra):
    return record({"complete": True, "mode": "stack", "config": copy.deepcopy(config),
                   "stacks": stacks if stacks is not None else [{"stack": "compile", "status": "ok"}], **extra})


def test_a_complete_passing_run_of_the_same_measurement_is_reused():
    assert can_reuse(finished(CONFIG), CONFIG)


@given(st.fixed_dictionaries({k: st.sampled_from(v) for k, v in IRRELEVANT.items()}))
def test_settings_that_do_not_change_the_measurement_never_force_a_new_one(changes):
    assert can_reuse(finished(CONFIG), {**CONFIG, **changes})


@pytest.mark.parametrize("key", MEASUREMENT_KEYS)
def test_any_measurement_setting_that_differs_measures_again(key):
    changed = {**CONFIG, key: {"something": "else"}}
    assert not can_reuse(finished(CONFIG), changed)
    assert not can_reuse(finished(changed), CONFIG)


@pytest.mark.parametrize("previous, why", [
    (finished(CONFIG, complete=False), "interrupted"),
    (finished(CONFIG, [{"stack": "compile", "status": "failed", "reason": "fidelity"}]), "a stack failed"),
    (finished(CONFIG, [{"stack": "compile", "status": "skipped", "reason": "no GPU"}]), "a named stack was skipped"),
    (finished(CONFIG, job_crash="SIGKILL"), "the job's process died"),
    (record({"complete": True, "stacks": []}), "no config recorded"),
])
def test_a_run_that_did_not_finish_and_pass_is_never_reused(previous, why):
    assert not can_reuse(previous, CONFIG), why


def test_a_config_that_does_not_say_resumes():  # resume defaults to true
    config = {k: v for k, v in CONFIG.items() if k != "resume"}
    assert can_reuse(finished(config), config)


def test_resume_false_measures_again():
    assert not can_reuse(finished(CONFIG), {**CONFIG, "resume": False})


def test_a_bake_offs_skipped_backends_are_not_failures_but_a_named_stacks_are():
    skipped = [{"stack": "trt_fp8", "status": "skipped", "reason": "no TensorRT"}]
    assert record({"complete": True, "mode": "bakeoff", "stacks": skipped}).failures() == []
    assert record({"complete": True, "mode": "stack", "stacks": skipped}).failures() == ["trt_fp8: no TensorRT"]
    assert record({"complete": False, "stacks": []}).failures() == [
        "the run did not complete (the record was last written before its end)"]
    assert record({"complete": False, "interrupted": True, "stacks": []}).failures() == [
        "the run was interrupted before its end"]
    assert record({"complete": False, "job_crash": "OOM", "stacks": []}).failures() == ["the job's process died: OOM"]
    # the stack a dead job was measuring is on record as unfinished: its failure is the crash, said once
    unfinished = [{"stack": "ok_one", "status": "ok"},
                  {"stack": "compile", "status": "failed", "phase": "build", "elapsed_s": 251.4,
                   "reason": "interrupted during build after at least 251 s (the last phase on record)"}]
    assert record({"complete": False, "job_crash": "OOM", "stacks": unfinished}).failures() == [
        "the job's process died during compile (build, after at least 251 s): OOM"]
    assert record({"complete": False, "stacks": unfinished}).failures() == [
        "compile: interrupted during build after at least 251 s (the last phase on record)",
        "the run did not complete (the record was last written before its end)"]
    failed_baseline = {"stack": "baseline", "backends": [], "status": "failed", "reason": "non-finite"}
    assert record({"complete": True, "baseline": failed_baseline, "stacks": []}).failures() == ["baseline: non-finite"]
