"""Two sets of runs compared stack by stack: what got slower, faster or lost its fidelity.

Stacks are matched by stack, options, shapes, model and device (:func:`match_key`); several runs
of one stack on one side pool their per-iteration samples. Per matched stack:

- **speed**: the ratio of medians, median(B) / median(A) of the end-to-end latency per generation
  (above 1: B is slower), with a percentile-bootstrap confidence interval from resampling both
  sides' samples. Runs of one stack differ by a few percent between processes even on a quiet
  machine, while the interval measures only the spread within a run; so the threshold
  ``max_regression`` stands for the noise between runs, and the verdict needs both: *slower* when
  the whole interval lies above 1 + ``max_regression``, *faster* when it lies below
  1 - ``max_regression``, otherwise *same within noise*. One sample on a side measures no spread:
  the ratio alone is compared with the same bounds.
- **regression**: slower as above; a fidelity gate that passed in A and fails in B; or a stack that
  ran in A and failed before it was timed in B.

Every stack of one side without a match on the other is listed, never dropped. The figures come
from records read through the one reader, so they are re-derived from the samples.
"""

from __future__ import annotations

import enum
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fluxopt.history.store import match_key
from fluxopt.record import RunRecord, StackRecord, Status

DEFAULT_MAX_REGRESSION = 0.05  # slower by more than 5 % fails the comparison
CONFIDENCE = 0.95
RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # the bootstrap is seeded: the same inputs give the same interval


@dataclass(frozen=True)
class RatioEstimate:
    """median(B) / median(A) and its bootstrap confidence interval [low, high]."""

    ratio: float
    low: float
    high: float
    n_a: int
    n_b: int

    @property
    def spread_measured(self) -> bool:
        return self.n_a > 1 and self.n_b > 1


def ratio_of_medians(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE,
                     resamples: int = RESAMPLES) -> RatioEstimate:
    """The ratio of medians of ``b`` over ``a`` with a percentile-bootstrap interval: both samples
    are resampled with replacement ``resamples`` times and the ratio's ``confidence`` central
    interval taken."""
    xa, xb = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if not len(xa) or not len(xb):
        raise ValueError("a ratio of medians needs samples on both sides")
    ratio = float(np.median(xb) / np.median(xa))
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    boot_a = np.median(xa[rng.integers(0, len(xa), (resamples, len(xa)))], axis=1)
    boot_b = np.median(xb[rng.integers(0, len(xb), (resamples, len(xb)))], axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot_b / boot_a, [tail, 1.0 - tail])
    return RatioEstimate(ratio, float(low), float(high), len(xa), len(xb))


class Speed(str, enum.Enum):
    FASTER = "faster"
    SLOWER = "slower"
    SAME = "same within noise"


def speed_verdict(estimate: RatioEstimate, max_regression: float) -> tuple[Speed, bool]:
    """Faster, slower or the same within noise, and whether it is a regression (see the module
    docstring: the interval, or the ratio for one sample, beyond 1 -/+ the threshold)."""
    low, high = (estimate.low, estimate.high) if estimate.spread_measured else (estimate.ratio, estimate.ratio)
    speed = (Speed.SLOWER if low > 1.0 + max_regression else
             Speed.FASTER if high < 1.0 - max_regression else Speed.SAME)
    return speed, speed is Speed.SLOWER


@dataclass
class Measurements:
    """One stack's measurements on one side (one per run that measured it)."""

    stacks: list[StackRecord] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def samples(self) -> list[float]:
        return [x for s in self.stacks if s.latency for x in s.latency.samples]

    @property
    def gate(self) -> bool | None:
        """Passed in every run that judged it (None: never judged, e.g. the baseline)."""
        judged = [s.fidelity["passed"] for s in self.stacks if s.fidelity is not None]
        return all(judged) if judged else None

    def worst(self, metric: str) -> float | None:
        values = [v for s in self.stacks if (v := s.worst(metric)) is not None]
        return (min(values) if self.higher_is_better(metric) else max(values)) if values else None

    def higher_is_better(self, metric: str) -> bool:
        for s in self.stacks:
            m = ((s.fidelity or {}).get("metrics") or {}).get(metric)
            if m:
                return bool(m["higher_is_better"])
        return True

    def metrics(self) -> list[str]:
        return sorted({name for s in self.stacks for name in ((s.fidelity or {}).get("metrics") or {})})

    @property
    def speedup(self) -> float | None:
        values = [s.speedup for s in self.stacks if s.speedup is not None]
        return statistics.median(values) if values else None

    @property
    def failed_untimed(self) -> str | None:
        """Why it never got timed on this side (every run failed before timing), else None."""
        if self.samples:
            return None
        reasons = [s.reason or s.status for s in self.stacks]
        return "; ".join(dict.fromkeys(reasons)) or "not measured"


