"""The report ring: how results are presented. report.md and report.html of every run, the console table and
verdict sentence of a single run, a sweep's summary files, and the ``fluxopt-report`` command.

A plugin on the documented hooks like any other: ``disabled_plugins=[fluxopt.report]`` writes no
report.md and prints no table (result.json, the record, is the kernel's and always written).
"""

from __future__ import annotations

from pathlib import Path

from fluxopt.hookspecs import hookimpl
from fluxopt.record import RunRecord
from fluxopt.report.html import write_html
from fluxopt.report.summary import fluxopt_sweep_finished  # noqa: F401 - a hook implementation
from fluxopt.report.tables import print_table, verdict_sentence, write_run_report


@hookimpl
def fluxopt_run_finished(result: RunRecord, output_dir: str) -> None:
    write_run_report(result, Path(output_dir))
    write_html(Path(output_dir))  # from the written record: its path locates the run's images


@hookimpl
def fluxopt_terminal_summary(result: RunRecord, output_dir: str) -> None:
    print_table(result)
    print(verdict_sentence(result, Path(output_dir)))
