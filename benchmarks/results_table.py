"""Markdown table of a GPU results file (``docs/results/*-h100-*.json``: a list of runs, each
with the command that produced it and its result.json content), one row per measured stack.

    python benchmarks/results_table.py docs/results/2026-11-24-h100-backends.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fluxopt.report import markdown_table, stack_row

COLUMNS = ("run", "stack", "per step (ms)", "latency (s)", "speedup", "build (s)", "peak mem (GiB)", "PSNR",
           "SSIM", "latent err", "fidelity", "steps skipped")


# The options worth a reader's eye in the table (the JSON has them all).
SHOWN = {"compile": ("regional",), "torchao_fp8": ("granularity", "inductor_tuning"),
         "torchao_int8": ("inductor_tuning",), "fbcache": ("residual_diff_threshold",),
         "attention": ("kernel",), "offload": ("mode",), "trt_fp8": ("stop_after", "calib_steps"),
         "aoti": ("max_autotune", "cuda_graphs")}


def stack_label(r: dict[str, Any]) -> str:
    """The stack with its options as measured, e.g. ``torchao_fp8(granularity=row); compile(regional=True)``."""
    if r["stack"] == "baseline":
        return "baseline"
    parts = []
    for name, options in (r.get("options") or {}).items():
        shown = {k: v for k, v in options.items() if k in SHOWN.get(name, ())}
        parts.append(f"{name}({', '.join(f'{k}={v}' for k, v in shown.items())})")
    return "; ".join(parts) or r["stack"]


def rows(results: dict[str, Any]) -> list[dict[str, str]]:
    out = []
    for number, run in enumerate(results["runs"], 1):
        data = run["result"]
        for r in ([data["baseline"]] if data.get("baseline") else []) + data.get("stacks", []):
            row = stack_row(r)
            row.update(run=str(number), stack=stack_label(r))
            if r["status"] != "ok":
                row["fidelity"] = row["status"]
            out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    print(markdown_table(rows(json.loads(args.results.read_text())), COLUMNS))


if __name__ == "__main__":
    main()
