"""``fluxopt-report import | compare | history``: the results store from the command line.

    fluxopt-report import DIR_OR_FILE... [--label L]     add the records found to the store
    fluxopt-report compare A B [--max-regression 0.05] [--stack NAME]... [--json] [--output FILE]
                                                         A, B: a run or sweep directory, a label in
                                                         the store, or a revision (a git name or a
                                                         prefix of a recorded revision)
    fluxopt-report history [--stack S] [--model M] [--device D] [--by date|revision|torch]
                           [--plot FILE]                 per-stack speed over time: table and PNG

Every command takes ``--store PATH`` (default: ``$FLUXOPT_STORE``, else ``fluxopt.sqlite`` in the
working directory). ``compare`` exits 1 when a stack regresses beyond ``--max-regression`` or
loses its fidelity gate, 0 otherwise, and 2 for bad input: usable as a CI gate.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fluxopt.errors import ConfigError, ExitStatus, OneLineParser
from fluxopt.files import write_text_atomic
from fluxopt.history import trend
from fluxopt.history.compare import DEFAULT_MAX_REGRESSION, compare, render_markdown
from fluxopt.history.store import ResultsStore, find_records, store_path
from fluxopt.record import RunRecord

COMMANDS = ("import", "compare", "history")


def _store_argument(parser: OneLineParser) -> None:
    parser.add_argument("--store", default=None,
                        help="the SQLite results store (default: $FLUXOPT_STORE, else ./fluxopt.sqlite)")


def _open_store(setting: str | None, must_exist: bool) -> ResultsStore:
    path = store_path(setting)
    if path is None:
        raise ConfigError(f"--store={setting}: the store is switched off; name a file")
    if must_exist and not path.is_file():
        raise ConfigError(f"--store={path}: no such results store (runs add themselves to it; "
                          "`fluxopt-report import DIR` adds existing ones)")
    return ResultsStore(path)


def cmd_import(argv: list[str]) -> int:
    parser = OneLineParser(prog="fluxopt-report import", description="Add every fluxopt record found to the store.")
    parser.add_argument("paths", type=Path, nargs="+", help="run or sweep directories, result files, published records")
    parser.add_argument("--label", default=None, help="a name for these runs in the store (for compare)")
    _store_argument(parser)
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        parser.error(f"no such file or directory: {', '.join(missing)}")
    if args.label is not None and not args.label.strip():
        parser.error("--label is empty; give a name")
    found = find_records(args.paths)
    counts = {"added": 0, "updated": 0, "unchanged": 0}
    with _open_store(args.store, must_exist=False) as store:
        for record, text in found.records:
            source = str(record.path.parent.resolve()) if record.path and record.path.name == "result.json" else str(record.path)
            counts[store.add(record, text, source=source, label=args.label)] += 1
        total = store.count()
        where = store.path
    for why in found.unusable:
        print(f"fluxopt-report: not used: {why}", file=sys.stderr)
    print(f"{counts['added']} run(s) added, {counts['updated']} updated, {counts['unchanged']} already there "
          f"({total} in {where}); {len(found.unusable)} not used"
          + (f", {found.not_records} other JSON file(s) skipped" if found.not_records else ""))
    return ExitStatus.OK if not found.unusable else ExitStatus.STACK_FAILED


@dataclass
class Side:
    """One side of a comparison: its records, where they came from, and what could not be used."""

    name: str
    records: list[RunRecord] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)


def _git_revision(name: str) -> str | None:
    try:
        proc = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def resolve_side(spec: str, store_setting: str | None, setting: str) -> Side:
    """A directory (its records), else a label in the store, else a revision: a git name resolved
    in the working directory or a prefix (4+ hex digits) of a stored run's revision."""
    side = Side(spec)
    path = Path(spec)
    if path.exists():
        found = find_records([path])
        side.records = [record for record, _ in found.records]
        side.unusable = found.unusable
        if not side.records:
            raise ConfigError(f"{setting}={spec} holds no readable fluxopt record"
                              + (f" ({found.unusable[0]})" if found.unusable else ""))
        return side
    path = store_path(store_setting)
    if path is None or not path.is_file():
        raise ConfigError(f"{setting}={spec} is not a directory, and there is no results store to find it in "
                          f"({path or 'store off'})")
    with ResultsStore(path) as store:
        labels = store.labels()
        if spec in labels:
            selection = store.select(label=spec)
        else:
            revision = _git_revision(spec) or (spec.lower() if re.fullmatch(r"[0-9a-fA-F]{4,40}", spec) else None)
            selection = store.select(revision=revision) if revision else None
            if selection is None or not (selection.runs or selection.unusable):
                raise ConfigError(f"{setting}={spec} is not a directory, a label in {path} "
                                  f"({', '.join(labels) or 'none stored'}) or the revision of a stored run")
    side.records = [run.record for run in selection.runs]
    side.unusable = selection.unusable
    return side


