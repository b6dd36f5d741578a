"""The result records: one ``StackResult`` per stack, gathered with the baseline, config and
environment into ``result.json`` (versioned schema), always written atomically."""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
RESULT_FILE = "result.json"

# Where a stack failed; reported with the reason.
PHASES = ("validate", "load", "apply", "build", "warmup", "timing", "fidelity")


@dataclass
class StackResult:
    stack: str  # "compile+fbcache" ("baseline" for the empty stack)
    backends: list[str]
    status: str  # ok | failed | skipped
    reason: str | None = None
    phase: str | None = None  # for failures: one of PHASES
    options: dict[str, Any] = field(default_factory=dict)
    lossless: bool | None = None
    latency: dict[str, Any] | None = None  # end-to-end seconds (LatencyStats)
    step_latency: dict[str, Any] | None = None  # seconds per denoising step
    first_call_s: float | None = None
    build_s: float | None = None
    build_phases_s: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    speedup: float | None = None  # baseline median / stack median
    speedup_uncertainty: float | None = None
    within_noise: bool | None = None
    fidelity: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # backend-reported numbers (steps skipped...)
    images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same directory, then rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(_finite_or_none(data), handle, indent=2, allow_nan=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_result(path: Path) -> dict[str, Any] | None:
    """A complete result.json, or None if it is missing, unreadable or from an interrupted run."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("schema_version") != SCHEMA_VERSION or not data.get("complete"):
        return None
    return data


def keep_previous_result(directory: Path) -> Path | None:
    """Move an existing result.json aside (never overwrite what was measured)."""
    current = directory / RESULT_FILE
    if not current.exists():
        return None
    stamp = datetime.fromtimestamp(current.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = directory / f"result.{stamp}.json"
    n = 1
    while target.exists():
        target = directory / f"result.{stamp}-{n}.json"
        n += 1
    os.replace(current, target)
    return target
