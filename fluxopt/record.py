"""The run record: one typed ``RunRecord`` (with a ``StackRecord`` per stack) per run, written by
one writer and read by one reader.

The record stores what was measured (every timed iteration, every metric value per prompt, the
thresholds) and the figures derived from it (latency statistics, speedup and its uncertainty,
within-noise, each metric's worst value and the gate verdict). Derived figures are computed in
this module only: the runner calls the same functions to fill a record as the reader calls to
check one. :func:`read_record` re-derives every derived figure from the raw values; a stored
figure that disagrees marks the record as edited (``RunRecord.edited``), and the re-derived value
is the one every consumer sees. A consumer therefore never trusts a number it can recompute.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fluxopt.files import write_json_atomic

SCHEMA_VERSION = 5
# 2: before partial builds were labelled, 3: before energy, 4: before the measurement protocol was
# kept; read the same way. 1: before the typed record, the same fields, but the std of a single
# timed sample written as 0.0 (see _from_schema_1)
READABLE_SCHEMAS = (1, 2, 3, 4, 5)
RESULT_FILE = "result.json"
INTERRUPTED = "interrupted during "  # how an interrupted stack's reason starts (it is measured again on resume)
NOISE_SIGMAS = 2.0  # a speedup within this many standard deviations of 1 is noise
_REL_TOL = 1e-6  # stored and re-derived figures agree within this (JSON keeps 17 digits)


class Phase(str, enum.Enum):
    """Where a stack was when it failed or stopped; reported with the reason."""

    VALIDATE = "validate"
    LOAD = "load"
    APPLY = "apply"
    BUILD = "build"
    WARMUP = "warmup"
    TIMING = "timing"
    FIDELITY = "fidelity"


class Status(str, enum.Enum):
    OK = "ok"
    FAILED = "failed"  # build/run error, fidelity gate missed, baseline unusable
    SKIPPED = "skipped"  # cannot run on this machine (in a bake-off of everything; a requested stack fails)


# --------------------------------------------------------------------------- derived figures
@dataclass
class LatencyStats:
    """Seconds over the timed iterations; everything but ``samples`` is derived from them."""

    median: float
    mean: float
    std: float | None  # None for one sample: no spread was measured
    min: float
    max: float
    p90: float
    n: int
    samples: list[float] = field(default_factory=list)

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> LatencyStats:
        xs = sorted(float(s) for s in samples)
        if not xs:
            raise ValueError("no timed iterations")
        return cls(median=statistics.median(xs), mean=statistics.fmean(xs),
                   std=statistics.stdev(xs) if len(xs) > 1 else None, min=xs[0], max=xs[-1],
                   p90=float(np.percentile(xs, 90)), n=len(xs), samples=[float(s) for s in samples])

    @property
    def rse(self) -> float | None:
        """Relative standard error of the mean (std / sqrt(n) / mean): how well the samples pin the
        mean down, which more samples improve and the spread of single calls (std) does not."""
        if self.std is None or self.mean <= 0:
            return None
        return self.std / math.sqrt(self.n) / self.mean

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Energy:
    """Joules the GPU board drew (NVML's cumulative counter): one sample per timed generation,
    matched to the latency samples, and the totals of the warm-up and build phases. Per image and
    average watts are derived from the samples, never stored."""

    per_image_j: list[float]
    warmup_j: float | None = None
    build_j: float | None = None

    @property
    def median_j(self) -> float:
        return statistics.median(self.per_image_j)

    def average_w(self, latency: LatencyStats | None) -> float | None:
        """Mean power over the timed generations (joules / seconds of the same generations)."""
        if latency is None or len(latency.samples) != len(self.per_image_j) or not sum(latency.samples):
            return None
        return sum(self.per_image_j) / sum(latency.samples)


@dataclass(frozen=True)
class Speedup:
    value: float
    uncertainty: float | None  # 1 sigma; None when either side has one sample
    within_noise: bool | None  # None when there is no uncertainty to judge by


def within_noise(speedup: float, uncertainty: float | None, spread: float = 0.0) -> bool | None:
    """The one noise rule: a speedup within ``NOISE_SIGMAS`` sigma of 1, or within the relative
    spread of baselines measured in other runs on the same device (``spread``), says nothing."""
    if abs(speedup - 1.0) <= spread:
        return True
    if uncertainty is None:
        return None if spread == 0.0 else False
    return abs(speedup - 1.0) <= NOISE_SIGMAS * uncertainty


def speedup_of(baseline: LatencyStats, stack: LatencyStats) -> Speedup:
    """Ratio of medians and its 1-sigma uncertainty (relative spreads added in quadrature)."""
    value = baseline.median / stack.median
    if baseline.std is None or stack.std is None:
        return Speedup(value, None, None)
    sigma = value * math.hypot(baseline.std / baseline.median, stack.std / stack.median)
    return Speedup(value, sigma, within_noise(value, sigma))


def judge_metric(values: Sequence[float], higher_is_better: bool, threshold: float | None) -> dict[str, Any]:
    """A metric's summary over prompts (the worst prompt decides) and whether it meets ``threshold``.
    A value that is not a finite number (stored as null) makes the worst value NaN: a failure."""
    numbers = [math.nan if v is None else float(v) for v in values]
    if numbers and all(math.isfinite(v) for v in numbers):
        worst, mean = (min(numbers) if higher_is_better else max(numbers)), float(np.mean(numbers))
    else:
        worst = mean = math.nan
    passed = None
    if threshold is not None:
        passed = not math.isnan(worst) and (worst >= threshold if higher_is_better else worst <= threshold)
    return {"mean": mean, "worst": worst, "per_prompt": numbers, "threshold": threshold,
            "higher_is_better": higher_is_better, "passed": passed}


def gate_verdict(metrics: Mapping[str, Mapping[str, Any]], unavailable: Mapping[str, str],
                 thresholds: Mapping[str, float | None]) -> tuple[bool, str | None]:
    """The fidelity gate: every metric with a threshold meets it on the worst prompt; a metric
    that has a threshold but could not be computed fails the gate."""
    failures = []
    for name, m in metrics.items():
        if m.get("passed") is False:
            op = ">=" if m["higher_is_better"] else "<="
            failures.append(f"{name} {m['worst']:.4g} (needs {op} {m['threshold']:g})")
    for name, why in unavailable.items():
        if thresholds.get(name) is not None:
            failures.append(f"{name} has a threshold but is not available ({why})")
    return (not failures, "; ".join(failures) or None)


# --------------------------------------------------------------------------- records
@dataclass
class StackRecord:
    """One stack's measurement (``stack == "baseline"`` for the empty stack)."""

    stack: str  # "compile+fbcache" ("baseline" for the empty stack)
    status: str  # a Status value
    backends: list[str] = field(default_factory=list)
    reason: str | None = None
    phase: str | None = None  # for failures and stopped builds: a Phase value
    options: dict[str, Any] = field(default_factory=dict)
    lossless: bool | None = None
    latency: LatencyStats | None = None  # end-to-end seconds
    step_latency: LatencyStats | None = None  # seconds per denoising step
    first_call_s: float | None = None
    build_s: float | None = None
    build_phases_s: dict[str, float] = field(default_factory=dict)
    elapsed_s: float | None = None  # wall time spent on the stack (also when it failed or stopped)
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    # GPU memory the closed stack left allocated beyond what was allocated before it (a leak that
    # would inflate every later stack's peak); None on the CPU
    left_allocated_bytes: int | None = None
    speedup: float | None = None  # baseline median / stack median (derived)
    speedup_uncertainty: float | None = None  # derived
    within_noise: bool | None = None  # derived
    fidelity: dict[str, Any] | None = None  # per-metric values (raw) and the gate (derived)
    energy: Energy | None = None  # GPU board energy (None where NVML cannot read it)
    # What was measured instead of the whole backend when a backend stopped its build early
    # (e.g. trt_fp8 stop_after=onnx measures ModelOpt's fake-quantized torch model); None: the backend
    partial: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # backend-reported numbers (steps skipped...)
    profile: dict[str, Any] | None = None  # one step's breakdown (bench.profile=true)
    images: list[str] = field(default_factory=list)

    @property
    def is_baseline(self) -> bool:
        return self.stack == "baseline"

    @property
    def passed_gate(self) -> bool:
        return bool(self.fidelity and self.fidelity.get("passed"))

    def worst(self, metric: str) -> float | None:
        return (((self.fidelity or {}).get("metrics") or {}).get(metric) or {}).get("worst")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunRecord:
    """A run: the baseline and the stacks measured against it, with everything needed to
    reproduce and re-judge it (config, shapes, prompts, seed, environment, provenance)."""

    model: dict[str, Any]  # name, trained, dtype
    stacks: list[StackRecord] = field(default_factory=list)
    baseline: StackRecord | None = None
    schema_version: int = SCHEMA_VERSION
    complete: bool = False
    interrupted: bool = False
    started: str | None = None
    finished: str | None = None
    shapes: dict[str, Any] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    seed: int | None = None
    mode: str = "stack"  # "stack": the user named the stack(s); "bakeoff": every backend available
    build_only: bool = False
    requested: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)
    profile: dict[str, Any] | None = None
    job_crash: str | None = None  # why the job's process died (recorded by the launching process)
    # fluxopt.measure.PROTOCOL the figures were measured under (None: a record from before it was
    # kept, or a job that measured nothing); a run is only ever resumed under the same one
    protocol: int | None = None
    # Set by the reader, never stored: stored derived figures that disagree with the raw values
    edited: list[str] = field(default_factory=list)
    path: Path | None = None

    @property
    def device(self) -> str:
        return (self.environment.get("device") or {}).get("name") or "?"

    def failures(self) -> list[str]:
        """Why this run's verdict is negative: the baseline failed, a requested stack failed (or,
        for a stack the user named, could not run here), the run did not complete, or its stored
        figures were edited. A bake-off's skipped stacks are backends this machine cannot run:
        reported, not failures."""
        failed = []
        if self.baseline is not None and self.baseline.status == Status.FAILED.value:
            failed.append(f"baseline: {self.baseline.reason}")
        died_in = ""  # the stack a dead job was measuring: its failure is the crash, said once
        for s in self.stacks:
            if self.job_crash and (s.reason or "").startswith(INTERRUPTED):
                died_in = f" during {s.stack} ({s.phase}, after at least {s.elapsed_s or 0:.0f} s)"
            elif s.status == Status.FAILED.value or (s.status == Status.SKIPPED.value and self.mode == "stack"):
                failed.append(f"{s.stack}: {s.reason}")
        if self.job_crash:
            failed.append(f"the job's process died{died_in}: {self.job_crash}")
        elif self.interrupted:
            failed.append("the run was interrupted before its end")
        elif not self.complete:  # no signal marked it: the process was stopped without warning, or still running
            failed.append("the run did not complete (the record was last written before its end)")
        failed += [f"edited: {why}" for why in self.edited]
        return failed

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("edited", "path")}
        data["baseline"] = self.baseline.to_json() if self.baseline else None
        data["stacks"] = [s.to_json() for s in self.stacks]
        data["schema_version"] = SCHEMA_VERSION
        return data


