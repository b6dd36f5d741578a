"""Fidelity: how far a stack's outputs are from the baseline's for the same prompts and seeds.

Metrics are plugins (``fluxopt_metrics``). Each compares one reference sample with one
candidate; a run passes when every metric with a threshold passes on every prompt (the worst
prompt decides). Lossless and lossy stacks have separate thresholds. A non-finite output is a
failure with its reason, never a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fluxopt.errors import UnavailableError
from fluxopt.measure import Sample
from fluxopt.record import gate_verdict, judge_metric



@dataclass(frozen=True)
class Metric:
    """A fidelity metric. ``bounds`` (lowest, highest value it can take; None: unbounded) lets a
    threshold that can never be met be refused before a run; ``unavailable()`` says why it cannot
    be computed on this machine (None: it can), so a threshold on it is refused before a run too."""

    name: str
    compute: Callable[[Sample, Sample], float]  # (reference, candidate) -> value
    higher_is_better: bool
    description: str
    bounds: tuple[float | None, float | None] = (None, None)
    unavailable: Callable[[], str | None] = lambda: None

    def impossible_threshold(self, threshold: float) -> str | None:
        """Why ``threshold`` can never be met (or judged) here, None when it can."""
        low, high = self.bounds
        if self.higher_is_better and high is not None and threshold > high:
            return f"{self.name} is at most {high:g}, so a threshold of {threshold:g} can never pass"
        if not self.higher_is_better and low is not None and threshold < low:
            return f"{self.name} is at least {low:g}, so a threshold of {threshold:g} can never pass"
        why = self.unavailable()
        return None if why is None else f"{self.name} cannot be computed here ({why})"


def _finite(sample: Sample) -> bool:
    return bool(np.isfinite(sample.image).all() and torch.isfinite(sample.latents).all())


def evaluate(reference: Sequence[Sample], candidate: Sequence[Sample], metrics: Mapping[str, Metric],
             thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Every metric's value per prompt, summarised and judged by :mod:`fluxopt.record` (the one
    place a gate verdict is derived, for the runner and for a reader checking a stored record)."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate have different numbers of samples")
    thresholds = {name: float(value) for name, value in thresholds.items()}
    bad = [c.prompt for c in candidate if not _finite(c)]
    if bad:
        return {"passed": False, "reason": f"non-finite values (NaN/inf) in the output for prompt(s) {bad}",
                "non_finite": True, "metrics": {}, "unavailable": {}, "thresholds": thresholds}
    results: dict[str, Any] = {}
    unavailable: dict[str, str] = {}
    for name, metric in metrics.items():
        try:
            values = [metric.compute(r, c) for r, c in zip(reference, candidate, strict=True)]
        except UnavailableError as exc:  # e.g. its weights are not on this machine
            unavailable[name] = str(exc)
            continue
        results[name] = judge_metric(values, metric.higher_is_better, thresholds.get(name))
    passed, reason = gate_verdict(results, unavailable, thresholds)
    return {"passed": passed, "reason": reason, "metrics": results, "unavailable": unavailable,
            "thresholds": thresholds}
