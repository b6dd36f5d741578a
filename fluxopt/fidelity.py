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
from fluxopt.hookspecs import hookimpl
from fluxopt.measure import Sample
from fluxopt.record import gate_verdict, judge_metric

PSNR_IDENTICAL = 100.0  # dB reported for bit-identical images (PSNR is infinite there)


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


def psnr(ref: Sample, out: Sample) -> float:
    if np.array_equal(ref.image, out.image):
        return PSNR_IDENTICAL
    from skimage.metrics import peak_signal_noise_ratio  # scipy.stats: ~1 s, not before a comparison

    return min(float(peak_signal_noise_ratio(ref.image, out.image, data_range=1.0)), PSNR_IDENTICAL)


def ssim(ref: Sample, out: Sample) -> float:
    side = min(ref.image.shape[:2])
    win = min(7, side if side % 2 else side - 1)
    from skimage.metrics import structural_similarity

    return float(structural_similarity(ref.image, out.image, channel_axis=2, data_range=1.0, win_size=win))


def latent_rel_l2(ref: Sample, out: Sample) -> float:
    a, b = ref.latents.double(), out.latents.double()
    return float(torch.linalg.vector_norm(b - a) / torch.linalg.vector_norm(a).clamp_min(1e-12))


@hookimpl
def fluxopt_metrics() -> list[Metric]:
    return [
        Metric("psnr", psnr, True, "peak signal-to-noise ratio of the decoded image, dB (100 = identical)",
               bounds=(0.0, PSNR_IDENTICAL)),
        Metric("ssim", ssim, True, "structural similarity of the decoded image (1 = identical)", bounds=(-1.0, 1.0)),
        Metric("latent_rel_l2", latent_rel_l2, False, "||latents - baseline|| / ||baseline|| after the last step",
               bounds=(0.0, None)),
    ]


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