def write_record(path: Path, record: RunRecord) -> None:
    """The one writer of ``result.json``: atomic, never half a file."""
    write_json_atomic(path, record.to_json())


# --------------------------------------------------------------------------- the reader
class UnreadableRecord(Exception):
    """A result.json that exists but is not one fluxopt can use; the message says why."""


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise UnreadableRecord(f"{path}: {what}")


def _latency(value: Any, path: Path, where: str, edited: list[str]) -> LatencyStats | None:
    """Latency statistics re-derived from the stored samples."""
    if value is None:
        return None
    _require(isinstance(value, Mapping), path, f"{where} is not an object")
    samples = value.get("samples")
    _require(isinstance(samples, list) and samples and all(
        isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0 for s in samples),
        path, f"{where} has no usable raw samples (a list of positive seconds)")
    stats = LatencyStats.from_samples(samples)
    for key in ("median", "mean", "std", "min", "max", "p90", "n"):
        if key in value and not _same(value[key], getattr(stats, key)):
            edited.append(f"{where}.{key} {value[key]!r} is not {getattr(stats, key)!r} from its samples")
    return stats


def _energy(value: Any, path: Path, where: str, latency: LatencyStats | None) -> Energy | None:
    """The energy block: non-negative joules, one per timed generation."""
    if value is None:
        return None

    def joules(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0

    _require(isinstance(value, Mapping) and set(value) <= {"per_image_j", "warmup_j", "build_j"}, path,
             f"{where} is not an object of per_image_j, warmup_j, build_j")
    samples = value.get("per_image_j")
    _require(isinstance(samples, list) and samples and all(joules(x) for x in samples), path,
             f"{where}.per_image_j is not a list of joules")
    _require(latency is None or len(samples) == latency.n, path,
             f"{where}.per_image_j has {len(samples)} samples for {latency and latency.n} timed generations")
    for key in ("warmup_j", "build_j"):
        _require(value.get(key) is None or joules(value[key]), path, f"{where}.{key} is not joules")
    return Energy(per_image_j=[float(x) for x in samples], warmup_j=value.get("warmup_j"),
                  build_j=value.get("build_j"))


def _same(stored: Any, derived: Any) -> bool:
    if isinstance(stored, bool) or isinstance(derived, bool):  # 0 is not False, 1 is not True
        return type(stored) is type(derived) and stored == derived
    if stored is None or derived is None:
        return stored is derived
    if not isinstance(stored, (int, float)) or not isinstance(derived, (int, float)):
        return stored == derived
    if isinstance(derived, float) and math.isnan(derived):
        return stored is None or (isinstance(stored, float) and math.isnan(stored))
    return math.isclose(stored, derived, rel_tol=_REL_TOL, abs_tol=1e-12)


def _fidelity(value: Any, path: Path, where: str, edited: list[str]) -> dict[str, Any] | None:
    """The fidelity block with every metric's worst/mean/passed and the gate re-derived."""
    if value is None:
        return None
    _require(isinstance(value, Mapping), path, f"{where} is not an object")
    fidelity = dict(value)
    metrics = fidelity.get("metrics") or {}
    _require(isinstance(metrics, Mapping), path, f"{where}.metrics is not an object")
    derived: dict[str, Any] = {}
    for name, m in metrics.items():
        _require(isinstance(m, Mapping) and isinstance(m.get("per_prompt"), list) and m["per_prompt"]
                 and isinstance(m.get("higher_is_better"), bool), path,
                 f"{where}.metrics.{name} has no per-prompt values")
        threshold = m.get("threshold")
        _require(threshold is None or (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)),
                 path, f"{where}.metrics.{name}.threshold is not a number")
        d = judge_metric(m["per_prompt"], m["higher_is_better"], threshold)
        for key in ("worst", "mean", "passed"):
            if key in m and not _same(m[key], d[key]):
                edited.append(f"{where}.metrics.{name}.{key} {m[key]!r} is not {d[key]!r} from its values")
        derived[name] = d
    unavailable = fidelity.get("unavailable") or {}
    thresholds = {name: m["threshold"] for name, m in derived.items()}
    thresholds.update(fidelity.get("thresholds") or {})
    if fidelity.get("non_finite"):
        passed, reason = False, fidelity.get("reason")
    else:
        passed, reason = gate_verdict(derived, unavailable, thresholds)
    if fidelity.get("passed") is not passed:
        edited.append(f"{where}.passed {fidelity.get('passed')!r} is not {passed!r} from its metrics")
    fidelity.update(metrics=derived, passed=passed, reason=reason)
    return fidelity


