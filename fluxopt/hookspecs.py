"""Every hook a fluxopt plugin can implement.

Registration hooks return lists of specs; each list from each plugin is merged by
``fluxopt.plugins``, which refuses two specs of the same name.  Event hooks let
reporters (CSV, MLflow, W&B writers...) follow a run without touching the runner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from fluxopt.backend import Backend
    from fluxopt.fidelity import Metric
    from fluxopt.models import ModelSpec
    from fluxopt.result import StackResult

hookspec = pluggy.HookspecMarker("fluxopt")
hookimpl = pluggy.HookimplMarker("fluxopt")


@hookspec
def fluxopt_backends() -> list[Backend]:
    """Return the optimization backends this plugin provides."""


@hookspec
def fluxopt_models() -> list[ModelSpec]:
    """Return the model specs (how to obtain a FluxPipeline) this plugin provides."""


@hookspec
def fluxopt_metrics() -> list[Metric]:
    """Return fidelity metrics (image or latent comparisons against the baseline)."""


@hookspec
def fluxopt_config_path() -> str | None:
    """Return a Hydra search-path entry (e.g. ``pkg://my_plugin.conf``) holding this
    plugin's configs, such as ``backend/<name>.yaml``, so ``+backend=<name>`` works
    after ``pip install`` without copying files."""


@hookspec
def fluxopt_run_started(config: dict[str, Any], output_dir: str) -> None:
    """Called once a run's config is validated, before any model is loaded."""


@hookspec
def fluxopt_stack_finished(result: StackResult, output_dir: str) -> None:
    """Called after each stack is measured (or failed, or was skipped)."""


@hookspec
def fluxopt_run_finished(result: dict[str, Any], output_dir: str) -> None:
    """Called with the complete ``result.json`` content after it is written."""
