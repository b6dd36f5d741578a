"""Scale-out engines run for real on the CPU: a local Ray instance and submitit's
local executor each run a 3-job sweep in which one job's process is killed; the Optuna search
sweeper finds a stack under limits. Plus the preflight checks on the engines' settings."""

from __future__ import annotations

import json
import os
from pathlib import Path

import _records as records
import pytest
from conftest import read_result, run_cli
from hydra.core.utils import JobReturn, JobStatus

from fluxopt.scale import launchers as engines
from fluxopt.scale import search
from fluxopt.cli import preflight
from fluxopt.errors import ConfigError
from fluxopt.record import write_record
from fluxopt.selection import Limits

ALLOW_CRASH = {"FLUXOPT_TEST_ALLOW_CRASH": "1"}  # the fault plugin's fault_crash backend runs only with it
CRASH_SWEEP = ("-m", "+backend=fuse_qkv,fault_crash", "bench.iterations=1", "save_images=false")


def _check_crash_sweep(proc, sweep_dir: Path, engine: str) -> list[dict]:
    assert proc.returncode == 1, proc.stderr[-3000:]  # one job died: the verdict is negative
    assert "fault_crash" in proc.stderr and "the job's process died" in proc.stderr
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert summary["runs"] == 2 and not summary["passed"]
    assert [f for f in summary["failures"] if "fault_crash" in f] == summary["failures"]
    by_stack = {}
    for run in sweep_dir.glob("*/result.json"):
        data = read_result(run.parent)
        by_stack[data["requested"][0]] = data
    assert set(by_stack) == {"fuse_qkv", "fault_crash"}
    crashed = by_stack.pop("fault_crash")
    assert crashed["complete"] is False and crashed["job_crash"]
    records = []
    for name, data in by_stack.items():  # the other finished and passed, in a process the engine started
        assert data["complete"] and data["stacks"][0]["status"] == "ok", name
        scheduler = data["environment"]["scheduler"]
        assert scheduler["engine"] == engine and scheduler["pid"] != os.getpid(), scheduler
        records.append(scheduler)
    assert "the job's process died during fault_crash (" in (sweep_dir / "summary.md").read_text()
    return records


@pytest.mark.slow
def test_ray_sweep_records_a_crashed_job_and_finishes_the_others(tmp_path, plugin_env):
    sweep_dir = tmp_path / "ray"
    proc = run_cli(*CRASH_SWEEP, "hydra/launcher=fluxopt_ray", "hydra.launcher.ray.remote.num_gpus=0",
                   f"hydra.sweep.dir={sweep_dir}", env={**plugin_env, **ALLOW_CRASH})
    for record in _check_crash_sweep(proc, sweep_dir, "ray"):
        assert record["node_id"] and record["node_ip"] and record["task_id"]
        assert record["resources"] == {"CPU": 1.0}  # what the job asked Ray for (num_cpus=1, num_gpus=0)


@pytest.mark.slow
def test_submitit_local_sweep_records_a_crashed_job_and_finishes_the_others(tmp_path, plugin_env):
    sweep_dir = tmp_path / "submitit"
    proc = run_cli(*CRASH_SWEEP, "hydra/launcher=fluxopt_submitit_local", "hydra.launcher.gpus_per_node=0",
                   "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={sweep_dir}", env={**plugin_env, **ALLOW_CRASH})
    records = _check_crash_sweep(proc, sweep_dir, "submitit-local")
    assert all(r["job_id"] for r in records)
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's job folders: pickled task, logs, results


@pytest.mark.slow
def test_search_finds_a_stack_under_limits_and_keeps_every_trial(tmp_path, plugin_env):
    sweep_dir = tmp_path / "search"
    proc = run_cli("-m", "hydra/sweeper=fluxopt_search", "hydra.sweeper.n_trials=6",
                   "search.backends=[fuse_qkv,fbcache,taylorseer,fault_degrade]", "search.min_psnr=25",
                   "bench.iterations=1", "save_images=false", f"hydra.sweep.dir={sweep_dir}", env=plugin_env)
    log = json.loads((sweep_dir / "search.json").read_text())
    trials = log["trials"]
    assert len(trials) == 6  # six runnable trials: refused proposals are not counted
    assert sorted(t["number"] for t in trials + log["refused"]) == list(range(len(trials) + len(log["refused"])))
    for t in log["refused"]:  # nothing launched; never two step caches (one choice of the space)
        assert t["stack"] == "(empty)" and t["job"] is None and t["reason"]
    for t in trials:
        assert not ("fbcache" in t["stack"] and "taylorseer" in t["stack"])
        if "fault_degrade" in t["stack"]:  # finite but wrong output: below min_psnr and its gate
            assert t["state"] in ("infeasible", "repeat") and t["value"] is None and t["reason"]
        else:
            assert t["state"] in ("complete", "infeasible", "repeat") and t["job"] is not None
    launched = {t["job"] for t in trials if t["job"] is not None}
    assert len(list(sweep_dir.glob("*/result.json"))) == len(launched)  # repeats and refusals measured nothing
    best = log["best"]
    if best is None:  # every trial this seed drew was infeasible: the verdict says so
        assert proc.returncode == 1 and "no trial met" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    top = max((t for t in trials if t["state"] == "complete"), key=lambda t: t["value"])
    assert best["stack"] == top["stack"] and "fault_degrade" not in best["stack"]
    assert best["command"] in proc.stdout and best["command"] in (sweep_dir / "summary.md").read_text()
    assert best["command"].startswith("python -m fluxopt ") and "model=tiny" in best["command"]