@dataclass
class StackComparison:
    """One matched stack: its identity, both sides' measurements and the verdict."""

    key: dict[str, Any]
    a: Measurements
    b: Measurements
    estimate: RatioEstimate | None = None
    speed: Speed | None = None
    regressions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.key["stack"]

    def to_json(self) -> dict[str, Any]:
        est = self.estimate
        return {
            **self.key,
            "runs": {"a": len(self.a.runs), "b": len(self.b.runs)},
            "median_s": {"a": _median(self.a.samples), "b": _median(self.b.samples)},
            "ratio": est and {"value": est.ratio, "low": est.low, "high": est.high, "confidence": CONFIDENCE,
                              "n_a": est.n_a, "n_b": est.n_b},
            "speed": self.speed and self.speed.value,
            "gate": {"a": self.a.gate, "b": self.b.gate},
            "fidelity": {m: {"a": self.a.worst(m), "b": self.b.worst(m)}
                         for m in sorted(set(self.a.metrics()) | set(self.b.metrics()))},
            "speedup": {"a": self.a.speedup, "b": self.b.speedup},
            "regressions": self.regressions,
            "notes": self.notes,
        }


def _median(xs: Sequence[float]) -> float | None:
    return statistics.median(xs) if xs else None


@dataclass
class Comparison:
    """Every matched stack, and what could not be matched or used."""

    a_name: str
    b_name: str
    max_regression: float
    stacks: list[StackComparison] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[str]:
        return [f"{c.name}: {why}" for c in self.stacks for why in c.regressions]

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a_name, "b": self.b_name, "max_regression": self.max_regression,
                "stacks": [c.to_json() for c in self.stacks], "only_in_a": self.only_a, "only_in_b": self.only_b,
                "unusable": self.unusable, "regressions": self.regressions}


def _describe(key: dict[str, Any]) -> str:
    shapes = key.get("shapes") or {}
    size = (f"{shapes.get('width')}x{shapes.get('height')}, {shapes.get('steps')} steps"
            if shapes.get("width") else json.dumps(shapes, sort_keys=True))
    return f"{key['stack']} ({key['model']} on {key['device']}, {size})"


def _by_key(records: Sequence[RunRecord], names: Sequence[str]) -> dict[str, Measurements]:
    found: dict[str, Measurements] = {}
    for record in records:
        for stack in ([record.baseline] if record.baseline else []) + list(record.stacks):
            if stack.status == Status.SKIPPED.value or (names and stack.stack not in names):
                continue
            m = found.setdefault(match_key(record, stack), Measurements())
            m.stacks.append(stack)
            m.runs.append(record)
    return found


