"""The Sweep concept: many runs (Hydra multirun jobs, or the stacks of one bake-off) gathered
into one comparison: ``summary.{md,csv,json}``, ``speedup_vs_fidelity.png`` and ``grid.png``.

Everything is rebuilt from the ``result.json`` files alone, so ``fluxopt-report DIR`` can
regenerate a summary after the fact (or while a sweep is still running).
"""

from __future__ import annotations

import csv
import io
import os
import statistics
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fluxopt.report import environment_lines, fidelity_note, markdown_table, stack_row
from fluxopt.environment import INVOCATION_ENV
from fluxopt.files import save_figure_atomic, write_json_atomic, write_text_atomic
from fluxopt.launch import writes_results
from fluxopt.result import RESULT_FILE, UnreadableResult, load_result
from fluxopt.runner import run_failed

SUMMARY_COLUMNS = ("stack", "status", "latency (s)", "per step (ms)", "speedup", "build (s)", "warm start",
                   "first call (s)", "peak mem (GiB)", "steps skipped", "PSNR", "SSIM", "latent err", "fidelity", "device", "run")


def collect(root: Path) -> tuple[list[tuple[Path, dict[str, Any]]], list[Path]]:
    """Every readable result.json below ``root`` (complete or not: an interrupted job's stacks
    are shown with the job marked incomplete), and the paths that could not be read."""
    found, unreadable = [], []
    for path in sorted(root.rglob(RESULT_FILE)):
        try:
            data = load_result(path)
        except UnreadableResult:
            unreadable.append(path)
            continue
        if data is not None:
            found.append((path.parent, data))
    return found, unreadable


def failures(results: list[tuple[Path, dict[str, Any]]], invocation: str | None = None) -> list[str]:
    """Why the sweep's verdict is negative: every job whose requested stack failed or did not
    finish; with ``invocation``, only the jobs that command ran (a sweep directory reused to
    finish an earlier sweep also holds older jobs)."""
    return [f"{run_dir.name}: {why}" for run_dir, data in results
            if invocation is None or (data.get("provenance") or {}).get("invocation") == invocation
            for why in run_failed(data)]


def _device(data: dict[str, Any]) -> str:
    return (data.get("environment") or {}).get("device", {}).get("name") or "?"


