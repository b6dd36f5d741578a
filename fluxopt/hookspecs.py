"""The contract between fluxopt and its plugins: every hook a plugin may implement.

Built-in features use exactly these hooks (``fluxopt_plugins/``), and so does a third-party package
that declares an entry point in the group ``fluxopt``::

    [project.entry-points.fluxopt]
    my_backend = "my_package.plugin"     # a module with @hookimpl functions

Registration hooks return lists of specs, merged by :mod:`fluxopt.plugins`, which refuses two
specs of one name (naming both distributions). Event hooks let reporters (CSV, MLflow, W&B
writers...) follow a run without touching the runner; their return values are ignored.

A function marked ``@hookimpl`` whose name is not one of these hooks is an error when the
plugin is registered (pluggy's ``check_pending``), so a misspelt hook never goes unnoticed.
The types named below live in ``fluxopt`` (``fluxopt.Backend``, ``fluxopt.ModelSpec``,
``fluxopt.Metric``, ``fluxopt.StackRecord``, ``fluxopt.RunRecord``, ``fluxopt.measure.Measured``);
this module imports them for type checking only, so that it stays the bottom of the import graph.

fluxopt's own accessories are plugins on these hooks too, registered before the built-in
backends: the report ring (``fluxopt.report``: report.md, the console table, the sweep summary),
the profile ring (``fluxopt.profile``: one profiled step per stack), the scale ring
(``fluxopt.scale``: the Hydra launchers and the search sweeper, torchrun, detached runs), the history ring (``fluxopt.history``: the results store
and the time estimate) and the model zoo (``fluxopt.zoo``: the built-in models).
A run's event hooks skip the plugins named in ``disabled_plugins`` (``disabled_plugins=[fluxopt.report]``
writes no report.md and prints no table), the way pytest's ``-p no:terminal`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from fluxopt.backend import Backend
    from fluxopt.fidelity import Metric
    from fluxopt.measure import Measured
    from fluxopt.models import ModelSpec
    from fluxopt.preset import Preset
    from fluxopt.record import RunRecord, StackRecord
    from fluxopt.shapes import Shapes

PROJECT = "fluxopt"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def fluxopt_backends() -> list[Backend]:
    """Return the optimization backends this plugin provides.

    Called once, when the plugin manager is first used (before any config is composed).

    :return: a list of :class:`fluxopt.Backend` instances. Each backend's ``options_class``
        (a dataclass) is registered in Hydra's ConfigStore as ``backend/<name>``, so
        ``+backend=<name>`` and ``backend.<name>.<option>=...`` work with no YAML file.
    """


@hookspec
def fluxopt_presets() -> list[Preset]:
    """Return presets: published recipes (stacks with their options) under one name.

    :return: a list of :class:`fluxopt.Preset` (``name``, ``description``, ``backends``: backend
        name -> options, ``source``, ``deviations``). Each is registered in Hydra's ConfigStore
        as ``backend/<name>``, so ``+backend=<name>`` selects its backends with its options,
        and ``apply_stack(pipe, "<name>")`` applies them. A preset may not share a name with a
        backend.
    """


@hookspec
def fluxopt_models() -> list[ModelSpec]:
    """Return the models (how to obtain a FluxPipeline) this plugin provides.

    :return: a list of :class:`fluxopt.ModelSpec`; each becomes selectable as ``model=<name>``.
    """


@hookspec
def fluxopt_metrics() -> list[Metric]:
    """Return fidelity metrics: comparisons of a stack's output with the baseline's output for
    the same prompt and seed.

    :return: a list of :class:`fluxopt.Metric`. ``Metric.compute(reference, candidate)`` takes
        two :class:`fluxopt.Sample` (``image``: H x W x 3 float32 in [0, 1]; ``latents``: the
        final packed latents, a float32 CPU tensor; ``prompt``; ``seed``) and returns a float.
        A metric gates the verdict when ``fidelity.lossless.<name>`` / ``fidelity.lossy.<name>``
        gives it a threshold; otherwise it is reported only. A metric that cannot run here
        (missing weights) raises :class:`fluxopt.UnavailableError`; its value is then
        reported as unavailable with that reason.
    """


@hookspec
def fluxopt_run_started(config: dict[str, Any], output_dir: str) -> None:
    """Called once a run's config is validated, before any model is loaded.

    :param config: the resolved run configuration (plain dict: ``model``, ``bench``,
        ``fidelity``, ``backend``...), as it will be written into ``result.json``.
    :param output_dir: the run's own output directory (``result.json``, images, logs).
    """


@hookspec
def fluxopt_stack_finished(result: StackRecord, output_dir: str) -> None:
    """Called after each stack is measured, failed or skipped, and after ``result.json`` was
    rewritten with it.

    :param result: the :class:`fluxopt.StackRecord` (``stack``, ``status`` ok|failed|skipped,
        ``reason``, ``phase``, ``latency``, ``speedup``, ``fidelity``, ``partial``, ``stats``...).
    :param output_dir: the run's output directory.
    """


@hookspec
def fluxopt_run_finished(result: RunRecord, output_dir: str) -> None:
    """Called once with the complete ``result.json`` content after it is written (not called
    when the run is interrupted).

    :param result: the whole :class:`fluxopt.RunRecord` (``fluxopt.record``): baseline, stacks,
        config, environment, provenance; ``result.to_json()`` is what result.json holds.
    :param output_dir: the run's output directory.
    """


@hookspec
def fluxopt_register_configs() -> None:
    """Called when fluxopt puts its configuration into Hydra's ConfigStore, before any config is
    composed: register config nodes or OmegaConf resolvers that a plugin's configs use (the scale
    ring registers ``${fluxopt_gpus_per_local_job:}`` for its launchers' configs)."""


