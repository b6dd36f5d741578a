"""Measure a chosen list of stacks against one bf16 baseline in one process, on a GPU.

    python benchmarks/gpu_backends.py benchmarks/plans/h100_backends.yaml --out docs/results/NAME \
        model=flux-dev-random bench=full bench.iterations=3

The plan file lists stacks (backend name -> options); the overrides are ordinary fluxopt
config overrides. Writes NAME.json (result.json content + the command) and NAME.md.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import yaml
from hydra import compose, initialize_config_module

from fluxopt.config import register_configs
from fluxopt.report import render_run_markdown
from fluxopt.files import write_json_atomic
from fluxopt.runner import Run
from fluxopt.stack import build_stack


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", type=Path, help="YAML file with a 'stacks' list of {backend: options} mappings")
    parser.add_argument("--out", type=Path, required=True, help="output path without extension")
    parser.add_argument("--only", default=None, help="comma-separated indices of the plan's stacks to run")
    parser.add_argument("overrides", nargs="*", help="fluxopt config overrides")
    args = parser.parse_intermixed_args()
    plan = yaml.safe_load(args.plan.read_text())
    entries = plan["stacks"]
    if args.only:
        entries = [entries[int(i)] for i in args.only.split(",")]
    stacks = [build_stack({name: opts or {} for name, opts in entry.items()}) for entry in entries]
    register_configs()
    with initialize_config_module(config_module="fluxopt.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=args.overrides)
    run_dir = args.out.parent / (args.out.name + "_run")
    data = Run(cfg, run_dir, stacks=stacks).execute()
    data["command"] = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out.with_suffix(".json"), data)
    args.out.with_suffix(".md").write_text(render_run_markdown(data) + f"\nCommand: `{data['command']}`\n")
    print(render_run_markdown(data))


if __name__ == "__main__":
    main()
