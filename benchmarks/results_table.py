"""Markdown tables of GPU results, one row per measured stack: a published record
(``docs/results/<name>/result.json``, written by ``fluxopt-report publish``) or an older results
file (``docs/results/*-h100-*.json``: a list of runs, each with its command and result.json content).

    python benchmarks/results_table.py docs/results/2026-11-24-h100-backends.json [--profile | --kernels | --build | --time]
    python benchmarks/results_table.py --render docs/results/2026-11-25-h100-issue15.md [--check]

``--render`` regenerates every block of a Markdown file written between
``<!-- table: FILE.json [--profile | --kernels | --build | --time] -->`` and ``<!-- end table -->`` (``--check``: exit 1 if
the file would change), so the numbers in docs come from their records, never typed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from fluxopt.profile.steps import average_step_floor_ms, floor_at_clock_ms, pct_of_floor
from fluxopt.record import RunRecord, StackRecord, record_from_json
from fluxopt.report.tables import markdown_table, planned_iterations, stack_row

COLUMNS = ("run", "stack", "per step (ms)", "latency (s)", "speedup", "build (s)", "peak mem (GiB)", "J/image",
           "PSNR", "SSIM", "latent err", "fidelity", "steps skipped")


# The options worth a reader's eye in the table (the JSON has them all).
SHOWN = {"compile": ("regional", "cuda_graphs", "eager_rounding", "sigmoid_gelu"),
         "torchao_fp8": ("granularity", "kernel_preference"),
         "torchao_int8": ("inductor_tuning",), "torchao_int4": ("packing_format",), "torchao_fp8_static": ("inductor_tuning",), "fbcache": ("residual_diff_threshold", "implementation"),
         "attention": ("kernel", "fused_qk"), "offload": ("mode", "group_type"), "trt_fp8": ("stop_after", "calib_steps"),
         "aoti": ("max_autotune", "weights", "cuda_graphs", "eager_rounding"), "taylorseer": ("cache_interval",),
         "fixed_cache": ("warmup_steps", "interval", "order"), "fp8_attention": ("kernel", "scales", "v_margin", "fused_qk")}


def stack_label(r: dict[str, Any] | StackRecord, extra: frozenset[tuple[str, str]] = frozenset()) -> str:
    """The stack with its options as measured, e.g. ``torchao_fp8(granularity=row); compile(regional=True)``:
    those in SHOWN, and the (backend, option) pairs in ``extra``."""
    r = r.to_json() if isinstance(r, StackRecord) else r
    if r["stack"] == "baseline":
        return "baseline"
    parts = []
    for name, options in (r.get("options") or {}).items():
        shown = {k: v for k, v in options.items() if k in SHOWN.get(name, ()) or (name, k) in extra}
        parts.append(f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})")
    return "; ".join(parts) or r["stack"]


def stack_labels(stacks: list[dict[str, Any] | StackRecord]) -> list[str]:
    """Each stack's label; where stacks of one run would read alike, each also shows the options
    they differ in (``inductor_config={...}``), so no two rows of a table look the same."""
    stacks = [r.to_json() if isinstance(r, StackRecord) else r for r in stacks]
    labels = [stack_label(r) for r in stacks]
    out = []
    for r, label in zip(stacks, labels):
        twins = [t for t, other in zip(stacks, labels) if other == label]
        differ = frozenset((backend, key) for backend, options in (r.get("options") or {}).items()
                           for key, value in options.items()
                           if any(((t.get("options") or {}).get(backend) or {}).get(key) != value for t in twins))
        out.append(stack_label(r, differ))
    return out


def read_runs(results: dict[str, Any], path: Path) -> list[RunRecord]:
    """Every run through fluxopt's one reader (every derived figure re-derived from the stored
    samples): an edited record is refused, whichever table is asked for."""
    records = []
    for number, run in enumerate(results["runs"], 1):
        record = record_from_json(run["result"], path)
        if record.edited:
            raise SystemExit(f"{path}: run {number} was edited: {'; '.join(record.edited)}")
        records.append(record)
    return records


def rows(results: dict[str, Any], path: Path = Path("results.json")) -> list[dict[str, str]]:
    """One row per stack of every run, as the reader derives it."""
    out = []
    for number, record in enumerate(read_runs(results, path), 1):
        ran = ([record.baseline] if record.baseline else []) + record.stacks
        for r, label in zip(ran, stack_labels(ran)):
            row = stack_row(r, planned_iterations(record))
            row.update(run=str(number), stack=label)
            if r.status != "ok":
                row["fidelity"] = row["status"]
            out.append(row)
    return out


PROFILE_COLUMNS = ("run", "stack", "step (ms)", "GEMM", "attention", "quantize", "norm/elementwise", "other",
                   "GPU idle", "floor (ms)", "% of floor", "SM MHz", "power-capped", "% of floor at its clock")


def _ms(value: Any) -> str:
    return "—" if value is None else f"{value:.1f}"


def measured(data: dict[str, Any]) -> list[dict[str, Any]]:
    """A record's baseline (where it has one) and stacks, in the order they ran."""
    return ([data["baseline"]] if data.get("baseline") else []) + data.get("stacks", [])


