"""``fluxopt-report DIR``: rebuild the summary of a sweep (or of all runs below DIR) from its
result files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fluxopt.sweep import write_summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fluxopt-report", description=__doc__)
    parser.add_argument("directory", type=Path, help="a sweep directory or any directory holding result.json files")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"directory={args.directory} is not a directory")
    summary = write_summary(args.directory)
    for path in summary["unreadable"]:
        print(f"fluxopt-report: skipped {path}: not a readable fluxopt result", file=sys.stderr)
    print(f"{summary['runs']} run(s) summarised in {args.directory / 'summary.md'}")


if __name__ == "__main__":
    main()