def compare(a: Sequence[RunRecord], b: Sequence[RunRecord], a_name: str = "A", b_name: str = "B",
            max_regression: float = DEFAULT_MAX_REGRESSION, stacks: Sequence[str] = ()) -> Comparison:
    """Match the stacks of ``a`` and ``b`` (only those named in ``stacks``, when given) and judge
    each (see the module docstring)."""
    if not max_regression >= 0:
        raise ValueError(f"max_regression={max_regression} is not a fraction >= 0")
    side_a, side_b = _by_key(a, stacks), _by_key(b, stacks)
    result = Comparison(a_name, b_name, max_regression)
    result.only_a = [_describe(json.loads(k)) for k in side_a if k not in side_b]
    result.only_b = [_describe(json.loads(k)) for k in side_b if k not in side_a]
    for key in (k for k in side_a if k in side_b):
        c = StackComparison(json.loads(key), side_a[key], side_b[key])
        broke_a, broke_b = c.a.failed_untimed, c.b.failed_untimed
        if broke_a is None and broke_b is not None:
            c.regressions.append(f"ran in {a_name}, failed in {b_name} before it was timed ({broke_b})")
        elif broke_a is not None and broke_b is None:
            c.notes.append(f"failed in {a_name} before it was timed ({broke_a}), runs in {b_name}")
        elif broke_a is not None:
            c.notes.append(f"not timed in either ({a_name}: {broke_a}; {b_name}: {broke_b})")
        else:
            c.estimate = ratio_of_medians(c.a.samples, c.b.samples)
            c.speed, regressed = speed_verdict(c.estimate, max_regression)
            if regressed:
                c.regressions.append(f"{(c.estimate.ratio - 1) * 100:.1f} % slower (median latency "
                                     f"{_median(c.a.samples):.4g} s -> {_median(c.b.samples):.4g} s; more than "
                                     f"{max_regression * 100:g} % with {CONFIDENCE:.0%} confidence)")
            if not c.estimate.spread_measured:
                c.notes.append("one sample on a side: no noise estimate, judged by the threshold alone")
        if c.a.gate is True and c.b.gate is False:
            failing = next((s.fidelity["reason"] for s in c.b.stacks if s.fidelity and not s.fidelity["passed"]), "")
            c.regressions.append(f"fidelity gate passed in {a_name}, fails in {b_name} ({failing})")
        elif c.a.gate is False and c.b.gate is True:
            c.notes.append(f"fidelity gate failed in {a_name}, passes in {b_name}")
        result.stacks.append(c)
    return result


def _fmt_ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1e3:.4g} ms"


def render_markdown(comparison: Comparison) -> str:
    """The comparison as a markdown page: one table per model/device/shapes, then what was not
    matched or used, then the verdict."""
    c = comparison
    lines = [f"# fluxopt compare: {c.a_name} → {c.b_name}", ""]
    groups: dict[str, list[StackComparison]] = {}
    for s in c.stacks:
        groups.setdefault(_describe({**s.key, "stack": ""}).strip(), []).append(s)
    for where, rows in groups.items():
        lines += [f"## {where.strip('() ')}", "",
                  f"| stack | {c.a_name} median | {c.b_name} median | B/A ({CONFIDENCE:.0%} CI) | speed | fidelity gate "
                  "| worst fidelity | speedup vs baseline | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            est = s.estimate
            ratio = f"{est.ratio:.3f} [{est.low:.3f}, {est.high:.3f}]" if est else "—"
            gate = "—" if s.a.gate is None and s.b.gate is None else f"{_gate(s.a.gate)} → {_gate(s.b.gate)}"
            fidelity = ", ".join(f"{m} {_num(s.a.worst(m))} → {_num(s.b.worst(m))}"
                                 for m in sorted(set(s.a.metrics()) & set(s.b.metrics())))
            speedup = f"{_x(s.a.speedup)} → {_x(s.b.speedup)}"
            verdict = "REGRESSION: " + "; ".join(s.regressions) if s.regressions else "ok"
            if s.notes:
                verdict += " (" + "; ".join(s.notes) + ")"
            lines.append(f"| {s.name} | {_fmt_ms(_median(s.a.samples))} | {_fmt_ms(_median(s.b.samples))} | {ratio} "
                         f"| {s.speed.value if s.speed else '—'} | {gate} | {fidelity or '—'} | {speedup} | {verdict} |")
        lines.append("")
    for title, items in ((f"Only in {c.a_name}", c.only_a), (f"Only in {c.b_name}", c.only_b),
                         ("Not used", c.unusable)):
        if items:
            lines += [f"## {title}", ""] + [f"- {item}" for item in items] + [""]
    lines.append(f"**{len(c.regressions)} regression(s)** beyond {c.max_regression * 100:g} % or a fidelity gate "
                 f"lost, over {len(c.stacks)} matched stack(s)." if c.regressions else
                 f"**No regression** over {len(c.stacks)} matched stack(s) (threshold {c.max_regression * 100:g} %).")
    return "\n".join(lines) + "\n"


def _gate(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL", None: "—"}[passed]


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.4g}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"
