"""A sweep's summary: ``summary.{md,csv,json}``, ``speedup_vs_fidelity.png`` and ``grid.png``,
rebuilt from the ``result.json`` files alone (``fluxopt-report DIR`` regenerates it, also while a
sweep still runs), with the sweep's verdict and every result it could not use named.
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from fluxopt.files import save_figure_atomic, write_json_atomic, write_text_atomic
from fluxopt.hookspecs import hookimpl
from fluxopt.record import RunRecord, StackRecord, within_noise
from fluxopt.report.html import write_html
from fluxopt.report.tables import (
    distinct_names,
    environment_lines,
    fidelity_note,
    markdown_table,
    not_run,
    not_run_reason,
    planned_iterations,
    search_lines,
    speedup_text,
    stack_row,
)
from fluxopt.sweep import Collected, Verdict, collect, read_search, run_name, verdict_of

SUMMARY_COLUMNS = ("stack", "status", "latency (s)", "per step (ms)", "speedup", "build (s)", "warm start",
                   "first call (s)", "peak mem (GiB)", "J/image", "avg W", "steps skipped", "PSNR", "SSIM", "latent err", "fidelity", "device", "run")
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


def summary_rows(records: list[RunRecord], root: Path) -> list[tuple[dict[str, str], dict[str, Any]]]:
    """(table row, machine-readable row) for every stack of every run, and for every requested
    stack a run has no measurement of."""
    spread = baseline_spread(records)
    rows = []
    for record in records:
        noise = spread.get(record.device, {}).get("relative_spread", 0.0)
        run = run_name(record, root)
        env = record.environment
        for stack, name in zip(record.stacks, distinct_names(record.stacks)):
            row = {**stack_row(stack, planned_iterations(record)), "stack": name}
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
    """Speedup against the worst prompt's PSNR, and, where the GPU's energy was read, a second
    panel of joules per image (median over the timed generations) with each stack's average watts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_energy = [(run_name(r, path.parent) if len(records) > 1 else "", s) for r in records
                   for s in ([r.baseline] if r.baseline else []) + r.stacks if s.energy is not None]
    fig, axes = plt.subplots(1, 2 if with_energy else 1, figsize=(13 if with_energy else 7, 4.5), squeeze=False)
    ax = axes[0][0]
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
    if with_energy:
        energy = axes[0][1]
        labels = [f"{run}: {s.stack}" if run else s.stack for run, s in with_energy]
        joules = [s.energy.median_j for _, s in with_energy]
        bars = energy.barh(range(len(joules)), joules, color=["tab:gray" if s.is_baseline else "tab:blue"
                                                             for _, s in with_energy])
        for bar, (_, s) in zip(bars, with_energy):
            watts = s.energy.average_w(s.latency)
            if watts is not None:
                energy.annotate(f"{watts:.0f} W", (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                                textcoords="offset points", xytext=(4, -3), fontsize=7)
        energy.set_yticks(range(len(labels)), [label[:40] for label in labels], fontsize=7)
        energy.invert_yaxis()
        energy.set_xlabel("GPU energy per image (J, median; NVML board counter)")
        energy.set_title("energy per image (average power beside each bar)")
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
    write_html(root, found)
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


@hookimpl
def fluxopt_sweep_finished(sweep_dir: str) -> None:
    summary = write_summary(Path(sweep_dir))
    print(f"fluxopt: sweep summary of {summary['runs']} run(s): {Path(sweep_dir) / 'summary.md'} "
          f"(and summary.html)")