# ---- the search's own logic, without Optuna ----------------------------------------------------
class _RecordingLauncher:
    """Each job leaves an honest record in a directory of its own, as a real launcher's job does."""

    def __init__(self, root, speedup: float = 1.5, psnr: float = 40.0) -> None:
        self.batches: list[list[list[str]]] = []
        self.root, self.speedup, self.psnr = root, speedup, psnr

    def launch(self, job_overrides, initial_job_idx):
        self.batches.append([list(o) for o in job_overrides])
        returns = []
        for i, overrides in enumerate(job_overrides, start=initial_job_idx):
            stack = overrides[0].split("=", 1)[1].strip("[]").replace(",", "+")
            directory = self.root / f"job{i}"
            write_record(directory / "result.json",
                         records.run([records.stack(stack, self.speedup, self.psnr, 2.0)], mode="stack"))
            ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED, working_dir=str(directory))
            returns.append(ret)
        return returns


def _log(tmp_path, **limits):
    return search.SearchLog(tmp_path, Limits(**limits), ["fuse_qkv", "fbcache", "taylorseer"])


def test_search_launcher_refuses_incompatible_and_empty_stacks_without_launching_or_counting_them(tmp_path):
    inner = _RecordingLauncher(tmp_path)
    launcher = search.SearchLauncher(inner, _log(tmp_path), trials=1)
    batch = [("stack.fbcache=True", "stack.taylorseer=True", "model=tiny"),
             ("stack.fbcache=False", "stack.taylorseer=False", "model=tiny"),
             ("stack.fuse_qkv=True", "stack.fbcache=True", "backend.fbcache.residual_diff_threshold=0.2",
              "backend.taylorseer.cache_interval=3", "model=tiny")]
    returns = launcher.launch(batch, initial_job_idx=0)
    assert len(returns) == 3 and len(inner.batches) == 1
    assert inner.batches[0] == [["+backend=[fuse_qkv,fbcache]", "backend.fbcache.residual_diff_threshold=0.2", "model=tiny"]]
    with pytest.raises(search.InfeasibleTrial, match="cannot be combined"):
        returns[0].return_value
    with pytest.raises(search.InfeasibleTrial, match="no backend chosen"):
        returns[1].return_value
    assert returns[2].return_value == 1.5
    assert [t.state for t in launcher.log.trials] == ["complete"]
    assert [t.state for t in launcher.log.refused] == ["refused", "refused"]
    assert json.loads((tmp_path / "search.json").read_text())["best"]["stack"] == "fuse_qkv+fbcache"
    with pytest.raises(search.SearchComplete):  # the one trial asked for is judged
        launcher.launch([("stack.fuse_qkv=True", "model=tiny")], initial_job_idx=1)


def test_a_batch_runs_no_more_trials_than_are_left(tmp_path):
    inner = _RecordingLauncher(tmp_path)
    launcher = search.SearchLauncher(inner, _log(tmp_path), trials=1)
    returns = launcher.launch([("stack.fuse_qkv=True",), ("stack.fbcache=True",)], initial_job_idx=0)
    assert [len(b) for b in inner.batches] == [1] and len(launcher.log.trials) == 1
    assert returns[0].return_value == 1.5
    with pytest.raises(search.InfeasibleTrial, match="had its 1 trial"):
        returns[1].return_value


def test_the_space_is_one_choice_per_set_of_backends_that_cannot_share_a_stack(tmp_path):
    space = search.search_space(["fuse_qkv", "fbcache", "taylorseer", "torchao_int8", "torchao_int8_dynamic",
                                 "compile", "aoti"])
    assert space["stack.fuse_qkv"] == "choice(false,true)"
    assert space["stack.step-cache"] == "choice(none,fbcache,taylorseer)"
    assert space["stack.quantization"] == "choice(none,torchao_int8,torchao_int8_dynamic)"
    assert space["stack.aoti_or_compile"] == "choice(none,compile,aoti)"  # a graph mode: one at a time
    assert len(space) == 4
    proposal = search.propose(0, ["stack.fuse_qkv=true", "stack.step-cache=fbcache", "stack.quantization=none",
                                  "stack.aoti_or_compile=compile"])
    assert proposal.refused is None and sorted(proposal.stack) == ["compile", "fbcache", "fuse_qkv"]


def test_search_launcher_measures_a_repeated_stack_once(tmp_path):
    inner = _RecordingLauncher(tmp_path)
    launcher = search.SearchLauncher(inner, _log(tmp_path), trials=3)
    same = ("stack.fuse_qkv=True", "stack.fbcache=False", "backend.fbcache.residual_diff_threshold=0.3")  # option of an unused backend
    launcher.launch([same, ("stack.fuse_qkv=True", "stack.fbcache=False")], initial_job_idx=0)
    launcher.launch([same], initial_job_idx=2)
    assert sum(len(b) for b in inner.batches) == 1
    assert [t.state for t in launcher.log.trials] == ["complete", "repeat", "repeat"]
    assert {t.job for t in launcher.log.trials} == {0}