@hookspec
def fluxopt_stack_measured(measured: Measured) -> None:
    """Called after the baseline and after each stack was measured, while its pipeline is still
    built, before its fidelity is judged (not called with ``build_only``).

    :param measured: a :class:`fluxopt.measure.Measured`: ``label`` (the stack's name for its
        files), ``record`` (its :class:`fluxopt.StackRecord`, to which a plugin may add, e.g.
        ``record.profile``), ``pipe``, ``generate(on_step)`` (one more generation of the first prompt;
        ``on_step(i)`` after denoising step ``i``), ``shapes``, ``device``, ``output_dir``,
        ``config`` (the validated :class:`fluxopt.config.RunConfig`), ``stats`` (what the backends
        reported), ``run_info`` (a mapping shared by every call of one run, stored as the record's
        ``profile``) and ``enter(phase)`` (announce a phase on the progress display).
    """


@hookspec
def fluxopt_terminal_summary(result: RunRecord, output_dir: str) -> None:
    """Called by the command line after a single run (not a sweep job) finished, to present its
    result on the terminal (the report ring prints the table and the verdict sentence).

    :param result: the run's :class:`fluxopt.RunRecord`, as written.
    :param output_dir: the run's output directory.
    """


@hookspec
def fluxopt_sweep_finished(sweep_dir: str) -> None:
    """Called once when a sweep ends, also when it was interrupted, with every job's result.json
    in place (the report ring writes ``summary.{md,csv,json}``, the plot and the image grid).

    :param sweep_dir: the sweep's directory (``hydra.sweep.dir``).
    """


@hookspec(firstresult=True)
def fluxopt_expected_durations(model: str, device: str, shapes: Shapes, stacks: list[str], generations: int,
                               config: dict[str, Any]) -> dict[str, float] | None:
    """Called by the command line before a single run starts, for the progress line's ETA (the
    history ring answers from the results store). The first answer that is not None is used.

    :param model: the model's name (``model=<name>``).
    :param device: the device's name as records hold it (``NVIDIA H200``; a CPU's model name).
    :param shapes: the run's resolved :class:`fluxopt.Shapes` (``height``, ``width``, ``steps``...).
    :param stacks: the names of the planned stacks, in order (the baseline runs before them).
    :param generations: the most generations the baseline makes: its warm-up and timed calls, and
        one more for each prompt the timed calls do not reach (:func:`fluxopt.measure.measure`;
        ``bench.max_time_s`` and ``bench.target_rse`` can end the calls sooner).
    :param config: the run's settings as a plain dict, as ``fluxopt_run_started`` gets them
        (``store``, ``bench``...).
    :return: wall seconds expected per stack name (``baseline`` included) on this machine, for
        the stacks it has seen run; None or an empty mapping when it has no estimate.
    """


@hookspec(firstresult=True)
def fluxopt_engine_selected(group: str, name: str) -> bool | None:
    """Called by the command line for a Hydra launcher or sweeper the command names
    (``hydra/launcher=NAME``, ``hydra/sweeper=NAME``), before any job is composed: raise
    :class:`fluxopt.ConfigError` when it cannot be used here (its Hydra plugin is not installed: say
    how to get it), and register the Hydra plugin class it needs (the scale ring does both for
    fluxopt's own engines, ``fluxopt_*``, and checks Hydra's). The first answer that is not None is used.

    :param group: ``hydra/launcher`` or ``hydra/sweeper``.
    :param name: the config's name in that group (``fluxopt_ray``, ``fluxopt_search``, ``joblib``...).
    :return: True when this plugin provides the engine; an engine named ``fluxopt_*`` that no plugin
        provides is refused (its ring is switched off).
    """


@hookspec
def fluxopt_check_job(config: DictConfig, multirun: bool) -> None:
    """Called by the command line for every job of the command, composed as Hydra will compose it
    and planned, before anything loads: raise :class:`fluxopt.ConfigError` with one line naming
    the setting, the value and what is allowed (the scale ring checks the GPUs a launcher asks for
    against this machine, and the search's limits and backends).

    :param config: the job's composed config, its ``hydra`` node included (``config.hydra.launcher``).
    :param multirun: whether the command is a sweep (``-m``).
    """


@hookspec(firstresult=True)
def fluxopt_launch(argv: list[str], processes: int, detach: bool, multirun: bool) -> int | None:
    """Called by the command line once the whole command passed its checks, before Hydra runs: run
    it somewhere other than this process and return the exit status the command ends with (the scale
    ring starts it in the background for ``detach=true``, and relaunches it under torchrun when a
    stack needs several processes), or prepare this process and return None to run it here (a
    torchrun rank joins its process group). The first answer that is not None is used; a command
    with ``detach=true`` that no plugin starts is refused.

    :param argv: the command's arguments after ``python -m fluxopt`` (a sweep's ``hydra.sweep.dir``
        already pinned, so the launched command writes where this one reports).
    :param processes: the processes the requested stacks need (one GPU each; 1 for most stacks).
    :param detach: whether the command asked to run in the background (``detach=true``).
    :param multirun: whether the command is a sweep (``-m``).
    """
