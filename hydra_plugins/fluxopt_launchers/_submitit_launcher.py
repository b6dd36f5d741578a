"""``hydra/launcher=fluxopt_submitit_local`` and ``fluxopt_slurm``: one submitit job per sweep job
(pickled task, job folders, results collected from files), on this machine or on SLURM. The two
differ only in submitit's executor. Built on hydra-submitit-launcher; fluxopt adds the crash record."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

from ._jobs import carry_invocation, crashed_job, log

# Launcher parameters that configure the executor itself rather than each job's resources.
_EXECUTOR_KEYS = {"submitit_folder", "max_num_timeout"}


class _TolerantSubmititLauncher(BaseSubmititLauncher):
    """hydra-submitit-launcher, except that a job that dies (killed, timed out, failed to
    unpickle) is recorded and the other jobs' results are still collected."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None and self.hydra_context is not None
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         **({f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]}
                                            if "max_num_timeout" in self.params else {}))
        shared = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{key if key in shared else f"{self._EXECUTOR}_{key}": value
                                      for key, value in self.params.items() if key not in _EXECUTOR_KEYS})
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        carry_invocation(self.config)
        indices = range(initial_job_idx, initial_job_idx + len(job_overrides))
        for idx, overrides in zip(indices, job_overrides, strict=True):
            log.info("\t#%s : %s", idx, " ".join(filter_overrides(overrides)))
        jobs = executor.map_array(self, [list(o) for o in job_overrides], ["hydra.sweep.dir"] * len(job_overrides),
                                  list(indices), [f"job_id_for_{i}" for i in indices],
                                  [Singleton.get_state()] * len(job_overrides))
        returns = []
        for idx, overrides, job in zip(indices, job_overrides, jobs, strict=True):
            try:
                returns.append(job.results()[0])
            except (submitit.core.utils.UncompletedJobError, submitit.core.utils.FailedJobError) as exc:
                job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                job_config.hydra.job.num = idx
                returns.append(crashed_job(job_config, overrides, exc))
        return returns


class FluxoptSubmititLocalLauncher(_TolerantSubmititLauncher):
    _EXECUTOR = "local"


class FluxoptSlurmLauncher(_TolerantSubmititLauncher):
    _EXECUTOR = "slurm"