@pytest.mark.parametrize(("limits", "why"), [({"min_psnr": 41.0}, "PSNR 40.00 dB < min_psnr 41.0"),
                                             ({"max_memory_gib": 1.5}, "peak memory 2.00 GiB > max_memory_gib 1.5"),
                                             ({"min_psnr": 40.0, "max_memory_gib": 2.0}, None)])
def test_search_limits_make_a_trial_infeasible_at_the_boundary(tmp_path, limits, why):
    launcher = search.SearchLauncher(_RecordingLauncher(tmp_path), _log(tmp_path, **limits), trials=1)
    ret = launcher.launch([("stack.fuse_qkv=True",)], initial_job_idx=0)[0]
    if why is None:
        assert ret.return_value == 1.5
    else:
        with pytest.raises(search.InfeasibleTrial, match=why.replace(".", r"\.")):
            ret.return_value


def test_search_scores_a_crashed_job_as_infeasible():
    assert search.score(records.run([], job_crash="WorkerCrashedError: killed"), Limits()) == \
        (None, "the job's process died: WorkerCrashedError: killed")
    assert search.score(None, Limits())[0] is None


# ---- preflight ------------------------------------------------------------------------------
@pytest.mark.parametrize(("argv", "message"), [
    (["-m", "hydra/launcher=fluxopt_ray", "+backend=fuse_qkv", "hydra.launcher.ray.remote.num_gpus=1"],
     "hydra.launcher.ray.remote.num_gpus=1, but this machine has 0"),
    (["-m", "hydra/launcher=fluxopt_submitit_local", "+backend=fuse_qkv", "hydra.launcher.gpus_per_node=1"],
     "hydra.launcher.gpus_per_node=1"),
    (["hydra/sweeper=fluxopt_search"], "runs a sweep: add -m"),
    (["-m", "hydra/sweeper=fluxopt_search", "+backend=compile"], "the search chooses the stacks"),
    (["-m", "hydra/sweeper=fluxopt_search", "search.min_psnr=-3"], "search.min_psnr=-3.0 is not allowed"),
    (["-m", "hydra/sweeper=fluxopt_search", "search.backends=[fbcahce]"], "search.backends: unknown backend 'fbcahce'"),
    (["-m", "hydra/sweeper=fluxopt_search", "search.backends=[]"], "search.backends is empty"),
])
def test_engine_settings_are_refused_before_anything_runs(argv, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(".", r"\.")):
        preflight(argv)


def test_search_options_of_unselected_backends_are_accepted():
    preflight(["-m", "hydra/sweeper=fluxopt_search", "search.backends=[fuse_qkv,fbcache]",
               "backend.fbcache.residual_diff_threshold=interval(0.05,0.3)"])


def test_missing_engine_plugin_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"hydra/launcher=fluxopt_ray needs .*pip install 'fluxopt\[ray\]'"):
        engines.check_installed("hydra/launcher", "fluxopt_ray")
    with pytest.raises(ConfigError, match=r"hydra/sweeper=fluxopt_search needs .*fluxopt\[search\]"):
        engines.check_installed("hydra/sweeper", "fluxopt_search")


def test_slurm_and_local_submitit_configs_differ_only_in_the_executor():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from fluxopt.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="fluxopt.conf", version_base="1.3"):
            configs = {name: OmegaConf.to_container(compose("config", [f"hydra/launcher={name}"],
                                                            return_hydra_config=True).hydra.launcher)
                       for name in ("fluxopt_slurm", "fluxopt_submitit_local")}
    finally:
        GlobalHydra.instance().clear()
    slurm, local = configs["fluxopt_slurm"], configs["fluxopt_submitit_local"]
    assert slurm.pop("_target_").endswith("FluxoptSlurmLauncher")
    assert local.pop("_target_").endswith("FluxoptSubmititLocalLauncher")
    # shared settings, same values; a local job's GPUs follow this machine (a cluster's do not)
    assert {k: v for k, v in slurm.items() if k in local and k != "gpus_per_node"} == \
        {k: v for k, v in local.items() if k != "gpus_per_node"}
    assert slurm["gpus_per_node"] == 1 and local["timeout_min"] == 60
    assert local["gpus_per_node"] == "${fluxopt_gpus_per_local_job:}" and engines.gpus_per_local_job() == 0


def test_local_launchers_ask_for_no_gpu_on_a_cpu_machine_and_one_per_job_where_there_are_gpus(monkeypatch):
    assert preflight(["-m", "hydra/launcher=fluxopt_ray", "+backend=fuse_qkv"])
    assert preflight(["-m", "hydra/launcher=fluxopt_submitit_local", "+backend=fuse_qkv"])
    monkeypatch.setattr(engines, "local_gpus", lambda: 4)
    assert engines.gpus_per_local_job() == 1
