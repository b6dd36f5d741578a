"""Search instead of enumeration (``hydra/sweeper=fluxopt_search``): Optuna proposes stacks plus
any backend options given as distributions on the command line; fluxopt turns each proposal into
a run and scores it by its speedup when it passes its fidelity gate and the limits
(``search.min_psnr``, ``search.max_memory_gib``).

The space is built from what the backends declare, so that every proposal can run: backends
that cannot share a stack (an exclusive group such as the quantizations or the step caches, an
exclusive stage, a declared conflict) are one choice among them or none (``stack.quantization=
torchao_int8``); any other backend is a yes/no (``stack.fuse_qkv=true``). A proposal that is
still refused (no backend at all, an incompatibility of the options drawn) is told to Optuna as
failed but does not count as one of the trials asked for: ``hydra.sweeper.n_trials`` runnable
trials are judged, up to :data:`PROPOSALS_PER_TRIAL` proposals each.

The Optuna side lives in ``hydra_plugins/fluxopt_launchers/_search_sweeper.py``; this module is
the part that knows fluxopt, testable without Optuna. Every trial, run or refused, is written to
``search.json`` in the sweep directory, and the summary shows them with the winner's command.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import DictConfig

from fluxopt import plugins
from fluxopt.backend import Stage
from fluxopt.environment import INVOCATION_ENV, detect_device
from fluxopt.errors import ConfigError, FluxoptError
from fluxopt.files import write_json_atomic
from fluxopt.sweep import SEARCH_FILE
from fluxopt.record import RESULT_FILE, RunRecord, UnreadableRecord, read_record
from fluxopt.selection import Limits, Pick, ineligible
from fluxopt.stack import build_stack, option_defaults, unknown_backend_message

CHOICE_PREFIX = "stack."  # a search dimension: "stack.<backend>=true" or "stack.<group>=<backend>"
NONE = "none"  # the value of a choice among backends that picks none of them
PROPOSALS_PER_TRIAL = 20  # a space where almost every proposal is refused still ends


def default_backends(device: str = "auto") -> list[str]:
    """What the search combines when ``search.backends`` is not set: every backend this machine
    can run in one process, except placement (offloading trades speed for memory)."""
    info = detect_device(device)
    names = []
    for name, backend in sorted(plugins.backends().items()):
        options = backend.options_class()
        if backend.stage is Stage.PLACEMENT or backend.processes(options) != 1:
            continue
        if backend.unmet_requirement(options, info) is None:
            names.append(name)
    return names


def exclusive_sets(backends: Sequence[str]) -> list[list[str]]:
    """``backends`` joined where two of them cannot share a stack with their default options (as
    :func:`fluxopt.stack.build_stack` judges it: exclusive groups and stages, declared conflicts),
    transitively: each set is one choice of the search. Two members of a set that could run
    together are not proposed together (the price of a space without refused pairs)."""
    parent = {name: name for name in backends}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for a, b in itertools.combinations(backends, 2):
        try:
            build_stack([a, b])
        except ConfigError:
            parent[root(b)] = root(a)
    sets: dict[str, list[str]] = {}
    for name in backends:
        sets.setdefault(root(name), []).append(name)
    return list(sets.values())


def _choice_name(members: Sequence[str]) -> str:
    known = plugins.backends()
    groups = {known[m].exclusive_group for m in members}
    if len(groups) == 1 and None not in groups:
        return str(groups.pop())
    return "_or_".join(sorted(members))


def search_space(backends: Sequence[str]) -> dict[str, str]:
    """Optuna sweep parameters: one choice per set of backends that cannot share a stack (or none of
    them), a yes/no for each other backend."""
    known = sorted(plugins.backends())
    for name in backends:
        if name not in known:
            raise ConfigError(f"search.backends: {unknown_backend_message(name, known)}")
    if not backends:
        raise ConfigError("search.backends is empty: the search needs at least one backend to combine")
    space = {}
    for members in exclusive_sets(list(dict.fromkeys(backends))):
        if len(members) == 1:
            space[f"{CHOICE_PREFIX}{members[0]}"] = "choice(false,true)"
        else:
            space[f"{CHOICE_PREFIX}{_choice_name(members)}"] = f"choice({NONE},{','.join(members)})"
    return space


def _value(override: str) -> tuple[str, Any]:
    parsed = OverridesParser.create().parse_overrides([override])[0]
    return parsed.key_or_group, parsed.value()


@dataclass
class Proposal:
    """One trial turned into fluxopt overrides: the stack, the options of its backends, the
    fixed settings. ``refused`` says why it cannot run (then nothing is launched)."""

    number: int
    params: dict[str, Any]
    stack: list[str]
    overrides: list[str]
    refused: str | None = None

    @property
    def label(self) -> str:
        return "+".join(self.stack) or "(empty)"

    def key(self) -> tuple[str, ...]:
        return tuple(sorted(self.overrides))


def propose(number: int, trial_overrides: Sequence[str]) -> Proposal:
    """Turn Optuna's overrides for one trial (``stack.compile=True``, ``backend.compile.mode=...``,
    fixed settings) into a fluxopt job, or say why it is refused."""
    chosen: list[str] = []
    options: dict[str, dict[str, Any]] = {}
    option_overrides: list[tuple[str, str]] = []
    fixed: list[str] = []
    params: dict[str, Any] = {}
    for text in trial_overrides:
        key, value = _value(text)
        if key.startswith(CHOICE_PREFIX):
            params[key] = value
            if value is True or str(value).lower() == "true":
                chosen.append(key[len(CHOICE_PREFIX):])
            elif value is not False and str(value).lower() not in ("false", NONE):
                chosen.append(str(value))
        elif key.startswith("backend."):
            params[key] = value
            _, name, option = key.split(".", 2)
            options.setdefault(name, {})[option] = value
            option_overrides.append((name, text))
        else:
            fixed.append(text)
    overrides = [f"+backend=[{','.join(chosen)}]"] if chosen else []
    overrides += [text for name, text in option_overrides if name in chosen]  # options of unused backends drop out
    proposal = Proposal(number, params, chosen, overrides + fixed)
    if not chosen:
        proposal.refused = "no backend chosen (the baseline is measured in every job anyway)"
        return proposal
    try:
        stack = build_stack({name: options.get(name) or None for name in chosen})
    except FluxoptError as exc:
        proposal.refused = str(exc)
        return proposal
    proposal.stack = stack.names  # stage order, as the run will name it
    return proposal


def score(data: RunRecord | None, limits: Limits) -> tuple[float | None, str | None]:
    """A finished job's objective (its stack's speedup) or why it has none."""
    if data is None:
        return None, "the job left no usable result (see its directory)"
    if data.job_crash:
        return None, f"the job's process died: {data.job_crash}"
    if len(data.stacks) != 1:
        return None, f"expected one measured stack, found {len(data.stacks)}"
    why = ineligible(data.stacks[0], limits, data)
    if why is not None:
        return None, why
    speedup = float(data.stacks[0].speedup)
    return (speedup, None) if math.isfinite(speedup) else (None, f"speedup {speedup} is not finite")


@dataclass
class TrialRecord:
    number: int
    stack: str
    params: dict[str, Any]
    overrides: list[str]
    state: str  # "complete", "refused", "infeasible", "repeat"
    value: float | None = None  # speedup
    reason: str | None = None
    job: int | None = None  # Hydra job number (None: nothing was launched)
    run_dir: str | None = None


@dataclass(frozen=True)
class Measured:
    """What one launched job gave (a repeated proposal reuses it instead of measuring again)."""

    value: float | None
    reason: str | None
    data: RunRecord | None
    job: int
    run_dir: str | None


@dataclass
class SearchLog:
    """Every trial of one search, written to ``search.json`` after each batch."""

    sweep_dir: Path
    limits: Limits
    backends: list[str]
    trials: list[TrialRecord] = field(default_factory=list)  # the trials asked for: each one runnable
    refused: list[TrialRecord] = field(default_factory=list)  # proposals that could not run (not trials)
    runs: dict[tuple[str, ...], Measured] = field(default_factory=dict)  # by Proposal.key()

    def best(self) -> TrialRecord | None:
        done = [t for t in self.trials if t.state == "complete" and t.value is not None]
        return max(done, key=lambda t: t.value) if done else None

    def winner(self) -> Pick | None:
        top = self.best()
        if top is None:
            return None
        data = self.runs[tuple(sorted(top.overrides))].data
        return Pick(data.stacks[0], data, option_defaults()) if data is not None and data.stacks else None

    def to_dict(self) -> dict[str, Any]:
        pick = self.winner()
        return {"objective": "speedup (maximize), each stack against the baseline of its own job",
                "invocation": os.environ.get(INVOCATION_ENV),
                "limits": self.limits.as_dict(), "backends": self.backends,
                "trials": [dataclasses.asdict(t) for t in self.trials],
                "refused": [dataclasses.asdict(t) for t in self.refused],
                "best": None if pick is None else {"stack": pick.name, "speedup": pick.stack.speedup,
                                                   "command": pick.command(), "python": pick.python()}}

    def write(self) -> None:
        write_json_atomic(self.sweep_dir / SEARCH_FILE, self.to_dict())


def limits_from(config: DictConfig) -> Limits:
    search = config.get("search") or {}
    return Limits(min_psnr=search.get("min_psnr"), max_memory_gib=search.get("max_memory_gib"))


def backends_from(config: DictConfig) -> list[str]:
    search = config.get("search") or {}
    chosen = search.get("backends")
    return list(chosen) if chosen is not None else default_backends(str(config.get("device", "auto")))


class InfeasibleTrial(Exception):
    """The trial's stack was refused, failed, or missed a limit; Optuna records it as failed."""


