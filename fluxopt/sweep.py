"""The Sweep concept: many runs (Hydra multirun jobs, or the stacks of one bake-off) gathered
into one comparison: ``summary.{md,csv,json}``, ``speedup_vs_fidelity.png`` and ``grid.png``.

Everything is rebuilt from the ``result.json`` files alone, through the one reader
(:func:`fluxopt.record.read_record`), so ``fluxopt-report DIR`` can regenerate a summary after the
fact (or while a sweep is still running). A sweep writes the jobs it expects (``sweep.json``)
before any starts: the verdict counts expected against found, and a job that never started, was
killed, cannot be read or was edited makes it incomplete. A summary names every result it could
not use. While a sweep runs, its directory is locked: a second sweep into it is refused.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fluxopt.environment import INVOCATION_ENV
from fluxopt.errors import ConfigError
from fluxopt.files import move_aside, save_figure_atomic, write_json_atomic, write_text_atomic
from fluxopt.launch import writes_results
from fluxopt.record import RESULT_FILE, RunRecord, StackRecord, UnreadableRecord, read_record, within_noise, write_record
from fluxopt.report import (SEARCH_FILE, environment_lines, fidelity_note, markdown_table, not_run,
                            not_run_reason, search_lines, speedup_text, stack_row)
from fluxopt.runner import job_record

SUMMARY_COLUMNS = ("stack", "status", "latency (s)", "per step (ms)", "speedup", "build (s)", "warm start",
                   "first call (s)", "peak mem (GiB)", "J/image", "avg W", "steps skipped", "PSNR", "SSIM", "latent err", "fidelity", "device", "run")
EXPECTED_FILE = "sweep.json"  # the jobs a sweep expects, written before any starts
LOCK_FILE = ".sweep.lock"  # held (flock) by the process running a sweep into the directory
OWNER_FILE = "sweep.lock.json"  # who holds it: pid, command, start time


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
                             "started": datetime.now(timezone.utc).isoformat(), "search": search,
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
                                                   "started": datetime.now(timezone.utc).isoformat()})
        try:
            yield
        finally:
            (sweep_dir / OWNER_FILE).unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- crashed jobs
def job_dir(job_config: DictConfig) -> Path:
    """Where a sweep job writes its result (``hydra.sweep.dir``/``hydra.sweep.subdir``)."""
    return Path(str(job_config.hydra.sweep.dir)) / str(job_config.hydra.sweep.subdir)


def record_crashed_job(job_config: DictConfig, reason: str) -> Path:
    """Record, from the launching process, that a job's process died (killed, out of memory,
    lost node): its record is marked incomplete with the reason, or written if the job died
    before writing one, so the summary lists it and the sweep's verdict is negative.
    Called by fluxopt's Ray and submitit launchers; returns the job's directory."""
    directory = job_dir(job_config)
    path = directory / RESULT_FILE
    try:
        record = read_record(path)
    except UnreadableRecord:
        move_aside(path, "unreadable")
        record = None
    if record is None:
        record = job_record(job_config, {"invocation": os.environ.get(INVOCATION_ENV),
                                         "overrides": list(job_config.hydra.overrides.task)})
    record.complete, record.job_crash = False, reason
    write_record(path, record)
    return directory


# --------------------------------------------------------------------------- the summary
def baseline_spread(records: list[RunRecord]) -> dict[str, dict[str, float]]:
    """Per device: baseline medians across runs and their relative spread (max-min)/mean,
    the noise floor a speedup must clear to mean something."""
    by_device: dict[str, list[float]] = {}
    for record in records:
        if record.baseline is not None and record.baseline.latency is not None:
            by_device.setdefault(record.device, []).append(record.baseline.latency.median)
    spread = {}
    for device, medians in by_device.items():
        mean = statistics.fmean(medians)
        spread[device] = {"runs": len(medians), "mean_s": mean, "min_s": min(medians), "max_s": max(medians),
                          "relative_spread": (max(medians) - min(medians)) / mean if mean else 0.0}
    return spread


def _warm_start(stack: StackRecord) -> str:
    artifacts = (stack.stats or {}).get("artifacts") or {}
    if not artifacts:
        return "—"
    return "cache hit" if all(a.get("cache_hit") for a in artifacts.values()) else "cold build"


def _run_name(record: RunRecord, root: Path) -> str:
    if record.path is None:
        return "."
    try:
        return str(record.path.parent.relative_to(root)) or "."
    except ValueError:
        return str(record.path.parent)


def summary_rows(records: list[RunRecord], root: Path) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(table row, machine-readable row) for every stack of every run, and for every requested
    stack a run has no measurement of."""
    spread = baseline_spread(records)
    rows = []
    for record in records:
        noise = spread.get(record.device, {}).get("relative_spread", 0.0)
        run = _run_name(record, root)
        env = record.environment
        for stack in record.stacks:
            row = stack_row(stack)
            within = None if stack.speedup is None else within_noise(stack.speedup, stack.speedup_uncertainty, noise)
            row.update({"speedup": speedup_text(stack, within), "warm start": _warm_start(stack),
                        "device": record.device, "run": run})
            machine = {**stack.to_json(), "within_noise_sweep": within, "device": record.device, "run": run,
                       "run_dir": str(record.path.parent) if record.path else None,
                       "hostname": env.get("hostname"), "cuda_visible_devices": env.get("cuda_visible_devices"),
                       "model": record.model.get("name"), "edited": record.edited,
                       "baseline_median_s": record.baseline.latency.median if record.baseline and
                       record.baseline.latency else None}
            rows.append((row, machine))
        for name in not_run(record):
            why = not_run_reason(record)
            rows.append(({**{c: "—" for c in SUMMARY_COLUMNS}, "stack": name, "status": why,
                          "device": record.device, "run": run},
                         {"stack": name, "status": "not run", "reason": why, "run": run, "device": record.device}))
    return rows


