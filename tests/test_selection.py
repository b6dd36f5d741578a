"""From bake-off to serving: ``fluxopt-report --best`` under limits, the reproducing
command and Python call, and ``apply_stack`` from a result file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import fluxopt
from fluxopt.cli import report as report_cli
from fluxopt.errors import ConfigError
from fluxopt.record import read_record, write_record
import _records as records
from fluxopt.selection import Limits, best
from fluxopt.stack import option_defaults

GIB = 2**30


def _stack(name, speedup, psnr, peak_gib, status="ok", options=None):
    return records.stack(name, speedup, psnr, peak_gib, status=status, options=options,
                         reason="not on this machine" if status == "skipped" else None)


def _write_run(directory: Path, stacks: list) -> Path:
    path = directory / "result.json"
    directory.mkdir(parents=True)
    write_record(path, records.run(stacks))
    return path


@pytest.fixture
def sweep(tmp_path):
    compile_opts = {"compile": {**option_defaults()["compile"], "regional": not option_defaults()["compile"]["regional"]}}
    _write_run(tmp_path / "a", [_stack("fuse_qkv", 1.1, 100.0, 10),
                                _stack("compile", 1.4, 48.0, 12, options=compile_opts)])
    _write_run(tmp_path / "b", [_stack("torchao_fp8+compile", 1.8, 36.0, 20),
                                _stack("taylorseer", 2.5, 19.0, 10),
                                _stack("trt_fp8", None, None, 0, status="skipped")])
    return tmp_path


def _runs(root):
    return [read_record(p) for p in sorted(root.rglob("result.json"))]


@pytest.mark.parametrize(("limits", "winner"), [
    ({}, "torchao_fp8+compile"),                     # the failed-gate 2.5x is never picked
    ({"min_psnr": 36.0}, "torchao_fp8+compile"),     # at the boundary: allowed
    ({"min_psnr": 36.01}, "compile"),
    ({"max_memory_gib": 19.99}, "compile"),
    ({"max_memory_gib": 12.0}, "compile"),           # at the boundary: allowed
    ({"min_psnr": 49.0, "max_memory_gib": 11.0}, "fuse_qkv"),
    ({"min_psnr": 101.0}, None),
])
def test_best_respects_gate_and_limits(sweep, limits, winner):
    pick, passed_over = best(_runs(sweep), Limits(**limits), option_defaults())
    assert (pick.name if pick else None) == winner
    reasons = dict(passed_over)
    assert reasons["taylorseer"].startswith("failed: fidelity: psnr 19") and reasons["trt_fp8"].startswith("skipped")
    assert len(passed_over) + (pick is not None) == 5


def test_reproducing_command_and_python_name_only_changed_options(sweep):
    pick, _ = best(_runs(sweep), Limits(min_psnr=40), option_defaults())
    regional = str(not option_defaults()["compile"]["regional"]).lower()
    assert pick.command() == f"python -m fluxopt +backend=compile backend.compile.regional={regional} " \
                             "model=flux-mini bench.iterations=5"
    assert f"fluxopt.apply_stack(pipe, {{'compile': {{'regional': {regional.capitalize()}}}}}, height=256, width=256, " \
           "steps=8, guidance_scale=3.5, max_sequence_length=64)" in pick.python()


def test_report_best_prints_command_and_snippet_and_exit_status(sweep, capsys):
    with pytest.raises(SystemExit) as done:
        report_cli.main([str(sweep), "--best", "--max-memory-gib", "15"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith("best: compile, 1.40x, PSNR 48.0 dB, peak 12.0 GiB")
    assert "python -m fluxopt +backend=compile" in out and "fluxopt.apply_stack(pipe" in out
    assert "torchao_fp8+compile: peak memory 20.00 GiB > max_memory_gib 15.0" in out
    with pytest.raises(SystemExit) as done:
        report_cli.main([str(sweep), "--best", "--min-psnr", "200"])
    assert done.value.code == 1 and "no stack" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        report_cli.main([str(sweep), "--best", "--min-psnr", "nan"])
    assert done.value.code == 2 and "--min-psnr=nan is not allowed" in capsys.readouterr().err


def test_apply_stack_from_a_result_file(tmp_path):
    path = _write_run(tmp_path / "run", [_stack("fuse_qkv", 1.2, 100.0, 1)])
    pipe = fluxopt.load_model("tiny", device="cpu")
    attn = pipe.transformer.transformer_blocks[0].attn
    assert not getattr(attn, "fused_projections", False)
    with fluxopt.apply_stack(pipe, path.parent, stack="fuse_qkv", height=64, width=64, steps=2):
        assert attn.fused_projections  # the recorded stack, really applied
    assert not getattr(attn, "fused_projections", False)
    with pytest.raises(ConfigError, match=r"stack='compile' is not in .*stacks there: fuse_qkv"):
        fluxopt.apply_stack(pipe, path, stack="compile")
    with pytest.raises(ConfigError, match="needs stack="):
        fluxopt.apply_stack(pipe, path)


@pytest.mark.parametrize(("stack", "limits", "reason"), [
    (_stack("a", None, None, 1, status="failed"), {}, "failed: None"),
    (_stack("a", None, None, 1), {}, "no speedup measured"),
    (records.stack("a", 1.5, 40, 1, partial="stop_after=onnx"), {}, "a partial build (stop_after=onnx)"),
    (_stack("a", 1.5, None, 1), {"min_psnr": 30}, "PSNR None dB < min_psnr 30"),
    (_stack("a", 1.5, 29.504, 1), {"min_psnr": 30}, "PSNR 29.50 dB < min_psnr 30"),
    (_stack("a", 1.5, 40, None), {"max_memory_gib": 10}, "peak memory unknown > max_memory_gib 10"),
    (_stack("a", 1.5, 40, 10.5), {"max_memory_gib": 10}, "peak memory 10.50 GiB > max_memory_gib 10"),
    (_stack("a", 1.5, 40, 10), {"min_psnr": 40, "max_memory_gib": 10}, None),
])
def test_ineligible_says_why_in_words(stack, limits, reason):
    from fluxopt.selection import ineligible

    assert ineligible(stack, Limits(**limits)) == reason


def test_command_lists_one_or_several_backends_and_drops_stack_and_hydra_overrides():
    from fluxopt.selection import Pick

    run = records.run([], shapes={}, overrides=[
        "+backend=[a,b]", "~search.min_psnr", "hydra.run.dir=x", "backend.compile.mode=default", "bench.steps=4"])
    single = Pick(records.stack("fuse_qkv", 1.2), run)
    assert single.command() == "python -m fluxopt +backend=fuse_qkv model=flux-mini bench.steps=4"
    double = Pick(records.stack("torchao_fp8+compile", 1.2), run)
    assert double.command().startswith("python -m fluxopt '+backend=[torchao_fp8,compile]' model=flux-mini")
    assert double.python().splitlines()[1] == "applied = fluxopt.apply_stack(pipe, {'torchao_fp8': {}, 'compile': {}})"


@pytest.mark.parametrize(("limits", "message"), [
    ({"min_psnr": 0}, "search.min_psnr=0 is not allowed: a finite number > 0 (dB)"),
    ({"max_memory_gib": -1}, "search.max_memory_gib=-1 is not allowed: a finite number > 0 (GiB)"),
    ({"max_memory_gib": float("inf")}, "search.max_memory_gib=inf"),
    ({"min_psnr": True}, "search.min_psnr=True"),
    ({"min_psnr": "30"}, "search.min_psnr='30'"),
    ({"min_psnr": 30, "max_memory_gib": 0}, "search.max_memory_gib=0"),  # the second is checked too
    ({"max_memory_gib": 0, "setting_prefix": "--"}, "--max-memory-gib=0 is not allowed"),
])
def test_bad_limits_name_the_setting_and_what_is_allowed(limits, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        Limits(**limits)
