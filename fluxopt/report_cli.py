"""``fluxopt-report DIR``: rebuild the summary of a sweep (or of all runs below DIR) from its
result files. ``--best`` picks the fastest stack that passed its fidelity gate and the limits
given (``--min-psnr``, ``--max-memory-gib``) and prints the command line and the Python call
that reproduce it."""

from __future__ import annotations

import sys
from pathlib import Path

from fluxopt.cache_cli import OneLineParser
from fluxopt.errors import ConfigError, ExitStatus, FluxoptError
from fluxopt.selection import Limits, best
from fluxopt.stack import option_defaults
from fluxopt.sweep import collect, write_summary


def _print_best(directory: Path, limits: Limits) -> int:
    found = collect(directory)
    for why in found.unusable:
        print(f"fluxopt-report: not used: {why}", file=sys.stderr)
    pick, passed_over = best(found.records, limits, option_defaults())
    if pick is None:
        print(f"fluxopt-report: no stack in {directory} passed its fidelity gate and the limits", file=sys.stderr)
        for name, why in passed_over:
            print(f"  {name}: {why}", file=sys.stderr)
        return ExitStatus.STACK_FAILED
    psnr = pick.stack.worst("psnr")
    print(f"best: {pick.name}, {pick.stack.speedup:.2f}x"
          + (f", PSNR {psnr:.1f} dB" if psnr is not None else "")
          + (f", peak {pick.stack.peak_memory_bytes / 2**30:.1f} GiB" if pick.stack.peak_memory_bytes else "")
          + f" (from {pick.run.path})")
    print("\nmeasure it again:\n  " + pick.command())
    print("\nuse it in serving code:\n" + "\n".join("  " + line for line in pick.python().splitlines()))
    if passed_over:
        print("\nnot picked:")
        for name, why in passed_over:
            print(f"  {name}: {why}")
    return ExitStatus.OK


def main(argv: list[str] | None = None) -> None:
    """``fluxopt-report``; fluxopt's own errors (a broken installed plugin...) are one line."""
    try:
        _main(argv)
    except FluxoptError as exc:
        print(f"fluxopt-report: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(exc.exit_status)


def _main(argv: list[str] | None) -> None:
    parser = OneLineParser(prog="fluxopt-report", description=__doc__)
    parser.add_argument("directory", type=Path, help="a sweep directory or any directory holding result.json files")
    parser.add_argument("--best", action="store_true", help="print the winner and how to reproduce it")
    parser.add_argument("--min-psnr", type=float, default=None, help="with --best: worst-prompt PSNR at least this (dB)")
    parser.add_argument("--max-memory-gib", type=float, default=None, help="with --best: peak memory at most this (GiB)")
    args = parser.parse_args(argv)
    if not args.directory.is_dir():
        parser.error(f"directory={args.directory} is not a directory")
    if (args.min_psnr is not None or args.max_memory_gib is not None) and not args.best:
        parser.error("--min-psnr and --max-memory-gib go with --best")
    if args.best:
        try:
            limits = Limits(args.min_psnr, args.max_memory_gib, setting_prefix="--")
        except ConfigError as exc:
            parser.error(str(exc))
        sys.exit(_print_best(args.directory, limits))
    summary = write_summary(args.directory)
    for why in summary["unusable"]:
        print(f"fluxopt-report: not used: {why}", file=sys.stderr)
    print(f"{summary['runs']} run(s) summarised in {args.directory / 'summary.md'}")
    if not summary["passed"]:
        for why in summary["failures"] + summary["incomplete"]:
            print(f"fluxopt-report: {why}", file=sys.stderr)
        sys.exit(ExitStatus.STACK_FAILED)


if __name__ == "__main__":
    main()