def _stack(value: Any, path: Path, where: str, baseline: StackRecord | None, edited: list[str],
           gates: Mapping[str, Any] | None = None) -> StackRecord:
    _require(isinstance(value, Mapping), path, f"{where} is not an object")
    _require(isinstance(value.get("stack"), str), path, f"{where} has no 'stack' name")
    _require(value.get("status") in {s.value for s in Status}, path,
             f"{where} has status {value.get('status')!r} (ok, failed or skipped)")
    known = {f.name for f in dataclasses.fields(StackRecord)}
    unknown = sorted(set(value) - known)
    _require(not unknown, path, f"{where} has unknown fields {unknown}")
    name = value["stack"]
    fields = dict(value)
    fields["latency"] = _latency(value.get("latency"), path, f"{name}.latency", edited)
    fields["step_latency"] = _latency(value.get("step_latency"), path, f"{name}.step_latency", edited)
    fields["fidelity"] = _fidelity(value.get("fidelity"), path, f"{name}.fidelity", edited)
    fields["energy"] = _energy(value.get("energy"), path, f"{name}.energy", fields["latency"])
    record = StackRecord(**fields)
    if record.is_baseline:
        return record
    if gates and record.fidelity and record.lossless is not None:
        kind = "lossless" if record.lossless else "lossy"
        configured = gates.get(kind) or {}
        for metric, m in record.fidelity["metrics"].items():
            if m["threshold"] is not None and not _same(m["threshold"], configured.get(metric)):
                edited.append(f"{name}.fidelity.metrics.{metric}.threshold {m['threshold']!r} is not the "
                              f"configured fidelity.{kind}.{metric}={configured.get(metric)!r}")
    derived = (speedup_of(baseline.latency, record.latency)
               if baseline is not None and baseline.latency and record.latency else None)
    for key, now in (("speedup", derived and derived.value), ("speedup_uncertainty", derived and derived.uncertainty),
                     ("within_noise", derived and derived.within_noise)):
        if not _same(value.get(key), now):
            edited.append(f"{name}.{key} {value.get(key)!r} is not {now!r} from the samples")
        setattr(record, key, now)
    if record.fidelity is not None and record.status != Status.SKIPPED.value:
        gate_failed = not record.fidelity["passed"]
        stored_fidelity_failure = record.status == Status.FAILED.value and record.phase == Phase.FIDELITY.value
        if gate_failed and record.status == Status.OK.value:
            edited.append(f"{name}.status 'ok' but its fidelity gate fails ({record.fidelity['reason']})")
            record.status, record.phase = Status.FAILED.value, Phase.FIDELITY.value
            record.reason = f"fidelity: {record.fidelity['reason']}"
        elif not gate_failed and stored_fidelity_failure:
            edited.append(f"{name}.status 'failed' for fidelity but its metrics pass the gate")
    return record