def _plot(records: list[RunRecord], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for stack in (s for r in records for s in r.stacks):
        psnr = stack.worst("psnr")
        if stack.speedup is None or psnr is None or stack.partial:
            continue
        ax.errorbar(psnr, stack.speedup, yerr=stack.speedup_uncertainty or 0, fmt="o",
                    color="tab:green" if stack.passed_gate else "tab:red", capsize=3)
        ax.annotate(stack.stack, (psnr, stack.speedup), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("PSNR vs baseline, worst prompt (dB; 100 = identical)")
    ax.set_ylabel("speedup vs baseline (median ratio)")
    ax.set_title("speedup vs fidelity (green: passes its fidelity thresholds)")
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=120)
    plt.close(fig)


def _grid(records: list[RunRecord], path: Path) -> bool:
    """Baseline and every stack's image for each prompt, labelled; False if no images exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns: list[tuple[str, Path, list[str]]] = []
    for record in records:
        run_dir = record.path.parent if record.path else Path(".")
        if record.baseline is not None and record.baseline.images and not columns:
            columns.append(("baseline", run_dir, record.baseline.images))
        for stack in record.stacks:
            if stack.images:
                columns.append((stack.stack, run_dir, stack.images))
    if not columns:
        return False
    prompts = records[0].prompts
    n_rows = max(len(images) for _, _, images in columns)
    fig, axes = plt.subplots(n_rows, len(columns), figsize=(2.2 * len(columns), 2.4 * n_rows), squeeze=False)
    for c, (label, run_dir, images) in enumerate(columns):
        for r in range(n_rows):
            ax = axes[r][c]
            ax.axis("off")
            if r < len(images) and (run_dir / images[r]).exists():
                ax.imshow(Image.open(run_dir / images[r]))
            if r == 0:
                ax.set_title(label, fontsize=8)
            if c == 0 and r < len(prompts):
                ax.text(-0.05, 0.5, prompts[r][:40], transform=ax.transAxes, rotation=90, va="center",
                        ha="right", fontsize=6)
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=100)
    plt.close(fig)
    return True


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
        run = _run_name(record, root)
        for why in record.failures():
            (edited if why.startswith("edited: ") else failures).append(f"{run}: {why}")
    if not records and not missing:
        incomplete.append(f"no result.json in {root}")
    return Verdict(failures, incomplete + missing + edited)


def write_summary(root: Path) -> dict[str, Any]:
    """Write the summary files into ``root`` (each atomically, all computed before any is
    written); returns the summary.json content."""
    root = Path(root)
    found = collect(root)
    verdict = verdict_of(root, found)
    pairs = summary_rows(found.records, root)
    rows, machine = [row for row, _ in pairs], [m for _, m in pairs]
    spread = baseline_spread(found.records)
    searched = read_search(root)
    summary = {"root": str(root), "runs": len(found.records), "passed": verdict.passed,
               "failures": verdict.failures, "incomplete": verdict.incomplete, "unusable": found.unusable,
               "baseline_spread": spread, "rows": machine, "search": searched}
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    markdown = _markdown(found, rows, spread, verdict, searched, has_grid=_has_images(found.records))
    write_json_atomic(root / "summary.json", summary)
    write_text_atomic(root / "summary.csv", buffer.getvalue())
    _plot(found.records, root / "speedup_vs_fidelity.png")
    _grid(found.records, root / "grid.png")
    write_text_atomic(root / "summary.md", markdown)
    return summary


def _has_images(records: list[RunRecord]) -> bool:
    return any(s.images for r in records for s in ([r.baseline] if r.baseline else []) + r.stacks)


def _verdict_line(verdict: Verdict, found: Collected, searched: dict[str, Any] | None) -> str:
    if verdict.passed:
        built_only = all(r.build_only for r in found.records)
        return ("**Verdict: a stack met the fidelity gate and the limits.**" if searched else
                "**Verdict: every requested stack built (build_only: nothing was measured).**" if built_only else
                "**Verdict: every requested stack passed.**")
    parts = []
    if verdict.failures:
        parts.append(f"{len(verdict.failures)} failure(s): " + "; ".join(verdict.failures))
    if verdict.incomplete:
        parts.append(f"incomplete, {len(verdict.incomplete)} result(s) missing or not usable: "
                     + "; ".join(verdict.incomplete))
    return "**Verdict: " + ". ".join(parts) + "**"


def _markdown(found: Collected, rows: list[dict[str, str]], spread: dict[str, dict[str, float]],
              verdict: Verdict, searched: dict[str, Any] | None, has_grid: bool) -> str:
    lines = ["# fluxopt bake-off summary", "", _verdict_line(verdict, found, searched), ""]
    if found.unusable:
        lines += ["## Results not used", "", *[f"- {why}" for why in found.unusable], ""]
    if not found.records:
        return "\n".join(lines + ["No readable result.json found.", ""])
    if searched:
        lines += search_lines(searched)
    first = found.records[0]
    shapes = first.shapes
    if shapes:
        lines.append(f"Model `{first.model['name']}`, {shapes.get('height')}x{shapes.get('width')}, "
                     f"{shapes.get('steps')} steps, {len(first.prompts)} prompt(s); {len(found.records)} run(s).")
        lines.append("")
    if len(spread) > 1:
        lines += [f"**Mixed devices ({', '.join(sorted(spread))})**: each speedup is against the baseline of "
                  "its own device (column `device`); do not compare speedups across devices.", ""]
    lines += [markdown_table(rows, SUMMARY_COLUMNS), ""]
    lines.append("## Noise")
    for device, s in spread.items():
        lines.append(f"- {device}: baseline median over {s['runs']} run(s) {s['mean_s']:.4g} s "
                     f"(min {s['min_s']:.4g}, max {s['max_s']:.4g}; spread {100 * s['relative_spread']:.1f}%). "
                     "Speedups within 2 sigma of 1 or within this spread are marked '(noise)'.")
    lines += ["", "## Fidelity", fidelity_note(first) if first.shapes else "", ""]
    lines += ["![speedup vs fidelity](speedup_vs_fidelity.png)", ""]
    if has_grid:
        lines += ["![images](grid.png)", ""]
    if first.environment:
        lines += ["## Environment (first run)", *environment_lines(first.environment), ""]
    return "\n".join(lines)


class SweepSummaryCallback(Callback):
    """Hydra callback: writes the summary into the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not writes_results():  # under torchrun only rank 0 writes
            return
        root = Path(config.hydra.sweep.dir)
        summary = write_summary(root)
        print(f"fluxopt: sweep summary of {summary['runs']} run(s): {root / 'summary.md'}")
