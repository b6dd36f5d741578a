"""``hydra/sweeper=fluxopt_search``: hydra-optuna-sweeper searching fluxopt stacks. Optuna
proposes; :class:`fluxopt.scale.search.SearchLauncher` turns proposals into runs (refusing incompatible
ones before any model loads) and scores them; the winner is printed as a command line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.types import HydraContext, TaskFunction
from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
from omegaconf import DictConfig, OmegaConf

from fluxopt.scale.search import (PROPOSALS_PER_TRIAL, SearchComplete, SearchLauncher, SearchLog, backends_from,
                                  limits_from, search_space)


class FluxoptSearchSweeper(OptunaSweeper):
    """Optuna's sweeper with fluxopt's search space (a choice per set of backends of
    ``search.backends`` that cannot share a stack, a yes/no for each other), objective (speedup
    under ``search.min_psnr`` / ``search.max_memory_gib``), trial count (``n_trials`` runnable
    trials; refused proposals are not counted) and trial log."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        backends = backends_from(config)
        self.log = SearchLog(Path(str(config.hydra.sweep.dir)), limits_from(config), backends)
        params = OmegaConf.to_container(self.sweeper.params or OmegaConf.create({}))
        self.sweeper.params = OmegaConf.create({**search_space(backends), **params})
        self.sweeper.launcher = SearchLauncher(self.sweeper.launcher, self.log, trials=self.sweeper.n_trials)
        self.sweeper.n_trials *= PROPOSALS_PER_TRIAL  # Optuna's count: proposals, refused ones included

    def sweep(self, arguments: list[str]) -> Any:
        self.log.sweep_dir.mkdir(parents=True, exist_ok=True)
        try:
            return super().sweep(arguments)
        except SearchComplete:
            return None
        except ValueError:
            if self.log.best() is not None:
                raise
            # Optuna's summary asks for the best trial and there is none: the summary says so.
            return None
        finally:
            self.log.write()
            pick = self.log.winner()
            if pick is None:
                print("fluxopt search: no trial met the fidelity gate and the limits "
                      f"(see {self.log.sweep_dir / 'search.json'})")
            else:
                print(f"fluxopt search: best stack {pick.name}, {pick.stack.speedup:.2f}x over "
                      f"{len(self.log.trials)} trial(s); measure it again with:\n  {pick.command()}")