def _job_data(ret: JobReturn) -> RunRecord | None:
    """The run's record, read back from its directory through the one reader (the job may have
    died, or run in another process); None when it left none that can be used."""
    if not ret.working_dir:
        return None
    try:
        return read_record(Path(ret.working_dir) / RESULT_FILE)
    except UnreadableRecord:
        return None


class _InfeasibleReturn(JobReturn):
    """A trial without a value: reading it raises (Optuna then records a failed trial with the
    reason), without Hydra's "Error executing job" log line, which would misreport a refusal."""

    @property
    def return_value(self) -> Any:
        raise self._return_value

    @return_value.setter
    def return_value(self, value: Any) -> None:
        self._return_value = value


def _returned(value: float | None, reason: str | None, overrides: Sequence[str]) -> JobReturn:
    if value is None:
        ret: JobReturn = _InfeasibleReturn(overrides=list(overrides), status=JobStatus.FAILED)
        ret.return_value = InfeasibleTrial(reason)
    else:
        ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
        ret.return_value = value
    return ret


class SearchComplete(Exception):
    """The search has judged the trials it was asked for; the sweeper ends it."""


class SearchLauncher:
    """Stands between Optuna's sweeper and the real launcher (basic, joblib, Ray, submitit):
    turns each batch of proposals into fluxopt jobs, launches only the new, compatible ones, and
    hands back each proposal's speedup (or a failure naming why) in the order Optuna asked.
    Refused proposals are answered without counting as trials; once ``trials`` runnable trials
    are judged, the next batch raises :class:`SearchComplete`."""

    def __init__(self, launcher: Any, log: SearchLog, trials: int) -> None:
        self.launcher = launcher
        self.log = log
        self.wanted = trials

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
        left = self.wanted - len(self.log.trials)
        if left <= 0:
            raise SearchComplete
        number = len(self.log.trials) + len(self.log.refused)
        proposals = [propose(number + i, overrides) for i, overrides in enumerate(job_overrides)]
        counted = [p for p in proposals if p.refused is None][:left]
        new: dict[tuple[str, ...], Proposal] = {}
        for p in counted:
            if p.key() not in self.log.runs:
                new.setdefault(p.key(), p)
        batch = list(new.values())
        returns = self.launcher.launch([p.overrides for p in batch], initial_job_idx) if batch else []
        if len(returns) != len(batch):
            raise RuntimeError(f"the launcher returned {len(returns)} results for {len(batch)} jobs")
        launched_now = set()
        for job, (p, ret) in enumerate(zip(batch, returns, strict=True), start=initial_job_idx):
            data = _job_data(ret)
            value, reason = score(data, self.log.limits)
            self.log.runs[p.key()] = Measured(value, reason, data, job, ret.working_dir)
            launched_now.add(p.key())
        answers = []
        for p in proposals:
            record = TrialRecord(number=p.number, stack=p.label, params=p.params, overrides=p.overrides,
                                 state="refused", reason=p.refused)
            if p.refused is not None:
                self.log.refused.append(record)
            elif p in counted:
                measured = self.log.runs[p.key()]
                first = p.key() in launched_now and all(t.overrides != p.overrides for t in self.log.trials)
                record.state = ("complete" if measured.value is not None else "infeasible") if first else "repeat"
                record.value, record.reason = measured.value, measured.reason
                record.job, record.run_dir = measured.job, measured.run_dir
                self.log.trials.append(record)
            else:
                record.reason = f"not run: the search had its {self.wanted} trial(s)"
            answers.append(_returned(record.value, record.reason, p.overrides))
        self.log.write()
        return answers
