"""``python -m fluxopt`` end to end, as a user runs it, on the embedded tiny model (CPU)."""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import pytest
from conftest import read_result, run_cli

from fluxopt.measure import PROTOCOL
from fluxopt.record import SCHEMA_VERSION
import _records as records

COMPILE_ARGS = ("+backend=compile", "backend.compile.mode=max-autotune-no-cudagraphs",
                "backend.compile.regional=true", "bench.steps=4", "bench.height=64")


@pytest.fixture(scope="module")
def compile_run(tmp_path_factory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("compile-run")
    proc = run_cli(*COMPILE_ARGS, f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout


@pytest.mark.xdist_group("compile_run")  # one worker runs the shared fixture once
def test_compile_run_reports_everything_and_passes_lossless_fidelity(compile_run):
    run_dir, stdout = compile_run
    data = read_result(run_dir)
    base, (stack,) = data["baseline"], data["stacks"]
    assert stack["stack"] == "compile" and stack["status"] == "ok", stack
    assert stack["options"]["compile"]["regional"] is True
    assert stack["options"]["compile"]["mode"] == "max-autotune-no-cudagraphs"
    for result in (base, stack):
        lat = result["latency"]
        assert lat["n"] == 3 and len(lat["samples"]) == 3
        assert 0 < lat["min"] <= lat["median"] <= lat["p90"] <= lat["max"]
        assert result["first_call_s"] > 0 and result["peak_memory_bytes"] > 0
        assert result["step_latency"]["median"] > 0
    assert stack["build_s"] > 0 and stack["build_phases_s"]["compile"] > 0
    assert math.isclose(stack["speedup"], base["latency"]["median"] / stack["latency"]["median"])
    fid = stack["fidelity"]
    assert fid["passed"] is True and stack["lossless"] is True
    assert fid["metrics"]["psnr"]["threshold"] == 30.0
    assert fid["metrics"]["latent_rel_l2"]["worst"] < 0.05
    assert "compile" in stdout and "speedup" in stdout


@pytest.mark.xdist_group("compile_run")  # one worker runs the shared fixture once
def test_result_json_schema_and_run_directory(compile_run):
    run_dir, _ = compile_run
    data = read_result(run_dir)
    assert data["schema_version"] == SCHEMA_VERSION and data["complete"] is True and data["protocol"] == PROTOCOL
    assert data["mode"] == "stack"
    assert data["shapes"] == {"height": 64, "width": 64, "steps": 4, "guidance_scale": 3.5,
                              "max_sequence_length": 128, "batch_size": 1}
    assert data["config"]["backend"]["compile"]["regional"] is True
    # when the command's process began, before the imports and config that precede the record's start
    began, started, finished = (datetime.fromisoformat(t) for t in (data["provenance"]["process_started"],
                                                                    data["started"], data["finished"]))
    assert began <= started <= finished
    env = data["environment"]
    for key in ("python", "hostname", "cpu", "packages", "git", "device"):
        assert key in env
    assert env["packages"]["torch"] and env["packages"]["diffusers"]
    assert (run_dir / "report.md").read_text().startswith("# fluxopt run")
    assert (run_dir / ".hydra" / "config.yaml").exists()
    for image in data["baseline"]["images"] + data["stacks"][0]["images"]:
        assert (run_dir / image).stat().st_size > 0


def test_unknown_backend_fails_before_loading_with_known_list(tmp_path):
    proc = run_cli("+backend=compil", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    assert "unknown backend 'compil'" in proc.stderr and "Did you mean 'compile'" in proc.stderr
    assert "Known backends:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing ran


def test_misspelt_option_lists_valid_options(tmp_path):
    proc = run_cli("+backend=compile", "backend.compile.mdoe=max-autotune", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "no option 'mdoe'" in proc.stderr and "Did you mean 'mode'" in proc.stderr
    assert "regional: bool = True" in proc.stderr


def test_wrong_option_type_fails_at_start(tmp_path):
    proc = run_cli("+backend=compile", "backend.compile.regional=sometimes", f"hydra.run.dir={tmp_path / 'r'}")
    assert proc.returncode != 0
    assert "regional" in proc.stderr and "bool" in proc.stderr.lower()
    assert not (tmp_path / "r" / "result.json").exists()


def test_unknown_model_lists_known_models(tmp_path):
    proc = run_cli("model=flux-pro", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert "model='flux-pro' is not a known model" in proc.stderr and "flux-dev-random" in proc.stderr


def test_model_without_network_gives_actionable_error(tmp_path):
    proc = run_cli("model=flux-dev", "+backend=compile", f"hydra.run.dir={tmp_path}",
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    assert "could not load model 'flux-dev'" in proc.stderr and "model.path=" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_table_keeps_bracketed_install_hints(tmp_path):
    import io

    from rich.console import Console

    from fluxopt.report.tables import print_table

    data = records.run([records.stack("x", None, status="skipped",
                                      reason="needs 'tensorrt' (pip install 'fluxopt[tensorrt]')")], model="tiny")
    out = io.StringIO()
    print_table(data, Console(file=out, width=400))
    assert "fluxopt[tensorrt]" in out.getvalue()


def test_gpu_only_backend_on_cpu_says_so_before_loading(tmp_path):
    proc = run_cli("+backend=torchao_fp8", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 1  # refused on this machine: a failed request, not a usage error
    assert "stack 'torchao_fp8' cannot run here: torchao_fp8 needs an NVIDIA GPU with CUDA" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "result.json").exists()


def test_console_table_fits_120_columns_and_ends_with_the_verdict(tmp_path):
    import io

    from rich.console import Console

    from fluxopt.report.tables import print_table, verdict_sentence

    stacks = [records.stack(name, speedup) for name, speedup in (("torchao_fp8+compile", 1.8), ("compile", 1.35))]
    stacks.append(records.stack("aoti", None, status="failed",
                                reason="AotiLoadError: aoti: a process loading the AOTInductor package was killed by "
                                       "SIGSEGV " * 2))
    data = records.run(stacks, model="flux-dev-random", environment={"device": {"name": "H100"}})
    data.model["trained"] = False
    out = io.StringIO()
    print_table(data, Console(file=out, width=250))
    assert max(len(line) for line in out.getvalue().splitlines()) <= 120
    sentence = verdict_sentence(data, tmp_path)
    assert sentence.startswith("Fastest stack that passed: torchao_fp8+compile, 1.80x end to end")
    assert str(tmp_path / "report.md") in sentence


@pytest.mark.parametrize(("trained", "speedups"), [(False, (1.8,)), (False, (0.9,)), (False, ()), (True, (1.8,))])
def test_verdict_explains_random_weights_whatever_the_outcome(tmp_path, trained, speedups):
    from fluxopt.report.tables import verdict_sentence

    data = records.run([records.stack(f"s{i}", s) for i, s in enumerate(speedups)], model="tiny")
    data.model["trained"] = trained
    sentence = verdict_sentence(data, tmp_path)
    assert ("tiny is a small model with random weights: its speedups say little" in sentence) is (not trained), sentence
    data.model["name"] = "flux-dev-random"
    assert ("random weights: the speedups hold" in verdict_sentence(data, tmp_path)) is (not trained)
    assert str(tmp_path / "images") in sentence
