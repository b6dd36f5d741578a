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
from omegaconf import DictConfig, OmegaConf

from fluxopt.environment import INVOCATION_ENV
from fluxopt.files import move_aside, save_figure_atomic, write_json_atomic, write_text_atomic
from fluxopt.launch import writes_results
from fluxopt.plan import selected_backends
from fluxopt.report import SEARCH_FILE, environment_lines, fidelity_note, markdown_table, search_lines, stack_row
from fluxopt.result import RESULT_FILE, SCHEMA_VERSION, UnreadableResult, load_result
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


def job_dir(job_config: DictConfig) -> Path:
    """Where a sweep job writes its result (``hydra.sweep.dir``/``hydra.sweep.subdir``)."""
    return Path(str(job_config.hydra.sweep.dir)) / str(job_config.hydra.sweep.subdir)


def record_crashed_job(job_config: DictConfig, reason: str) -> Path:
    """Record, from the launching process, that a job's process died (killed, out of memory,
    lost node): its result.json is marked incomplete with the reason, or written if the job
    died before writing one, so the summary lists it and the sweep's verdict is negative.
    Called by fluxopt's Ray and submitit launchers; returns the job's directory."""
    directory = job_dir(job_config)
    path = directory / RESULT_FILE
    try:
        data = load_result(path)
    except UnreadableResult:
        move_aside(path, "unreadable")
        data = None
    if data is None:
        stack = "+".join(selected_backends(job_config)) or "baseline"
        data = {"schema_version": SCHEMA_VERSION, "mode": "stack", "model": {"name": job_config.model.name},
                "config": OmegaConf.to_container(job_config, resolve=False), "baseline": None,
                "requested": [stack], "stacks": [],
                "provenance": {"invocation": os.environ.get(INVOCATION_ENV),
                               "overrides": list(job_config.hydra.overrides.task)}}
        data["config"].pop("hydra", None)
    data.update(complete=False, job_crash=reason)
    write_json_atomic(path, data)
    return directory


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
                why = f"job process died: {data['job_crash']}" if data.get("job_crash") else "the job was interrupted"
                row.update({"stack": name, "status": f"not run ({why})", "device": device,
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


def read_search(root: Path) -> dict[str, Any] | None:
    """The search sweeper's trial log in ``root``, if this sweep was a search."""
    import json

    try:
        return json.loads((root / SEARCH_FILE).read_text())
    except (OSError, ValueError):
        return None


def verdict_failures(root: Path, results: list[tuple[Path, dict[str, Any]]], invocation: str | None = None) -> list[str]:
    """Why a sweep's verdict is negative. For a search, trials that fail or miss a limit are part
    of searching: the verdict is whether some trial met the gate and the limits."""
    record = read_search(root)
    if record is not None and (invocation is None or record.get("invocation") == invocation):
        return [] if record.get("best") else [f"search: no trial met its fidelity gate and the limits ({root / SEARCH_FILE})"]
    return failures(results, invocation)


def write_summary(root: Path) -> dict[str, Any]:
    """Write the summary files into ``root``; returns the summary.json content."""
    root = Path(root)
    results, unreadable = collect(root)
    pairs = summary_rows(results, root)
    rows, records = [row for row, _ in pairs], [record for _, record in pairs]
    spread = baseline_spread(results)
    failed = verdict_failures(root, results)
    searched = read_search(root)
    summary = {"root": str(root), "runs": len(results), "passed": not failed, "failures": failed,
               "unreadable": [str(p) for p in unreadable], "baseline_spread": spread, "rows": records,
               "search": searched}
    write_json_atomic(root / "summary.json", summary)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SUMMARY_COLUMNS))
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(root / "summary.csv", buffer.getvalue())
    _plot(records, root / "speedup_vs_fidelity.png")
    has_grid = _grid(results, root / "grid.png")
    write_text_atomic(root / "summary.md", _markdown(results, rows, spread, has_grid, failed, searched))
    return summary


def _markdown(results: list[tuple[Path, dict[str, Any]]], rows: list[dict[str, str]],
              spread: dict[str, dict[str, float]], has_grid: bool, failed: list[str],
              searched: dict[str, Any] | None = None) -> str:
    lines = ["# fluxopt bake-off summary", ""]
    if not results:
        return "\n".join(lines + ["No readable result.json found.", ""])
    built_only = all(data.get("build_only") for _, data in results)
    passed = ("a stack met the fidelity gate and the limits" if searched else
              "every requested stack built (build_only: nothing was measured)" if built_only else
              "every requested stack passed")
    lines += [f"**Verdict: {passed}.**" if not failed else
              f"**Verdict: {len(failed)} failure(s)**: " + "; ".join(failed), ""]
    if searched:
        lines += search_lines(searched)
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
        SWEEP_FAILURES[:] = verdict_failures(root, results, os.environ.get(INVOCATION_ENV))
        print(f"fluxopt: sweep summary of {summary['runs']} run(s): {root / 'summary.md'}")


# Filled by the callback at the end of a multirun (in the launching process, whichever launcher
# ran the jobs): the CLI's exit status reads it.
SWEEP_FAILURES: list[str] = []
