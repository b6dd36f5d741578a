"""``fluxopt-report``: one command over the report ring and the history ring.

    fluxopt-report DIR [--best ...]        summary of a sweep or of the runs below DIR
    fluxopt-report publish RUN_DIR DEST    a run's record and page, for docs/results
    fluxopt-report html DIR                a self-contained HTML report of a run or sweep
    fluxopt-report import PATH...          add records to the results store
    fluxopt-report compare A B             regressions between two sets of runs (CI gate)
    fluxopt-report history                 per-stack speed over time

Each subcommand has ``--help``. fluxopt's own errors are one line (exit 2).
"""

from __future__ import annotations

import sys

from fluxopt.errors import FluxoptError
from fluxopt.history import cli as history_cli
from fluxopt.report import cli as report_cli


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    try:
        if argv[:1] and argv[0] in history_cli.COMMANDS:
            sys.exit(history_cli.main(argv))
        report_cli.run(argv)
    except FluxoptError as exc:
        print(f"fluxopt-report: error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(exc.exit_status)


if __name__ == "__main__":
    main()
