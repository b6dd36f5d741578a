"""``python -m fluxopt`` / ``fluxopt``: the Hydra application and its exit status.

Before Hydra runs anything, the command line is checked: every override is parsed, every job
of a sweep is composed exactly as Hydra will compose it, and each composed config is planned
(:func:`fluxopt.plan.plan_run`: every setting validated, nothing loaded). A bad value ends
the command at once with one line naming the setting, the value and what is allowed (exit 2).

Exit status (README): 0 when every requested stack ran and passed its gate; 1 when any failed
or was refused on this machine; 2 for a usage or configuration error; 130 when interrupted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import secrets
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import hydra
import psutil
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Override, QuotedString
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fluxopt import plugins, sweep
from fluxopt.cli import console
from fluxopt.config import RunConfig, recorded_config, register_configs, run_config
from fluxopt.environment import INVOCATION_ENV, in_torchrun, rank, scratch_dir, writes_results
from fluxopt.errors import (ConfigError, ExitStatus, FluxoptError, UnavailableError, did_you_mean, note_signal,
                            signal_arrived)
from fluxopt.files import move_aside, write_text_atomic
from fluxopt.plan import RunPlan, check_runnable, check_writable_dir, plan_run
from fluxopt.record import (
    RESULT_FILE,
    RunRecord,
    Status,
    UnreadableRecord,
    read_record,
    write_record,
)
from fluxopt.runner import Run, can_resume, can_reuse, job_record
from fluxopt.stack import check_names, check_option_name, lookup_backend

log = logging.getLogger("fluxopt")

CONFIG_MODULE = "fluxopt.conf"
MAX_PREFLIGHT_JOBS = 512  # sweeps larger than this are checked on their first jobs only
TOP_LEVEL = {f.name for f in dataclasses.fields(RunConfig)}
GROUPS = {"model", "bench", "fidelity", "backend", "hydra"}


# ---------------------------------------------------------------------------------- preflight
def _stack_choices(value: Any) -> list[list[str]]:
    """Every backend combination an override value asks for (a sweep gives several)."""
    if isinstance(value, ChoiceSweep):
        return [names for item in value.list for names in _stack_choices(item)]
    if isinstance(value, (list, tuple)):
        return [[_text(v) for v in value]]
    return [[_text(value)]]


def _text(value: Any) -> str:
    return value.text if isinstance(value, QuotedString) else str(value)


def _hydra_args(argv: list[str]) -> Any:
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    return args


def _split_argv(argv: list[str]) -> tuple[list[str], bool]:
    args = _hydra_args(argv)
    return list(args.overrides), bool(args.multirun)


def _config_source(argv: list[str]) -> tuple[Any, str]:
    """Hydra's initialize context and config name for this command line: fluxopt's own configs,
    or ``--config-path DIR --config-name NAME`` (e.g. a run's saved ``.hydra`` to reproduce it)."""
    from hydra import initialize_config_dir

    args = _hydra_args(argv)
    if args.config_path:
        path = Path(args.config_path).expanduser().absolute()
        if not path.is_dir():
            raise ConfigError(f"--config-path={args.config_path} is not a directory")
        return initialize_config_dir(config_dir=str(path), version_base="1.3"), args.config_name or "config"
    return initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"), args.config_name or "config"


def parse_overrides(overrides: list[str]) -> list[Override]:
    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.extend(parser.parse_overrides([text]))
        except HydraException as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise ConfigError(f"cannot parse the argument {text!r}: {detail}. Arguments look like key=value, "
                              "+backend=name, +backend=[a,b] (one stack) or, with -m, +backend=a,b (a sweep)") from None
    return parsed


def _check_override(ov: Override, disabled: list[str]) -> None:
    """Names first (clear messages with close matches); values are checked by composing."""
    key = ov.key_or_group
    root = key.split(".")[0].split("/")[0]
    if root not in TOP_LEVEL | GROUPS:
        raise ConfigError(f"unknown setting '{key}'.{did_you_mean(root, TOP_LEVEL | GROUPS)} "
                          f"Settings: {', '.join(sorted(TOP_LEVEL - {'backend'}))}; "
                          "groups: model=, bench=, fidelity=, +backend=")
    if key in ("hydra/launcher", "hydra/sweeper"):
        name = _text(ov.value())
        provided = plugins.hook(disabled).fluxopt_engine_selected(group=key, name=name)
        if name.startswith("fluxopt_") and not provided:
            raise ConfigError(f"{key}={name}: no plugin provides it (fluxopt's launchers and sweeper are the scale "
                              "ring's, fluxopt.scale; disabled_plugins turns it off)")
    elif key == "backend" and not ov.is_delete():
        for names in _stack_choices(ov.value()):
            check_names(names)  # unknown names, empty stacks and incompatible pairs raise here
    elif key.startswith("backend."):
        parts = key.split(".")
        backend = lookup_backend(parts[1])
        if len(parts) > 2:
            check_option_name(backend, parts[2])
    elif key == "model" and not ov.is_delete():
        for names in _stack_choices(ov.value()):
            for name in names:
                plugins.model(name)


def _compose_error(exc: BaseException, job: list[str]) -> ConfigError:
    """One line from a composition error: Hydra's summary plus the first line of its cause
    (OmegaConf's "Value 'maybe' is not a valid bool"), without Hydra's hint lines."""
    parts: list[str] = []
    while exc is not None and len(parts) < 2:
        lines = [ln.strip() for ln in str(exc).strip().splitlines()
                 if ln.strip() and not ln.strip().startswith(("Set the environment variable", "full_key",
                                                             "object_type", "reference_type"))
                 and "$VALUE" not in ln]
        text = " ".join(lines).split(" Config search path:")[0].rstrip(".")
        if text and text not in parts:
            parts.append(text)
        exc = exc.__cause__ or exc.__context__
    where = f" (in the sweep job {' '.join(job)})" if job else ""
    return ConfigError(": ".join(parts) + where)


def _searching(overrides: list[Override]) -> bool:
    return any(ov.key_or_group == "hydra/sweeper" and _text(ov.value()) == "fluxopt_search" for ov in overrides)


def _jobs(overrides: list[Override], multirun: bool) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if _searching(overrides):  # the search proposes the stacks and the swept options: check the fixed part
        return [[ov.input_line for ov in overrides if not ov.is_sweep_override()]]
    if not multirun:
        for ov in overrides:
            if ov.is_sweep_override():
                raise ConfigError(f"'{ov.input_line}' is a sweep (several values); add -m to run one job per value, "
                                  "or write a list in brackets for one stack: +backend=[a,b]")
        return [[ov.input_line for ov in overrides]]
    batches = BasicSweeper.split_arguments(overrides, None)
    return batches[0][:MAX_PREFLIGHT_JOBS] if batches else [[]]


def preflight(argv: list[str]) -> list[RunPlan]:
    """Check the whole command line without loading a model; returns the plan of every job.
    Raises ConfigError (exit 2) or UnavailableError (exit 1) with one line for the user.

    A stack that needs several processes is checked against this machine by its ranks, after
    the relaunch under torchrun (its requirements include being launched so)."""
    register_configs()
    texts, multirun = _split_argv(argv)
    overrides = parse_overrides(texts)
    searching = _searching(overrides)
    if searching and not multirun:
        raise ConfigError("hydra/sweeper=fluxopt_search runs a sweep: add -m")
    presets = plugins.presets()
    selected = {backend for ov in overrides if ov.key_or_group == "backend" and not ov.is_delete()
                for names in _stack_choices(ov.value()) for name in names
                for backend in (presets[name].backends if name in presets else (name,))}
    disabled = _disabled_plugins(overrides)
    for ov in overrides:
        _check_override(ov, disabled)
        parts = ov.key_or_group.split(".")
        if searching and parts[0] == "backend" and len(parts) == 1:
            raise ConfigError(f"'{ov.input_line}': the search chooses the stacks; name the backends it may combine "
                              "with search.backends=[a,b,...]")
        if parts[0] == "backend" and len(parts) > 2 and parts[1] not in selected and not ov.is_add() \
                and not searching:
            raise ConfigError(f"{ov.key_or_group} is an option of the backend '{parts[1]}', which this command does "
                              f"not select; add +backend={parts[1]} (or put it in the +backend=[...] list)")
    plans = []
    GlobalHydra.instance().clear()
    context, config_name = _config_source(argv)
    try:
        with context:
            if multirun and not searching:
                _check_shared_config(config_name, overrides)
            for job in _jobs(overrides, multirun):
                try:
                    cfg = compose(config_name=config_name, overrides=job, return_hydra_config=True)
                    run_dir = cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir
                except (HydraException, OmegaConfBaseException, ValueError) as exc:
                    raise _compose_error(exc, job if multirun else []) from None
                check_writable_dir("hydra.sweep.dir" if multirun else "hydra.run.dir", Path(run_dir))
                plan = plan_run(cfg, check_requirements=False)
                plugins.hook(plan.config.disabled_plugins).fluxopt_check_job(config=cfg, multirun=multirun)
                # In a sweep a stack this machine cannot run is recorded as refused and the other
                # jobs still run; a single run ends at once.
                if not multirun and (in_torchrun() or required_processes([plan]) == 1):
                    check_runnable(plan)
                plans.append(plan)
    finally:
        GlobalHydra.instance().clear()
    return plans


def _check_shared_config(config_name: str, overrides: list[Override]) -> None:
    """Hydra composes a sweep's shared configuration from the overrides that are not swept before
    it launches any job; an option of a backend that only a swept ``+backend=`` selects fails
    there, with a traceback, even though every job would compose."""
    shared = [ov for ov in overrides if not ov.is_sweep_override()]
    try:
        compose(config_name=config_name, overrides=[ov.input_line for ov in shared], return_hydra_config=True)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        swept = {name for ov in overrides if ov.key_or_group == "backend" and ov.is_sweep_override()
                 for names in _stack_choices(ov.value()) for name in names}
        for ov in shared:
            parts = ov.key_or_group.split(".")
            if parts[0] == "backend" and len(parts) > 2 and parts[1] in swept:
                raise ConfigError(f"{ov.key_or_group} sets an option of '{parts[1]}', which only the swept "
                                  "+backend=... selects; Hydra composes a sweep's shared configuration without "
                                  "the swept values, so the option has nothing to attach to. Run such stacks as "
                                  f"their own command: python -m fluxopt +backend=[...] {ov.input_line}") from None
        raise _compose_error(exc, []) from None


def _disabled_plugins(overrides: list[Override]) -> list[str]:
    """``disabled_plugins`` as the command sets it, for the hooks fired before any job is composed."""
    for ov in reversed(overrides):
        if ov.key_or_group == "disabled_plugins" and not ov.is_delete() and isinstance(ov.value(), list):
            return [_text(v) for v in ov.value()]
    return []


def _launch(argv: list[str], plans: list[RunPlan], multirun: bool) -> int | None:
    """The exit status of the command run elsewhere by a plugin (in the background, under
    torchrun), or None to run it in this process."""
    detach = any(p.detach for p in plans)
    status = plugins.hook(plans[0].config.disabled_plugins if plans else []).fluxopt_launch(
        argv=argv, processes=required_processes(plans), detach=detach, multirun=multirun)
    if detach and status is None:
        raise ConfigError("detach=true: no plugin runs commands in the background (the scale ring, fluxopt.scale, "
                          "does; disabled_plugins turns it off)")
    return status


def required_processes(plans: list[RunPlan]) -> int:
    """Processes the requested stacks need (the most any of them asks for; a bake-off needs 1)."""
    return max((p.stacks[0].processes() for p in plans if p.explicit), default=1)


# ---------------------------------------------------------------------------------- one job
def _record_unrunnable(cfg: DictConfig, output_dir: Path, exc: BaseException) -> None:
    """In a sweep, a job that cannot run still leaves a result, so the summary lists it."""
    status = Status.SKIPPED if isinstance(exc, UnavailableError) else Status.FAILED
    write_record(output_dir / RESULT_FILE, job_record(cfg, provenance(), refused=exc, status=status))


def provenance() -> dict[str, Any]:
    """How this run was asked for: the exact command line, the overrides, the working directory, and
    when the process began (the record's ``started`` comes after the imports and the config, so a
    command's wall time is measured from this)."""
    began = datetime.fromtimestamp(psutil.Process().create_time(), timezone.utc).isoformat()
    info: dict[str, Any] = {"argv": list(sys.argv), "command": shlex.join(["python", "-m", "fluxopt", *sys.argv[1:]]),
                            "cwd": os.getcwd(), "invocation": os.environ.get(INVOCATION_ENV), "process_started": began}
    try:
        hc = HydraConfig.get()
        info["overrides"] = list(hc.overrides.task)
        info["job"] = hc.job.num if hc.mode == RunMode.MULTIRUN else None
    except ValueError:
        pass
    return info


def _previous(output_dir: Path, config: dict[str, Any]) -> tuple[RunRecord | None, RunRecord | None]:
    """(a finished, passing result for the same measurement config, to skip; an interrupted one of
    the same measurement, to continue). Anything else that is there (failed, edited, another config,
    unreadable) is moved aside, never overwritten; a continued one is kept aside too."""
    path = output_dir / RESULT_FILE
    try:
        previous = read_record(path)
    except UnreadableRecord as exc:
        moved = move_aside(path, "unreadable")
        console.say(f"{exc}; moved it to {moved.name} and measuring again")
        return None, None
    if previous is None:
        return None, None
    if can_reuse(previous, config):
        return previous, None
    resumable = can_resume(previous, config, output_dir) and not in_torchrun()  # ranks stay in lock-step
    if writes_results():
        moved = move_aside(path, "previous")
        if resumable:
            console.say(f"{path} is from an interrupted run of this measurement; continuing it with its baseline "
                        f"and its {len(previous.stacks)} recorded stack(s) (kept as {moved.name}; resume=false "
                        "measures everything again)")
        else:
            console.say(f"{path} is from an earlier, {'interrupted' if not previous.complete else 'different or failed'} "
                        f"run; kept as {moved.name}")
    return None, previous if resumable else None


def _eta(cfg: DictConfig) -> console.Eta | None:
    """The run's time estimate from the plugins (the history ring reads the results store) and,
    for stacks they know nothing of, from the baseline once measured; None when the plan cannot be
    had: an estimate is never worth a failed run. A stack this machine cannot run (a bake-off
    skips it without loading anything) is expected to take no time, whatever it took elsewhere."""
    try:
        plan = plan_run(cfg, check_memory=False, check_requirements=False)
        expected = plugins.hook(plan.config.disabled_plugins).fluxopt_expected_durations(
            model=plan.spec.name, device=plan.device.name, shapes=plan.shapes, stacks=[s.name for s in plan.stacks],
            generations=plan.warmup + max(plan.iterations, len(plan.prompts)), config=recorded_config(cfg, plan.config))
        skipped = {s.name: 0.0 for s in plan.stacks if s.unmet_requirements(plan.device)}
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.info("no time estimate: %s: %s", type(exc).__name__, exc)
        return None
    return console.Eta([s.name for s in plan.stacks], {**(expected or {}), **skipped})


def run_job(cfg: DictConfig) -> RunRecord | None:
    """The Hydra task: one run in the job's output directory. Records the verdict in ``OUTCOME``."""
    hc = HydraConfig.get()
    output_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    settings = run_config(cfg)
    config = recorded_config(cfg, settings)
    previous, resume = _previous(output_dir, config)
    if previous is not None:
        console.say(f"{output_dir / RESULT_FILE} is complete and passed for this config; skipping it "
                    "(resume=false measures again)")
        return previous
    console.quiet_libraries(output_dir, verbose=bool(cfg.get("verbose", False)))
    if not writes_results():  # torchrun rank > 0: computes in lock-step, writes nothing here
        try:
            return Run(cfg, scratch_dir(output_dir)).execute()
        except FluxoptError as exc:
            log.error("rank %s: %s", rank(), exc)
            return None
    try:
        with console.progress(enabled=not multirun, eta=_eta(cfg)) as on_phase, \
                console.library_output_to_log(not cfg.get("verbose", False)):
            data = Run(cfg, output_dir, provenance=provenance(), on_phase=on_phase, resume=resume).execute()
    except KeyboardInterrupt:
        OUTCOME.interrupted_dir = output_dir
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback in the log
        # (Hydra would print its own traceback for anything that leaves the task function.)
        if signal_arrived():  # the interrupt's consequence (see _interrupted_by_now)
            OUTCOME.interrupted_dir = output_dir
            raise KeyboardInterrupt from exc
        if isinstance(exc, FluxoptError):
            message = str(exc)
        else:
            trace = output_dir / "logs" / "error.log"
            write_text_atomic(trace, "".join(traceback.format_exception(exc)))
            message = f"{type(exc).__name__}: {exc} (traceback in {trace})"
        if not multirun:
            console.error(message)
            sys.exit(getattr(exc, "exit_status", ExitStatus.STACK_FAILED))
        log.error("job %s: %s", hc.job.num, message)
        _record_unrunnable(cfg, output_dir, exc)
        OUTCOME.failed.append(f"job {hc.job.num}: {message}")
        return None
    OUTCOME.failed.extend(data.failures())
    if not multirun:
        console.print_run(data, output_dir, plugins.hook(settings.disabled_plugins))
    return data


@dataclasses.dataclass
class Outcome:
    """What the single run of this process found, for the exit status (a sweep's verdict is read
    from its directory)."""

    failed: list[str] = dataclasses.field(default_factory=list)
    interrupted_dir: Path | None = None


def _interrupted_by_now(exc: BaseException) -> None:
    """Raise KeyboardInterrupt (from ``exc``) when a signal has arrived (see
    :func:`fluxopt.errors.signal_arrived`): the verdict is then "interrupted" (exit 130), not ``exc``."""
    if signal_arrived():
        raise KeyboardInterrupt from exc


OUTCOME = Outcome()

_hydra_main = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")(run_job)


def _exit_interrupted() -> NoReturn:
    """Exit 130, also when the interrupt surfaced from code run by ``exec`` of a string (dataclasses
    build their methods that way, so an interrupt landing in an import often does). CPython marks a
    KeyboardInterrupt that leaves an exec'd string as unhandled, even one caught later, and under
    ``python -m`` nothing clears the mark: at exit the interpreter would kill itself with SIGINT
    (status -2), whatever status was asked for. Running a string that succeeds clears it."""
    exec("pass")  # noqa: S102 - a constant; it resets the interpreter's unhandled-interrupt mark
    sys.exit(ExitStatus.INTERRUPTED)


def _interrupt(signum: int, frame: Any) -> None:
    """Ctrl-C and SIGTERM: noted (see :func:`fluxopt.errors.signal_arrived`), then a KeyboardInterrupt."""
    note_signal(signum)
    raise KeyboardInterrupt


def _fix_sweep_dir(argv: list[str]) -> tuple[list[str], Path | None]:
    """For a sweep, ``argv`` with ``hydra.sweep.dir`` set (the one given, else a new one in the
    default layout), so that the directory this process locks, lists the jobs in and reads the
    verdict from is the one Hydra writes into."""
    texts, multirun = _split_argv(argv)
    if not multirun:
        return argv, None
    directory, args = sweep.pin_output_dir(argv, multirun=True)
    return args, directory


def _sweep(argv: list[str], sweep_dir: Path) -> list[str]:
    """Run the sweep with its directory locked and its job list written first; its verdict."""
    texts, _ = _split_argv(argv)
    overrides = parse_overrides(texts)
    searching = _searching(overrides)
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    jobs = [] if searching else (BasicSweeper.split_arguments(overrides, None) or [[[]]])[0]
    command = shlex.join(["python", "-m", "fluxopt", *argv])
    with sweep.sweep_lock(sweep_dir, command):
        sweep.write_expected(sweep_dir, jobs, command, search=searching)
        try:
            _hydra_main()
        except KeyboardInterrupt:
            plugins.hook().fluxopt_sweep_finished(sweep_dir=str(sweep_dir))
            raise
    return sweep.verdict_of(sweep_dir).reasons()


def main(noted: Sequence[int] = ()) -> None:
    """The command. ``noted``: the signals ``fluxopt.__main__`` notes while the CLI imports, still
    filling until the two handlers below replace its own; one there ends the command at once."""
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        try:
            if noted:
                raise KeyboardInterrupt
            _main(sys.argv[1:])
        except Exception as exc:  # noqa: BLE001 - re-raised unless a signal came first
            _interrupted_by_now(exc)
            raise
    except KeyboardInterrupt:
        where = OUTCOME.interrupted_dir
        console.error("interrupted" + (f"; partial results in {where}" if where else ""))
        _exit_interrupted()


def _main(argv: list[str]) -> None:
    if not in_torchrun():  # torchrun ranks keep the id of the command that launched them
        os.environ[INVOCATION_ENV] = secrets.token_hex(8)
    try:
        register_configs()
        argv, sweep_dir = _fix_sweep_dir(argv)
        plans = preflight(argv)  # first, so bad input is answered here, not in a background log
        status = _launch(argv, plans, multirun=sweep_dir is not None)
    except FluxoptError as exc:
        _interrupted_by_now(exc)
        console.error(str(exc))
        sys.exit(exc.exit_status)
    if status is not None:
        sys.exit(status)
    sys.argv = [sys.argv[0], *argv]  # Hydra reads the command line from sys.argv
    try:
        if sweep_dir is not None and writes_results():
            failed = _sweep(argv, sweep_dir)
        else:
            _hydra_main()
            failed = OUTCOME.failed
    except KeyboardInterrupt:
        if sweep_dir is not None:
            console.error(f"interrupted; partial results in {sweep_dir}. To finish, run the same command with "
                          f"hydra.sweep.dir={sweep_dir}")
        elif OUTCOME.interrupted_dir is not None:
            console.error(f"interrupted; partial results in {OUTCOME.interrupted_dir}. To finish, run the same "
                          f"command with hydra.run.dir={OUTCOME.interrupted_dir}")
        else:
            console.error("interrupted before any result was written")
        _exit_interrupted()
    except FluxoptError as exc:
        _interrupted_by_now(exc)
        console.error(str(exc))
        sys.exit(exc.exit_status)
    if failed:
        console.error(f"{len(failed)} requested stack(s) failed or could not be judged: " + "; ".join(failed))
        sys.exit(ExitStatus.STACK_FAILED)
    sys.exit(ExitStatus.OK)
