"""``fluxopt-report DIR``: rebuild the summary of a sweep (or of all runs below DIR) from its
result files. ``--best`` picks the fastest stack that passed its fidelity gate and the limits
given (``--min-psnr``, ``--max-memory-gib``) and prints the command line and the Python call
that reproduce it.

``fluxopt-report html DIR``: the self-contained HTML page of a run (report.html) or a sweep
(summary.html), rebuilt from the records.

``fluxopt-report publish RUN_DIR DEST``: a run's record and its page (report.md, ending with the
command that produced it) copied into DEST (e.g. ``docs/results/<date>-<gpu>-<what>``), after the
record was read through fluxopt's reader: an edited or unreadable record is never published."""

from __future__ import annotations

import sys
from pathlib import Path

from fluxopt.errors import ConfigError, ExitStatus, OneLineParser
from fluxopt.files import write_bytes_atomic, write_text_atomic
from fluxopt.record import RESULT_FILE, read_record
from fluxopt.report.html import write_html
from fluxopt.report.summary import write_summary
from fluxopt.report.tables import render_run_markdown
from fluxopt.selection import Limits, best
from fluxopt.stack import option_defaults
from fluxopt.sweep import collect


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


def publish(run_dir: Path, dest: Path) -> Path:
    """Copy ``run_dir``'s result.json into ``dest`` with its page re-rendered from the record;
    ``dest`` must not exist (a published run is never overwritten)."""
    record = read_record(run_dir / RESULT_FILE)
    if record is None:
        raise ConfigError(f"RUN_DIR={run_dir} holds no {RESULT_FILE}")
    if record.edited:
        raise ConfigError(f"{record.path} was edited ({'; '.join(record.edited)}); it cannot be published")
    if not record.provenance.get("command"):
        raise ConfigError(f"{record.path} does not say which command produced it (a run of `python -m fluxopt` "
                          "records it); only such runs are published")
    if dest.exists():
        raise ConfigError(f"DEST={dest} exists; a published run is never overwritten, choose a new name")
    write_bytes_atomic(dest / RESULT_FILE, (run_dir / RESULT_FILE).read_bytes())
    write_text_atomic(dest / "report.md", render_run_markdown(record))
    return dest


def run(argv: list[str]) -> None:
    """The report ring's subcommands (the summary, ``publish``, ``html``); exits with the verdict."""
    if argv[:1] == ["html"]:
        parser = OneLineParser(prog="fluxopt-report html", description=write_html.__doc__)
        parser.add_argument("directory", type=Path, help="a run's or a sweep's output directory")
        args = parser.parse_args(argv[1:])
        if not args.directory.is_dir():
            parser.error(f"directory={args.directory} is not a directory")
        found = collect(args.directory)
        if not found.records:
            parser.error(f"directory={args.directory} holds no readable result.json"
                         + (f" ({found.unusable[0]})" if found.unusable else ""))
        print(f"wrote {write_html(args.directory, found)}")
        return
    if argv[:1] == ["publish"]:
        parser = OneLineParser(prog="fluxopt-report publish", description=publish.__doc__)
        parser.add_argument("run_dir", type=Path, help="a run's output directory (holding result.json)")
        parser.add_argument("dest", type=Path, help="a new directory for the record and its page")
        args = parser.parse_args(argv[1:])
        try:
            where = publish(args.run_dir, args.dest)
        except ConfigError as exc:
            parser.error(str(exc))
        print(f"published {args.run_dir / RESULT_FILE} as {where / RESULT_FILE} and {where / 'report.md'}")
        return
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

