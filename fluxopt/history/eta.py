"""How long a run's stacks took the last time they ran here (the progress line's ETA).

The estimate for each planned stack is its wall time (``elapsed_s``: load, apply, build, warm-up,
timing, fidelity) in the stored runs of the same stack, model, device and shapes, chosen by the
state of this machine's artifact cache: with built artifacts in it, the most recent run's (a
stack whose last run built warm is expected to build warm again); with none (a fresh machine, or
a cleared cache, where every build is cold), the longest seen, which is its cold build. Only runs
of the same kind count: a ``build_only`` run's wall time leaves out the measuring, so it says
nothing of a run that measures (the warm run after a priming one), nor the other way round. The
baseline's is its wall time too; in a record from before the baseline's
was kept, the generations the coming baseline makes at its measured latency. A stack never measured here has no estimate; the
progress line then says how many are unknown instead of guessing.
"""

from __future__ import annotations

from pathlib import Path

from fluxopt.artifacts import ArtifactCache
from fluxopt.history.store import ResultsStore
from fluxopt.record import RunRecord

RECENT_RUNS = 50  # the estimate reads only this many of the newest runs of the model on the device


def _same_setting(record: RunRecord, model: str, device: str, shapes: dict[str, int]) -> bool:
    return (record.model.get("name") == model and record.device == device
            and all(record.shapes.get(k) == v for k, v in shapes.items()))


def past_durations(store_path: Path | None, model: str, device: str, shapes: dict[str, int],
                   generations: int, cold: bool = False, build_only: bool = False) -> dict[str, float]:
    """Seconds per stack name (``baseline`` included) from the newest matching stored run of each,
    or with ``cold`` (no built artifact in the cache) the longest; ``generations``: the baseline's
    generations (see ``fluxopt_expected_durations``), for a record that kept only its latency;
    ``build_only``: the coming run's kind, the only kind of stored run read."""
    if store_path is None or not store_path.is_file():
        return {}
    with ResultsStore(store_path) as store:  # oldest first: later runs overwrite
        runs = store.select(model=model, device=device, newest=RECENT_RUNS).runs
    found: dict[str, float] = {}

    def seen(name: str, seconds: float) -> None:
        found[name] = max(found.get(name, 0.0), seconds) if cold else seconds

    for run in runs:
        record = run.record
        if not _same_setting(record, model, device, shapes) or record.build_only != build_only:
            continue
        if record.baseline is not None and record.baseline.elapsed_s:
            seen("baseline", record.baseline.elapsed_s)
        elif record.baseline is not None and record.baseline.latency is not None:  # recorded before elapsed_s
            seen("baseline", record.baseline.latency.median * generations)
        for stack in record.stacks:
            if stack.elapsed_s and stack.status != "skipped":
                seen(stack.stack, stack.elapsed_s)
    return found


def cache_is_cold(cache_dir: Path) -> bool:
    """Whether the artifact cache holds nothing a build made: then every stack builds cold."""
    return not ArtifactCache(cache_dir).has_builds()
