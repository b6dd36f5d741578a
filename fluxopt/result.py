"""The result records: one ``StackResult`` per stack, gathered with the baseline, config,
environment and provenance into ``result.json`` (versioned schema), always written atomically."""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fluxopt.files import move_aside

SCHEMA_VERSION = 2
RESULT_FILE = "result.json"


class Phase(str, enum.Enum):
    """Where a stack was when it failed; reported with the reason."""

    VALIDATE = "validate"
    LOAD = "load"
    APPLY = "apply"
    BUILD = "build"
    WARMUP = "warmup"
    TIMING = "timing"
    FIDELITY = "fidelity"


class Status(str, enum.Enum):
    OK = "ok"
    FAILED = "failed"  # build/run error, fidelity gate missed
    SKIPPED = "skipped"  # cannot run on this machine (in a bake-off of everything; a requested stack fails)


@dataclass
class StackResult:
    stack: str  # "compile+fbcache" ("baseline" for the empty stack)
    backends: list[str]
    status: str  # a Status value
    reason: str | None = None
    phase: str | None = None  # for failures: a Phase value
    options: dict[str, Any] = field(default_factory=dict)
    lossless: bool | None = None
    latency: dict[str, Any] | None = None  # end-to-end seconds (LatencyStats)
    step_latency: dict[str, Any] | None = None  # seconds per denoising step
    first_call_s: float | None = None
    build_s: float | None = None
    build_phases_s: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    memory_kind: str | None = None
    # GPU memory the closed stack left allocated beyond what was allocated before it (a leak that
    # would inflate every later stack's peak); None on the CPU
    left_allocated_bytes: int | None = None
    speedup: float | None = None  # baseline median / stack median
    speedup_uncertainty: float | None = None
    within_noise: bool | None = None
    fidelity: dict[str, Any] | None = None
    stats: dict[str, Any] = field(default_factory=dict)  # backend-reported numbers (steps skipped...)
    profile: dict[str, Any] | None = None  # one step's breakdown (bench.profile=true)
    images: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class UnreadableResult(Exception):
    """A result.json that exists but is not one fluxopt can use (bad JSON, wrong shape, other
    schema version); the caller moves it aside rather than overwriting it."""


def load_result(path: Path) -> dict[str, Any] | None:
    """The record at ``path`` (complete or not), None when absent; UnreadableResult when it
    cannot be parsed or is not a fluxopt result of this schema."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UnreadableResult(f"{path}: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UnreadableResult(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("stacks", []), list):
        raise UnreadableResult(f"{path} is not a fluxopt result (expected an object with 'stacks')")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise UnreadableResult(f"{path} has schema_version {data.get('schema_version')!r}, "
                               f"this fluxopt reads {SCHEMA_VERSION}")
    return data


def read_result(path: Path) -> dict[str, Any] | None:
    """A complete, readable result.json, or None (missing, unreadable or from an interrupted run)."""
    try:
        data = load_result(path)
    except UnreadableResult:
        return None
    return data if data is not None and data.get("complete") else None


def keep_previous_result(directory: Path) -> Path | None:
    """Move an existing result.json aside (never overwrite what was measured)."""
    current = directory / RESULT_FILE
    if not current.exists():
        return None
    return move_aside(current, "previous")
