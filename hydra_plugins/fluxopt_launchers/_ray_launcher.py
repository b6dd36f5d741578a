"""``hydra/launcher=fluxopt_ray``: every sweep job is a Ray task that asks Ray for its GPUs
(``hydra.launcher.ray.remote.num_gpus``), on a local Ray instance or an existing cluster
(``hydra.launcher.ray.init.address``). Ray sets each task's ``CUDA_VISIBLE_DEVICES``, so
fluxopt's GPU pool stays off. Built on hydra-ray-launcher; fluxopt adds the crash record."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra_plugins.hydra_ray_launcher.ray_launcher import RayLauncher
from omegaconf import open_dict

from ._jobs import carry_invocation, crashed_job, log


class FluxoptRayLauncher(RayLauncher):
    """hydra-ray-launcher's ``ray`` launcher, except that a task that fails (its worker killed,
    its node lost) is recorded and the other jobs finish."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray
        from hydra_plugins.hydra_ray_launcher._launcher_util import launch_job_on_ray, start_ray

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        carry_invocation(self.config)
        start_ray(self.ray_cfg.init)
        log.info("Ray: %s job(s) on %s", len(job_overrides), ray.get_runtime_context().gcs_address)
        submitted = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info("\t#%s : %s", idx, " ".join(filter_overrides(overrides)))
            job_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(job_config):
                job_config.hydra.job.id = f"ray_job_{idx}"
                job_config.hydra.job.num = idx
            ref = launch_job_on_ray(self.hydra_context, self.ray_cfg.remote, job_config, self.task_function,
                                    Singleton.get_state())
            submitted.append((job_config, overrides, ref))
        returns = []
        for job_config, overrides, ref in submitted:
            try:
                returns.append(ray.get(ref))
            except ray.exceptions.RayError as exc:
                returns.append(crashed_job(job_config, overrides, exc))
        return returns
