"""The history ring: runs over time. Every finished run's record is added to the results store
(SQLite, the ``store`` setting), and ``fluxopt-report import | compare | history`` read it.

A plugin on the documented hooks like any other: ``disabled_plugins=[fluxopt.history]`` (or
``store=off``) adds nothing to the store and gives the progress line no ETA.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from fluxopt.artifacts import default_cache_dir
from fluxopt.errors import FluxoptError
from fluxopt.history.eta import cache_is_cold, past_durations
from fluxopt.history.store import ResultsStore, store_path
from fluxopt.hookspecs import hookimpl
from fluxopt.record import RESULT_FILE, RunRecord
from fluxopt.shapes import Shapes


@hookimpl
def fluxopt_run_finished(result: RunRecord, output_dir: str) -> None:
    """Add the run's record, as written, to the store. The record on disk is the run's output: a
    store that cannot take it (locked past the timeout, a full disk) is one line, not a failed run."""
    path = store_path(result.config.get("store"))
    if path is None:
        return
    record_file = Path(output_dir) / RESULT_FILE
    try:
        with ResultsStore(path) as store:
            store.add(result, record_file.read_text(), source=str(Path(output_dir).resolve()),
                      label=result.config.get("label"))
    except (FluxoptError, OSError, Exception) as exc:  # noqa: BLE001 - the run's verdict stands without the store
        print(f"fluxopt: not added to the results store {path}: {type(exc).__name__}: {exc}", file=sys.stderr)


@hookimpl
def fluxopt_expected_durations(model: str, device: str, shapes: Shapes, generations: int,
                               config: dict[str, Any]) -> dict[str, float]:
    """Each stack's wall time when it last ran here with these shapes in a run of the same kind
    (measuring or ``build_only``), or its cold one when the artifact cache holds nothing built
    (``eta.py``)."""
    cache_dir = (config.get("cache") or {}).get("dir")
    cold = cache_is_cold(Path(cache_dir).expanduser() if cache_dir else default_cache_dir())
    return past_durations(store_path(config.get("store")), model, device,
                          {"height": shapes.height, "width": shapes.width, "steps": shapes.steps}, generations,
                          cold=cold, build_only=bool(config.get("build_only", False)))
