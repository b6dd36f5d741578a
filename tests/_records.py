"""Honest records for tests: every derived figure computed by fluxopt.record from raw samples
and metric values, so the one reader accepts them unedited."""

from __future__ import annotations

from fluxopt.record import LatencyStats, RunRecord, StackRecord, gate_verdict, judge_metric, speedup_of

GIB = 2**30
BASELINE_S = (1.0, 1.02, 0.98)


def fidelity(psnr: float | None, threshold: float = 20.0) -> dict:
    metrics = {} if psnr is None else {"psnr": judge_metric([psnr, psnr + 1.0], True, threshold)}
    passed, reason = gate_verdict(metrics, {}, {"psnr": threshold})
    return {"passed": passed, "reason": reason, "metrics": metrics, "unavailable": {}, "thresholds": {"psnr": threshold}}


def stack(name: str, speedup: float | None, psnr: float | None = 40.0, peak_gib: float | None = 1.0,
          status: str = "ok", options: dict | None = None, threshold: float = 20.0, reason: str | None = None,
          partial: str | None = None) -> StackRecord:
    """A stack measured at ``speedup`` against :data:`BASELINE_S`; a PSNR under ``threshold`` fails its gate."""
    backends = name.split("+")
    record = StackRecord(stack=name, backends=backends, status=status, reason=reason, lossless=False,
                         options=options or {b: {} for b in backends}, partial=partial,
                         peak_memory_bytes=None if peak_gib is None else int(peak_gib * GIB))
    if speedup is not None and status == "ok":
        median = sorted(BASELINE_S)[1] / speedup
        record.latency = LatencyStats.from_samples([median * 1.01, median, median * 0.99])
        s = speedup_of(LatencyStats.from_samples(BASELINE_S), record.latency)
        record.speedup, record.speedup_uncertainty, record.within_noise = s.value, s.uncertainty, s.within_noise
        record.fidelity = fidelity(psnr, threshold)
        if not record.fidelity["passed"]:
            record.status, record.phase = "failed", "fidelity"
            record.reason = f"fidelity: {record.fidelity['reason']}"
    return record


def run(stacks: list[StackRecord], model: str = "flux-mini", overrides: list[str] | None = None, **fields) -> RunRecord:
    baseline = StackRecord(stack="baseline", backends=[], status="ok", lossless=True,
                           latency=LatencyStats.from_samples(BASELINE_S))
    defaults = {"complete": True, "mode": "bakeoff", "shapes": {"height": 256, "width": 256, "steps": 8,
                                                                "guidance_scale": 3.5, "max_sequence_length": 64},
                "provenance": {"overrides": overrides if overrides is not None else
                               ["model=flux-mini", "bench.iterations=5", "hydra.run.dir=x"]},
                "requested": [s.stack for s in stacks]}
    return RunRecord(model={"name": model, "trained": True}, baseline=baseline, stacks=list(stacks),
                     **{**defaults, **fields})