def _from_schema_1(data: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-1 record as a later schema writes it: from a single timed sample, schema 1 stored
    a std of 0.0, and so a speedup uncertainty of 0.0 and within_noise False, where no spread can
    be estimated and later schemas store None; left as they were, they would read as edited."""
    def single(value: Any) -> bool:
        return isinstance(value, Mapping) and value.get("n") == 1

    def stack(value: Any, baseline: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        value = {**value, **{k: {**value[k], "std": None} for k in ("latency", "step_latency")
                             if single(value.get(k)) and value[k].get("std") == 0.0}}
        if (single(value.get("latency")) or single((baseline or {}).get("latency"))) \
                and value.get("speedup_uncertainty") == 0.0:
            value.update(speedup_uncertainty=None, within_noise=None)
        return value

    upgraded = dict(data)
    baseline = data.get("baseline") if isinstance(data.get("baseline"), Mapping) else None
    if "baseline" in data:
        upgraded["baseline"] = stack(data["baseline"], None)
    if isinstance(data.get("stacks"), list):
        upgraded["stacks"] = [stack(s, baseline) for s in data["stacks"]]
    return upgraded


def record_from_json(data: Any, path: Path = Path(RESULT_FILE)) -> RunRecord:
    """Validate a parsed result.json and re-derive its figures (see the module docstring)."""
    _require(isinstance(data, Mapping), path, "is not a fluxopt result (expected a JSON object)")
    _require(data.get("schema_version") in READABLE_SCHEMAS, path,
             f"has schema_version {data.get('schema_version')!r}, this fluxopt reads "
             f"{', '.join(map(str, READABLE_SCHEMAS))}")
    if data.get("schema_version") == 1:
        data = _from_schema_1(data)
    _require(isinstance(data.get("stacks"), list), path, "has no 'stacks' list")
    model = data.get("model")
    _require(isinstance(model, Mapping) and isinstance(model.get("name"), str), path, "has no model name")
    known = {f.name for f in dataclasses.fields(RunRecord)} - {"edited", "path"}
    unknown = sorted(set(data) - known)
    _require(not unknown, path, f"has unknown fields {unknown}")
    protocol = data.get("protocol")
    _require(protocol is None or (isinstance(protocol, int) and not isinstance(protocol, bool) and protocol >= 1),
             path, f"has protocol {protocol!r}, not a measurement protocol number")
    edited: list[str] = []
    baseline = _stack(data["baseline"], path, "baseline", None, edited) if data.get("baseline") else None
    gates = ((data.get("config") or {}).get("fidelity") or None) if isinstance(data.get("config"), Mapping) else None
    stacks = [_stack(s, path, f"stacks[{i}]", baseline, edited, gates) for i, s in enumerate(data["stacks"])]
    fields = {k: v for k, v in data.items() if k not in ("baseline", "stacks")}
    for key in ("shapes", "config", "provenance", "environment"):
        _require(isinstance(fields.get(key) or {}, Mapping), path, f"'{key}' is not an object")
        fields[key] = dict(fields.get(key) or {})
    return RunRecord(**fields, baseline=baseline, stacks=stacks, edited=edited, path=path)


def read_record(path: Path) -> RunRecord | None:
    """The one reader: the record at ``path`` (complete or not), None when there is none;
    :class:`UnreadableRecord` saying why when it cannot be used."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableRecord(f"{path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UnreadableRecord(f"{path}: not valid JSON ({exc})") from None
    try:
        return record_from_json(data, path)
    except (TypeError, ValueError, KeyError) as exc:  # a field of the wrong shape
        raise UnreadableRecord(f"{path}: a field has the wrong shape ({type(exc).__name__}: {exc})") from None