def baseline_spread(results: list[tuple[Path, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per device: baseline medians across runs and their relative spread (max-min)/mean,
    the noise floor a speedup must clear to mean something."""
    by_device: dict[str, list[float]] = {}
    for _, data in results:
        base = data.get("baseline") or {}
        if base.get("latency"):
            by_device.setdefault(_device(data), []).append(base["latency"]["median"])
    spread = {}
    for device, medians in by_device.items():
        mean = statistics.fmean(medians)
        spread[device] = {"runs": len(medians), "mean_s": mean, "min_s": min(medians), "max_s": max(medians),
                          "relative_spread": (max(medians) - min(medians)) / mean if mean else 0.0}
    return spread


def _warm_start(stack: dict[str, Any]) -> str:
    artifacts = (stack.get("stats") or {}).get("artifacts") or {}
    if not artifacts:
        return "—"
    return "cache hit" if all(a.get("cache_hit") for a in artifacts.values()) else "cold build"


def summary_rows(results: list[tuple[Path, dict[str, Any]]],
                 root: Path) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(table row, machine-readable record) for every stack of every run."""
    spread = baseline_spread(results)
    rows = []
    for run_dir, data in results:
        device = _device(data)
        noise = spread.get(device, {}).get("relative_spread", 0.0)
        for stack in data.get("stacks", []):
            row = stack_row(stack)
            speedup = stack.get("speedup")
            within = stack.get("within_noise") or (speedup is not None and abs(speedup - 1) <= noise)
            if speedup is not None:
                sigma = stack.get("speedup_uncertainty")
                row["speedup"] = f"{speedup:.2f}" + (f" ± {sigma:.2f}" if sigma else "") + (" (noise)" if within else "")
            row.update({"warm start": _warm_start(stack), "device": device,
                        "run": str(run_dir.relative_to(root)) or "."})
            env = data.get("environment") or {}
            record = {**stack, "within_noise_sweep": within, "device": device, "run_dir": str(run_dir),
                      "hostname": env.get("hostname"), "cuda_visible_devices": env.get("cuda_visible_devices"),
                      "model": data.get("model", {}).get("name"),
                      "baseline_median_s": ((data.get("baseline") or {}).get("latency") or {}).get("median")}
            rows.append((row, record))
        measured = {s.get("stack") for s in data.get("stacks", [])}
        for name in data.get("requested") or []:
            if name not in measured and not data.get("complete"):
                row = {c: "—" for c in SUMMARY_COLUMNS}
                row.update({"stack": name, "status": "not run (the job was interrupted)", "device": device,
                            "run": str(run_dir.relative_to(root)) or "."})
                rows.append((row, {"stack": name, "status": "not run", "run_dir": str(run_dir), "device": device}))
    return rows


def _plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for rec in records:
        psnr = (((rec.get("fidelity") or {}).get("metrics") or {}).get("psnr") or {}).get("worst")
        if rec.get("speedup") is None or psnr is None:
            continue
        ok = (rec.get("fidelity") or {}).get("passed")
        ax.errorbar(psnr, rec["speedup"], yerr=rec.get("speedup_uncertainty") or 0, fmt="o",
                    color="tab:green" if ok else "tab:red", capsize=3)
        ax.annotate(rec["stack"], (psnr, rec["speedup"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_xlabel("PSNR vs baseline, worst prompt (dB; 100 = identical)")
    ax.set_ylabel("speedup vs baseline (median ratio)")
    ax.set_title("speedup vs fidelity (green: passes its fidelity thresholds)")
    fig.tight_layout()
    save_figure_atomic(path, fig, dpi=120)
    plt.close(fig)


def _grid(results: list[tuple[Path, dict[str, Any]]], path: Path) -> bool:
    """Baseline and every stack's image for each prompt, labelled; False if no images exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    columns: list[tuple[str, Path, list[str]]] = []
    for run_dir, data in results:
        base = data.get("baseline") or {}
        if base.get("images") and not columns:
            columns.append(("baseline", run_dir, base["images"]))
        for stack in data.get("stacks", []):
            if stack.get("images"):
                columns.append((stack["stack"], run_dir, stack["images"]))
    if not columns:
        return False
    prompts = results[0][1].get("prompts") or []
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


def write_summary(root: Path) -> dict[str, Any]:
    """Write the summary files into ``root``; returns the summary.json content."""
    root = Path(root)
    results, unreadable = collect(root)
    pairs = summary_rows(results, root)
    rows, records = [row for row, _ in pairs], [record for _, record in pairs]
    spread = baseline_spread(results)
    failed = failures(results)
    summary = {"root": str(root), "runs": len(results), "passed": not failed, "failures": failed,
               "unreadable": [str(p) for p in unreadable], "baseline_spread": spread, "rows": records}
    write_json_atomic(root / "summary.json", summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(root / "summary.csv", buffer.getvalue())
    _plot(records, root / "speedup_vs_fidelity.png")
    has_grid = _grid(results, root / "grid.png")
    write_text_atomic(root / "summary.md", _markdown(results, rows, spread, has_grid, failed))
    return summary


def _markdown(results: list[tuple[Path, dict[str, Any]]], rows: list[dict[str, str]],
              spread: dict[str, dict[str, float]], has_grid: bool, failed: list[str]) -> str:
    lines = ["# fluxopt bake-off summary", ""]
    if not results:
        return "\n".join(lines + ["No readable result.json found.", ""])
    lines += ["**Verdict: every requested stack passed.**" if not failed else
              f"**Verdict: {len(failed)} failure(s)**: " + "; ".join(failed), ""]
    first = results[0][1]
    shapes = first.get("shapes") or {}
    if shapes:
        lines.append(f"Model `{first['model']['name']}`, {shapes.get('height')}x{shapes.get('width')}, "
                     f"{shapes.get('steps')} steps, {len(first.get('prompts', []))} prompt(s); {len(results)} run(s).")
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
    if len(spread) > 1:
        lines.append("- **Runs come from different GPU models**: compare speedups only within one device "
                     "(each speedup is against the baseline measured on its own device).")
    lines += ["", "## Fidelity", fidelity_note(first) if first.get("shapes") else "", ""]
    lines += ["![speedup vs fidelity](speedup_vs_fidelity.png)", ""]
    if has_grid:
        lines += ["![images](grid.png)", ""]
    env = first.get("environment")
    if env:
        lines += ["## Environment (first run)", *environment_lines(env), ""]
    return "\n".join(lines)


class SweepSummaryCallback(Callback):
    """Hydra callback: writes the summary into the sweep directory when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not writes_results():  # under torchrun only rank 0 writes
            return
        root = Path(config.hydra.sweep.dir)
        summary = write_summary(root)
        results, _ = collect(root)
        SWEEP_FAILURES[:] = failures(results, os.environ.get(INVOCATION_ENV))
        print(f"fluxopt: sweep summary of {summary['runs']} run(s): {root / 'summary.md'}")


# Filled by the callback at the end of a multirun (in the launching process, whichever launcher
# ran the jobs): the CLI's exit status reads it.
SWEEP_FAILURES: list[str] = []
