"""The Sweep concept: many runs (Hydra multirun jobs) judged together, from their files alone.

Records are read through the one reader (:func:`fluxopt.record.read_record`), so a verdict can
be rebuilt after the fact. A sweep writes the jobs it expects (``sweep.json``) before any starts:
the verdict counts expected against found, and a job that never started, was killed, cannot be
read or was edited makes it incomplete; every result that could not be used is named. While a
sweep runs, its directory is locked: a second sweep into it is refused. Presenting a sweep (the
summary table, plot and image grid) is the report ring's, through ``fluxopt_sweep_finished``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fluxopt import plugins
from fluxopt.environment import INVOCATION_ENV, writes_results
from fluxopt.errors import ConfigError
from fluxopt.files import move_aside, write_json_atomic
from fluxopt.record import RESULT_FILE, RunRecord, UnreadableRecord, read_record

SEARCH_FILE = "search.json"  # the search sweeper's trial log, in the sweep directory
EXPECTED_FILE = "sweep.json"  # the jobs a sweep expects, written before any starts
LOCK_FILE = ".sweep.lock"  # held (flock) by the process running a sweep into the directory
OWNER_FILE = "sweep.lock.json"  # who holds it: pid, command, start time


def pin_output_dir(argv: Sequence[str], multirun: bool, now: _dt.datetime | None = None) -> tuple[Path, list[str]]:
    """The directory a command writes to, and ``argv`` with it set: the one given by
    ``hydra.run.dir`` / ``hydra.sweep.dir``, else a new one in the default layout
    (``outputs/DATE/TIME-ID`` or ``multirun/DATE/TIME-ID``). A command that reports, locks or
    launches elsewhere must name the directory the run writes into, not resolve Hydra's default
    (``${now:...}``) a moment apart from it."""
    key = "hydra.sweep.dir=" if multirun else "hydra.run.dir="
    given = [a.lstrip("+").removeprefix(key) for a in argv if a.lstrip("+").startswith(key)]  # any spelling
    if given:
        return Path(given[-1]), list(argv)
    now = now or _dt.datetime.now()
    path = Path("multirun" if multirun else "outputs") / now.strftime("%Y-%m-%d") / \
        f"{now.strftime('%H-%M-%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    return path, [*argv, key + str(path)]


@dataclass
class Collected:
    """What a directory holds: the usable records and, per file, why one could not be used."""

    records: list[RunRecord] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)


def collect(root: Path) -> Collected:
    """Every result.json below ``root`` through the one reader (complete or not: an interrupted
    job's stacks are shown with the job marked incomplete); an unreadable one is named with why."""
    found = Collected()
    for path in sorted(Path(root).rglob(RESULT_FILE)):
        try:
            record = read_record(path)
        except UnreadableRecord as exc:
            found.unusable.append(str(exc))
            continue
        if record is not None:
            found.records.append(record)
    return found


# --------------------------------------------------------------------------- expected jobs
def _job_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """A job's identity: its task overrides (Hydra's own ``hydra.*`` / ``hydra/...`` ones are not
    part of the job's config, and a job's record does not list them)."""
    return tuple(sorted(str(o) for o in overrides if not str(o).lstrip("+~").startswith("hydra")))


def write_expected(sweep_dir: Path, jobs: Sequence[Sequence[str]], command: str, search: bool) -> None:
    """Record the jobs this sweep will run (each as its overrides) before any starts; an earlier
    sweep's list in the same directory is kept aside, never overwritten."""
    path = Path(sweep_dir) / EXPECTED_FILE
    if path.exists():
        move_aside(path, "previous")
    write_json_atomic(path, {"invocation": os.environ.get(INVOCATION_ENV), "command": command,
                             "started": _dt.datetime.now(_dt.timezone.utc).isoformat(), "search": search,
                             "jobs": [list(j) for j in jobs]})


def read_expected(root: Path) -> tuple[list[list[str]] | None, str | None]:
    """The job list of the sweep in ``root`` (None: not a sweep directory, or a search, whose
    trials are not known in advance) and why it could not be read, if it could not."""
    path = Path(root) / EXPECTED_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"{path}: the sweep's job list cannot be read ({exc})"
    jobs = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(jobs, list) or not all(isinstance(j, list) for j in jobs):
        return None, f"{path}: the sweep's job list has no 'jobs' list"
    return (None if data.get("search") else jobs), None


def _job_overrides(record: RunRecord) -> tuple[str, ...]:
    return _job_key(record.provenance.get("overrides") or [])


def sweep_records(found: Collected, expected: list[list[str]] | None) -> tuple[list[RunRecord], list[str]]:
    """The records the verdict is about (with a job list: those of its jobs; else every one) and
    the expected jobs that left no result."""
    if expected is None:
        return found.records, []
    keys = {_job_key(job) for job in expected}
    mine = [r for r in found.records if _job_overrides(r) in keys]
    have = {_job_overrides(r) for r in mine}
    missing = [f"job {i} ({' '.join(_job_key(job)) or 'no overrides'}): no result: it never started, or its process "
               "was killed before writing one" for i, job in enumerate(expected) if _job_key(job) not in have]
    return mine, missing


@contextlib.contextmanager
def sweep_lock(sweep_dir: Path, command: str) -> Iterator[None]:
    """Hold the sweep directory for this process; ConfigError naming the running sweep if another holds it."""
    sweep_dir = Path(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir / LOCK_FILE, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                owner = json.loads((sweep_dir / OWNER_FILE).read_text())
                who = f"pid {owner.get('pid')}, started {owner.get('started')}: {owner.get('command')}"
            except (OSError, ValueError, AttributeError):
                who = "another process"
            raise ConfigError(f"hydra.sweep.dir={sweep_dir} is in use by a running sweep ({who}); wait for it "
                              "to finish or choose another directory") from None
        write_json_atomic(sweep_dir / OWNER_FILE, {"pid": os.getpid(), "command": command,
                                                   "started": _dt.datetime.now(_dt.timezone.utc).isoformat()})
        try:
            yield
        finally:
            (sweep_dir / OWNER_FILE).unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- the summary
def run_name(record: RunRecord, root: Path) -> str:
    if record.path is None:
        return "."
    try:
        return str(record.path.parent.relative_to(root)) or "."
    except ValueError:
        return str(record.path.parent)


def read_search(root: Path) -> dict[str, Any] | None:
    """The search sweeper's trial log in ``root``, if this sweep was a search."""
    try:
        data = json.loads((root / SEARCH_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class Verdict:
    """A sweep's (or a directory's) verdict: what failed, and what could not be judged."""

    failures: list[str]  # stacks that failed or were refused, jobs whose process died
    incomplete: list[str]  # expected jobs without a result, unusable files, edited records

    @property
    def passed(self) -> bool:
        return not self.failures and not self.incomplete

    def reasons(self) -> list[str]:
        return self.failures + self.incomplete


def verdict_of(root: Path, found: Collected | None = None) -> Verdict:
    """The verdict on the sweep in ``root``, from its files alone. For a search, trials that fail or
    miss a limit are part of searching: the verdict is whether some trial met the gate and the limits."""
    root = Path(root)
    found = collect(root) if found is None else found
    expected, expected_problem = read_expected(root)
    search = read_search(root)
    incomplete = list(found.unusable) + ([expected_problem] if expected_problem else [])
    if search is not None:
        failures = [] if search.get("best") else [
            f"search: no trial met its fidelity gate and the limits ({root / SEARCH_FILE})"]
        return Verdict(failures, incomplete)
    records, missing = sweep_records(found, expected)
    failures, edited = [], []
    for record in records:
        run = run_name(record, root)
        for why in record.failures():
            (edited if why.startswith("edited: ") else failures).append(f"{run}: {why}")
    if not records and not missing:
        incomplete.append(f"no result.json in {root}")
    return Verdict(failures, incomplete + missing + edited)




class SweepFinishedCallback(Callback):
    """Hydra callback: when a multirun ends, the plugins present it (``fluxopt_sweep_finished``)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if writes_results():  # under torchrun only rank 0 writes
            plugins.hook().fluxopt_sweep_finished(sweep_dir=str(config.hydra.sweep.dir))