def cmd_compare(argv: list[str]) -> int:
    parser = OneLineParser(prog="fluxopt-report compare",
                           description="Compare two sets of runs stack by stack (exit 1 on a regression).")
    parser.add_argument("a", help="the reference: a run or sweep directory, a store label or a revision")
    parser.add_argument("b", help="the candidate, in the same forms")
    parser.add_argument("--max-regression", type=float, default=DEFAULT_MAX_REGRESSION,
                        help=f"slower than this fraction is a regression (default {DEFAULT_MAX_REGRESSION})")
    parser.add_argument("--stack", action="append", default=[], metavar="NAME",
                        help="compare only this stack (repeatable; e.g. the one you serve, and baseline)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown (or JSON) to this file")
    _store_argument(parser)
    args = parser.parse_args(argv)
    if not (0 <= args.max_regression < 10):
        parser.error(f"--max-regression={args.max_regression} is not a fraction between 0 and 10 (0.05: 5 %)")
    try:
        a = resolve_side(args.a, args.store, "A")
        b = resolve_side(args.b, args.store, "B")
    except ConfigError as exc:
        parser.error(str(exc))
    result = compare(a.records, b.records, a.name, b.name, args.max_regression, args.stack)
    result.unusable = [f"{a.name}: {why}" for why in a.unusable] + [f"{b.name}: {why}" for why in b.unusable]
    if not result.stacks:
        parser.error(f"no stack of {a.name} matches one of {b.name} (same stack, options, shapes, model and device"
                     + (f", named by --stack {' '.join(args.stack)}" if args.stack else "") + "); "
                     f"only in A: {'; '.join(result.only_a) or 'none'}; only in B: {'; '.join(result.only_b) or 'none'}")
    text = json.dumps(result.to_json(), indent=2) + "\n" if args.json else render_markdown(result)
    if args.output is not None:
        write_text_atomic(args.output, text)
    sys.stdout.write(text)
    for why in result.regressions:
        print(f"fluxopt-report: regression: {why}", file=sys.stderr)
    return ExitStatus.STACK_FAILED if result.regressions else ExitStatus.OK


def cmd_history(argv: list[str]) -> int:
    parser = OneLineParser(prog="fluxopt-report history", description="Per-stack speed over time, from the store.")
    parser.add_argument("--stack", default=None, help="only this stack (e.g. baseline, fp8_max)")
    parser.add_argument("--model", default=None, help="only this model")
    parser.add_argument("--device", default=None, help="only devices whose name contains this (e.g. H200)")
    parser.add_argument("--by", choices=trend.AXES, default="date", help="what the runs are labelled by")
    parser.add_argument("--plot", type=Path, default=Path("fluxopt-history.png"), help="where the PNG goes")
    _store_argument(parser)
    args = parser.parse_args(argv)
    if args.plot.suffix.lower() != ".png":
        parser.error(f"--plot={args.plot} is not a .png file")
    try:
        with _open_store(args.store, must_exist=True) as store:
            selection = store.select()
    except ConfigError as exc:
        parser.error(str(exc))
    for why in selection.unusable:
        print(f"fluxopt-report: not used: {why}", file=sys.stderr)
    found = trend.series(selection.runs, stack=args.stack, model=args.model, device=args.device)
    if not found:
        parser.error("no stored run matches "
                     + (", ".join(f"--{k}={v}" for k, v in (("stack", args.stack), ("model", args.model),
                                                             ("device", args.device)) if v) or "(the store is empty)"))
    print(trend.render_markdown(found, args.by))
    print(f"plot: {trend.plot(found, args.plot, args.by)}")
    return ExitStatus.OK


def main(argv: list[str]) -> int:
    """Run one of :data:`COMMANDS` (``argv[0]``) and return its exit status."""
    return {"import": cmd_import, "compare": cmd_compare, "history": cmd_history}[argv[0]](argv[1:])
