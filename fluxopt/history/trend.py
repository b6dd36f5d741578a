"""A stack's speed over time: per-step latency and speedup against its run's baseline, run after
run, with the date, fluxopt revision and torch version of each (``fluxopt-report history``).

One series per stack name, shapes, model and device, runs in the order they started; a stack's
options are shown per run (a digest), since options gain fields as fluxopt grows and a series
should survive that, while ``compare`` matches options exactly. The figures are the reader's, re-derived from each stored record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fluxopt.files import save_figure_atomic
from fluxopt.history.store import StoredRun, match_key

AXES = ("date", "revision", "torch")


@dataclass(frozen=True)
class Point:
    started: str
    revision: str
    torch: str
    label: str
    step_ms: float | None
    speedup: float | None
    passed: bool | None
    options: str

    def axis(self, by: str) -> str:
        return {"date": self.started[:16].replace("T", " "), "revision": self.revision, "torch": self.torch}[by]


def series(runs: Sequence[StoredRun], stack: str | None = None, model: str | None = None,
           device: str | None = None) -> dict[str, list[Point]]:
    """Points per stack (named with its model, device and shapes), filtered by the arguments given."""
    found: dict[str, list[Point]] = {}
    for run in runs:
        r = run.record
        if (model and r.model.get("name") != model) or (device and device.lower() not in r.device.lower()):
            continue
        env = r.environment
        for s in ([r.baseline] if r.baseline else []) + list(r.stacks):
            if (stack and s.stack != stack) or s.latency is None:
                continue
            steps = r.shapes.get("steps") or 1
            step_ms = (s.step_latency.median if s.step_latency else s.latency.median / steps) * 1e3
            key = json.loads(match_key(r, s))
            name = (f"{s.stack} · {key['model']} · {key['device']} · "
                    f"{r.shapes.get('width')}x{r.shapes.get('height')}x{steps}")
            found.setdefault(name, []).append(Point(
                started=r.started or run.added, revision=((env.get("git") or {}).get("revision") or "?")[:9],
                torch=(env.get("packages") or {}).get("torch") or "?", label=run.label or "",
                step_ms=step_ms, speedup=s.speedup, passed=None if s.is_baseline else s.passed_gate,
                options=_short_hash(s.options) if s.options else "—"))
    return found


def _short_hash(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:6]


def render_markdown(found: dict[str, list[Point]], by: str = "date") -> str:
    lines = ["# fluxopt history", ""]
    for name, points in found.items():
        lines += [f"## {name}", "", f"| {by} | label | revision | torch | options | per step | speedup | gate |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in points:
            speedup = "—" if p.speedup is None else f"{p.speedup:.2f}x"
            gate = {True: "pass", False: "FAIL", None: "—"}[p.passed]
            lines.append(f"| {p.axis(by)} | {p.label or '—'} | {p.revision} | {p.torch} | {p.options} | "
                         f"{p.step_ms:.4g} ms | {speedup} | {gate} |")
        lines.append("")
    return "\n".join(lines)


def plot(found: dict[str, list[Point]], path: Path, by: str = "date") -> Path:
    """Two panels over the runs (in order, labelled by ``by``): per-step latency and speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    ticks: list[str] = []
    for name, points in found.items():
        xs = []
        for p in points:
            tick = p.axis(by)
            if tick not in ticks:
                ticks.append(tick)
            xs.append(ticks.index(tick))
        top.plot(xs, [p.step_ms for p in points], marker="o", label=name)
        with_speedup = [(x, p.speedup) for x, p in zip(xs, points) if p.speedup is not None]
        if with_speedup:
            bottom.plot(*zip(*with_speedup), marker="o", label=name)
    top.set_ylabel("per-step latency (ms)")
    bottom.set_ylabel("speedup vs its run's baseline")
    bottom.axhline(1.0, color="grey", lw=0.8)
    bottom.set_xticks(range(len(ticks)), ticks, rotation=30, ha="right", fontsize=8)
    bottom.set_xlabel(by)
    top.legend(fontsize=7, loc="best")
    top.set_title("fluxopt history")
    fig.tight_layout()
    save_figure_atomic(path, fig)
    plt.close(fig)
    return path