def profile_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per profiled stack: where one denoising step's milliseconds went (bench.profile)."""
    out = []
    for number, run in enumerate(results["runs"], 1):
        data = run["result"]
        for r, label in zip(measured(data), stack_labels(measured(data))):
            prof = r.get("profile")
            if not prof:
                continue
            parts = prof["breakdown_ms"]
            step = (r.get("step_latency") or {}).get("median")
            # the floor of an average step (a step cache's predicted steps cost no transformer), computed
            # from the record so that records made before the runner stored it agree
            floor = average_step_floor_ms(prof.get("floor_ms"), (r.get("stats") or {}).get("cache"))
            pct = pct_of_floor(floor, step)
            ceiling_mhz = ((data.get("profile") or {}).get("ceilings_tflops") or {}).get("sm_mhz")
            pct_at_clock = pct_of_floor(floor_at_clock_ms(floor, ceiling_mhz, prof.get("gpu_clock")), step)
            out.append({"run": str(number), "stack": label, "step (ms)": _ms(step * 1000 if step else None),
                        "GEMM": _ms(parts["gemm"]), "attention": _ms(parts["attention"]),
                        "quantize": _ms(parts["quantize"]), "norm/elementwise": _ms(parts["norm_elementwise"]),
                        "other": _ms(parts["other"]), "GPU idle": _ms(prof.get("gpu_idle_ms")),
                        "floor (ms)": _ms(floor), "% of floor": "—" if pct is None else f"{pct:.0f}%",
                        **_clock(prof.get("gpu_clock")),
                        "% of floor at its clock": "—" if pct_at_clock is None else f"{pct_at_clock:.0f}%"})
    return out


def _clock(clock: dict[str, Any] | None) -> dict[str, str]:
    """Mean SM clock during the profiled step, and the share of its samples the power limit held
    back (recorded since 2026-11-26, calls K and L over the whole profiled generation; earlier
    records show "—")."""
    if not clock:
        return {"SM MHz": "—", "power-capped": "—"}
    return {"SM MHz": f"{clock['sm_mhz_mean']:.0f}", "power-capped": f"{100 * clock['power_capped_share']:.0f}%"}


KERNEL_COLUMNS = ("run", "stack", "kernel", "category", "ms", "launches")
KERNEL_SHOWN = 80  # characters of a kernel's name in a table


def kernel_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """The kernels with the most time in each profiled stack's step, by name (bench.profile; records
    made before the profile kept them have none): what the --profile table's categories hold."""
    out = []
    for number, run in enumerate(results["runs"], 1):
        data = run["result"]
        for r in measured(data):
            for kernel in (r.get("profile") or {}).get("top_kernels") or []:
                name = kernel["name"] if len(kernel["name"]) <= KERNEL_SHOWN else kernel["name"][:KERNEL_SHOWN - 1] + "…"
                out.append({"run": str(number), "stack": r["stack"], "kernel": f"`{name.replace('|', '/')}`",
                            "category": kernel["category"], "ms": f"{kernel['ms']:.2f}",
                            "launches": str(kernel["launches"])})
    return out


BUILD_COLUMNS = ("run", "stack", "build (s)", "build phases (s)", "left allocated after close (GiB)")


