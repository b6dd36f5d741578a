"""Fidelity: how far a stack's outputs are from the baseline's for the same prompts and seeds.

Metrics are plugins (``fluxopt_metrics``). Each compares one reference sample with one
candidate; a run passes when every metric with a threshold passes on every prompt (the worst
prompt decides). Lossless and lossy stacks have separate thresholds. A non-finite output is a
failure with its reason, never a crash.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fluxopt.errors import UnavailableError
from fluxopt.hookspecs import hookimpl
from fluxopt.measure import Sample

PSNR_IDENTICAL = 100.0  # dB reported for bit-identical images (PSNR is infinite there)


@dataclass(frozen=True)
class Metric:
    name: str
    compute: Callable[[Sample, Sample], float]  # (reference, candidate) -> value
    higher_is_better: bool
    description: str


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
        Metric("psnr", psnr, True, "peak signal-to-noise ratio of the decoded image, dB (100 = identical)"),
        Metric("ssim", ssim, True, "structural similarity of the decoded image (1 = identical)"),
        Metric("latent_rel_l2", latent_rel_l2, False, "||latents - baseline|| / ||baseline|| after the last step"),
    ]


def _finite(sample: Sample) -> bool:
    return bool(np.isfinite(sample.image).all() and torch.isfinite(sample.latents).all())


def evaluate(reference: Sequence[Sample], candidate: Sequence[Sample], metrics: Mapping[str, Metric],
             thresholds: Mapping[str, float]) -> dict[str, Any]:
    """Per-metric mean and worst value over prompts, each checked against its threshold."""
    if len(reference) != len(candidate):
        raise ValueError("reference and candidate have different numbers of samples")
    bad = [c.prompt for c in candidate if not _finite(c)]
    if bad:
        return {"passed": False, "reason": f"non-finite values (NaN/inf) in the output for prompt(s) {bad}",
                "metrics": {}}
    report: dict[str, Any] = {"passed": True, "reason": None, "metrics": {}, "unavailable": {}}
    failures = []
    for name, metric in metrics.items():
        try:
            values = [metric.compute(r, c) for r, c in zip(reference, candidate, strict=True)]
        except UnavailableError as exc:  # e.g. its weights are not on this machine
            report["unavailable"][name] = str(exc)
            if thresholds.get(name) is not None:  # a gate that cannot be judged is not passed
                failures.append(f"{name} has a threshold but is not available ({exc})")
            continue
        worst = min(values) if metric.higher_is_better else max(values)
        threshold = thresholds.get(name)
        passed = None
        if threshold is not None:
            passed = not math.isnan(worst) and (worst >= threshold if metric.higher_is_better else worst <= threshold)
            if not passed:
                op = ">=" if metric.higher_is_better else "<="
                failures.append(f"{name} {worst:.4g} (needs {op} {threshold:g})")
        report["metrics"][name] = {"mean": float(np.mean(values)), "worst": worst, "per_prompt": values,
                                   "threshold": threshold, "higher_is_better": metric.higher_is_better,
                                   "passed": passed}
    if failures:
        report["passed"] = False
        report["reason"] = "; ".join(failures)
    return report
