"""Scale-out: parallel sweeps with a GPU pool (joblib launcher), SLURM launcher config,
and the multi-GPU ``context_parallel`` backend (validation and launch logic on CPU)."""

from __future__ import annotations

import os
import datetime as dt
import json
from pathlib import Path

import pytest
import torch
from conftest import read_result, run_cli

from fluxopt import environment
from fluxopt.scale import gpu_pool
from fluxopt.scale import torchrun as launch
from fluxopt.environment import detect_device
from fluxopt.errors import ConfigError

SWEEP = ("-m", "+backend=fuse_qkv,channels_last", "bench.iterations=1", "save_images=false")


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory):
    """The same two-job sweep with the joblib launcher (2 processes, GPU pool [0,1]) and sequentially."""
    parallel, sequential = tmp_path_factory.mktemp("joblib"), tmp_path_factory.mktemp("basic")
    proc = run_cli(*SWEEP, "hydra/launcher=fluxopt_joblib", f"hydra.sweep.dir={parallel}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    seq = run_cli(*SWEEP, f"hydra.sweep.dir={sequential}")
    assert seq.returncode == 0, seq.stderr[-4000:]
    return parallel, sequential, proc


def _runs(root: Path) -> dict[str, dict]:
    return {p.parent.name: read_result(p.parent) for p in root.glob("*/result.json")}


@pytest.mark.xdist_group("joblib_sweeps")  # one worker builds the shared fixture once
def test_joblib_sweep_pins_each_worker_to_a_pool_gpu(sweeps):
    parallel, _, _ = sweeps
    runs = _runs(parallel)
    assert len(runs) == 2
    by_pid = {}
    for data in runs.values():
        env = data["environment"]
        gpu = env["gpu_assignment"]
        assert gpu["pool"] == ["0", "1"] and gpu["cuda_visible_devices"] in ("0", "1")
        assert env["cuda_visible_devices"] == gpu["cuda_visible_devices"]  # set in the job's process
        assert gpu["cuda_initialized_before"] is False  # set before torch touched CUDA
        assert env["hostname"] == gpu["hostname"]
        by_pid.setdefault(gpu["pid"], set()).add(gpu["cuda_visible_devices"])
    assert all(len(devices) == 1 for devices in by_pid.values())  # a worker keeps one GPU
    if len(by_pid) == 2:  # two workers ran the two jobs: they hold different GPUs
        assert set.union(*by_pid.values()) == {"0", "1"}


@pytest.mark.xdist_group("joblib_sweeps")  # one worker builds the shared fixture once
def test_joblib_sweep_writes_summary_once_and_agrees_with_sequential(sweeps):
    parallel, sequential, proc = sweeps
    assert proc.stdout.count("sweep summary of 2 run(s)") == 1  # on_multirun_end, in the parent
    rows = json.loads((parallel / "summary.json").read_text())["rows"]
    seq_rows = json.loads((sequential / "summary.json").read_text())["rows"]

    def outcome(rs):
        return {r["stack"]: (r["status"], r["fidelity"]["passed"]) for r in rs}

    assert outcome(rows) == outcome(seq_rows) == {"fuse_qkv": ("ok", True), "channels_last": ("ok", True)}
    assert all(r["device"] and r["cuda_visible_devices"] in ("0", "1") for r in rows)
    assert " device |" in (parallel / "summary.md").read_text()


def test_gpu_pool_claims_distinct_slots_per_process(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_pool, "_claimed", {})
    for name in ("CUDA_VISIBLE_DEVICES", environment.GPU_ASSIGNMENT_ENV):  # assign() sets both in this process
        monkeypatch.setenv(name, "")  # recorded, so that what assign() sets is undone after the test
        monkeypatch.delenv(name)
    first = gpu_pool.assign(["0", "1"], 2, tmp_path)  # job 2 -> slot 0
    assert (first["slot"], first["cuda_visible_devices"]) == (0, "0")
    assert gpu_pool.assign(["0", "1"], 3, tmp_path)["slot"] == 0  # same process keeps its GPU
    held = gpu_pool._claimed["handle"]
    monkeypatch.setattr(gpu_pool, "_claimed", {})  # as another worker process would see it
    assert gpu_pool.claim_slot(["0", "1"], 0, tmp_path) == (1, True)  # slot 0 is held: next free
    monkeypatch.setattr(gpu_pool, "_claimed", {})
    assert gpu_pool.claim_slot(["0", "1"], 1, tmp_path) == (1, False)  # all held: shared, warned
    held.close()


# ---- context_parallel -------------------------------------------------------------------------

def _cp():
    from fluxopt.stack import lookup_backend

    return lookup_backend("context_parallel")


def test_context_parallel_options_are_validated():
    backend = _cp()
    opts = backend.options_class
    backend.validate_options(opts(world_size=2, mode="ring"))
    with pytest.raises(ConfigError, match="ulysses, ring"):
        backend.validate_options(opts(mode="tree"))
    with pytest.raises(ConfigError, match=">= 2"):
        backend.validate_options(opts(world_size=1))


def test_context_parallel_requirements_on_cpu():
    from fluxopt_plugins.context_parallel import _unmet_gpus

    backend = _cp()
    reason = backend.unmet_requirement(backend.options_class(), detect_device("cpu"))
    assert "needs an NVIDIA GPU" in reason
    assert _unmet_gpus(4, 2, {}) == "needs 4 NVIDIA GPUs (world_size=4); this machine has 2"
    assert "torchrun" in _unmet_gpus(2, 2, {})
    assert "WORLD_SIZE=4" in _unmet_gpus(2, 8, {"WORLD_SIZE": "4"})


def test_context_parallel_cli_on_cpu_is_refused_with_reason(tmp_path):
    proc = run_cli("+backend=context_parallel", f"hydra.run.dir={tmp_path}", timeout=180)
    assert proc.returncode == 1  # refused on this machine before loading: a failed request, not a usage error
    assert "context_parallel needs an NVIDIA GPU" in proc.stderr
    proc = run_cli("+backend=[context_parallel,offload]", f"hydra.run.dir={tmp_path}", timeout=180)
    assert proc.returncode == 2 and "cannot be combined" in proc.stderr


def test_processes_come_from_the_backends_of_the_requested_stacks():
    from fluxopt.cli import preflight, required_processes

    assert required_processes(preflight(["+backend=compile"])) == 1
    assert required_processes(preflight(["+backend=context_parallel"])) == 2  # its default world_size
    assert required_processes(preflight(
        ["-m", "+backend=[context_parallel,compile]", "backend.context_parallel.world_size=2,4"])) == 4
    assert required_processes(preflight([])) == 1  # a bake-off runs every backend alone, in one process


def test_torchrun_command_construction():
    now = dt.datetime(2025, 1, 2, 3, 4, 5)
    argv = ["+backend=context_parallel", "backend.context_parallel.world_size=4"]
    cmd, env = launch.torchrun_command(argv, 4, env={"PATH": "/bin", "NCCL_NVLS_ENABLE": "1"}, now=now,
                                            python="/py")
    assert cmd[:-1] == ["/py", "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m", "fluxopt",
                        *argv]
    assert cmd[-1].startswith(f"hydra.run.dir=outputs/2025-01-02/03-04-05-{os.getpid()}-")
    assert env["NCCL_NVLS_ENABLE"] == "0" and env["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    assert env["NVSHMEM_DISABLE_NVLS"] == "1" and env["PATH"] == "/bin" and env[launch.LAUNCHED_ENV] == "1"
    cmd, _ = launch.torchrun_command(["-m", *argv], 2, env={}, now=now, python="/py")
    assert cmd[-1].startswith(f"hydra.sweep.dir=multirun/2025-01-02/03-04-05-{os.getpid()}-")
    cmd, _ = launch.torchrun_command([*argv, "hydra.run.dir=/x"], 2, env={}, now=now, python="/py")
    assert cmd[-1] == "hydra.run.dir=/x"
    cmd, _ = launch.torchrun_command([*argv, "++hydra.run.dir=/y"], 2, env={}, now=now, python="/py")
    assert cmd[-1] == "++hydra.run.dir=/y"  # any spelling of a given directory is kept
    assert environment.in_torchrun(env) and not environment.in_torchrun({})


def test_only_rank_zero_writes_results(monkeypatch, tmp_path):
    assert environment.writes_results({})
    assert environment.writes_results({"RANK": "0", "LOCAL_RANK": "0"})
    assert not environment.writes_results({"RANK": "1", "LOCAL_RANK": "1"})
    from fluxopt.sweep import SweepFinishedCallback
    from omegaconf import OmegaConf

    monkeypatch.setenv("RANK", "1")
    SweepFinishedCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert not (tmp_path / "summary.json").exists()
    scratch = environment.scratch_dir(tmp_path / "job")
    assert not scratch.is_relative_to(tmp_path) and "rank1" in scratch.name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_context_parallel_two_gpus_tiny(tmp_path):
    for mode in ("ulysses", "ring"):
        out = tmp_path / mode
        proc = run_cli("+backend=context_parallel", "backend.context_parallel.world_size=2",
                       f"backend.context_parallel.mode={mode}", "bench.iterations=2", f"hydra.run.dir={out}")
        assert proc.returncode == 0, proc.stderr[-4000:]
        data = read_result(out)
        stack = data["stacks"][0]
        assert stack["status"] == "ok" and stack["fidelity"]["passed"], stack
        assert stack["stats"]["context_parallel"]["world_size"] == 2
        assert data["environment"]["distributed"]["world_size"] == 2
        assert data["environment"]["distributed"]["NCCL_NVLS_ENABLE"] == "0"