def build_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per built stack: where its build time went, and the GPU memory it left allocated
    after it closed (which every later stack's peak memory includes)."""
    out = []
    for number, run in enumerate(results["runs"], 1):
        stacks = run["result"].get("stacks", [])
        for r, label in zip(stacks, stack_labels(stacks)):
            if r.get("build_s") is None:
                continue
            phases = ", ".join(f"{name} {seconds:.1f}" for name, seconds in (r.get("build_phases_s") or {}).items())
            left = r.get("left_allocated_bytes")
            out.append({"run": str(number), "stack": label, "build (s)": f"{r['build_s']:.1f}",
                        "build phases (s)": phases or "—",
                        "left allocated after close (GiB)": "—" if left is None else f"{left / 2**30:.2f}"})
    return out


TIME_COLUMNS = ("run", "stack", "status", "wall (s)", "build (s)", "timed calls", "done at (min)")


def time_rows(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per stack, in the order it ran: where a run's wall time went (loading, building,
    warm-up, timing and judging each stack) and how far into the run each stack ended, so a
    bake-off's length is read from its record. Where the record says when its process began, the
    first row is the time before the record started (imports, config), counted in "done at"."""
    out = []
    for number, run in enumerate(results["runs"], 1):
        data = run["result"]
        done = 0.0
        began = (data.get("provenance") or {}).get("process_started")
        if began and data.get("started"):
            done = (datetime.fromisoformat(data["started"]) - datetime.fromisoformat(began)).total_seconds()
            out.append({"run": str(number), "stack": "(process start: imports, config)", "status": "—",
                        "wall (s)": f"{done:.1f}", "build (s)": "—", "timed calls": "—",
                        "done at (min)": f"{done / 60:.1f}"})
        for r in measured(data):
            wall = r.get("elapsed_s") or 0.0
            done += wall
            samples = (r.get("latency") or {}).get("samples") or []
            build = r.get("build_s")
            out.append({"run": str(number), "stack": r["stack"], "status": r["status"], "wall (s)": f"{wall:.1f}",
                        "build (s)": "—" if build is None else f"{build:.1f}",
                        "timed calls": str(len(samples)) if samples else "—", "done at (min)": f"{done / 60:.1f}"})
    return out


def load(path: Path) -> dict[str, Any]:
    """``{"runs": [{"command", "result"}]}``: an older results file as it is, a published record as its one run."""
    data = json.loads(path.read_text())
    if "runs" in data:
        return data
    return {"runs": [{"command": (data.get("provenance") or {}).get("command"), "result": data}]}


def table(path: Path, kind: str | None) -> str:
    """``kind``: None (the stacks), "profile" (per-step breakdown), "kernels" (the profiled step's
    costliest kernels), "build" (build phases, memory left) or "time" (each stack's wall time in run order).
    ``path``: a results JSON, or a run's or published record's directory (its result.json)."""
    if path.is_dir():
        path = path / "result.json"
    results = load(path)
    if kind:  # raw fields, shown from a record that reads back whole (the stack table reads through it)
        read_runs(results, path)
    if kind == "profile":
        return markdown_table(profile_rows(results), PROFILE_COLUMNS)
    if kind == "kernels":
        return markdown_table(kernel_rows(results), KERNEL_COLUMNS)
    if kind == "build":
        return markdown_table(build_rows(results), BUILD_COLUMNS)
    if kind == "time":
        return markdown_table(time_rows(results), TIME_COLUMNS)
    return markdown_table(rows(results, path), COLUMNS)


BLOCK = re.compile(r"(<!-- table: (\S+)(?: --(profile|kernels|build|time))? -->\n)(.*?)(<!-- end table -->)", re.S)


def render(doc: Path) -> str:
    text = doc.read_text()
    return BLOCK.sub(lambda m: m.group(1) + table(doc.parent / m.group(2), m.group(3)) + "\n" + m.group(5), text)


def markdown_cli(description: str, what: str, table_of: Callable[[argparse.Namespace], str],
                 render_doc: Callable[[Path], str], options: Callable[[argparse.ArgumentParser], None] = lambda p: None,
                 ) -> None:
    """The command line shared by the scripts that generate docs tables: print one table, or
    (``--render``) regenerate the marked blocks of a Markdown file (``--check``: exit 1 if stale)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help=f"{what}, or with --render a Markdown file")
    options(parser)
    parser.add_argument("--render", action="store_true", help="regenerate the marked tables of a Markdown file")
    parser.add_argument("--check", action="store_true", help="with --render: fail if the file is not up to date")
    args = parser.parse_args()
    if not args.render:
        print(table_of(args))
        return
    new = render_doc(args.path)
    if args.check:
        sys.exit(0 if new == args.path.read_text() else 1)
    args.path.write_text(new)


def main() -> None:
    def options(parser: argparse.ArgumentParser) -> None:
        kind = parser.add_mutually_exclusive_group()
        kind.add_argument("--profile", dest="kind", action="store_const", const="profile",
                          help="the per-step time breakdown table")
        kind.add_argument("--kernels", dest="kind", action="store_const", const="kernels",
                          help="the profiled step's costliest kernels, by name")
        kind.add_argument("--build", dest="kind", action="store_const", const="build",
                          help="the build phases and the memory each stack left allocated")
        kind.add_argument("--time", dest="kind", action="store_const", const="time",
                          help="each stack's wall time, in the order it ran")

    markdown_cli(__doc__, "a results JSON or the directory holding one", lambda args: table(args.path, args.kind), render, options)


if __name__ == "__main__":
    main()
