"""The results store: every run's record in one SQLite file, so that bake-offs can be compared
over time (``fluxopt-report compare``, ``fluxopt-report history``).

What is stored is each record exactly as written (result.json's text) plus the facts it is found
by (label, start time, device, model, revision, torch version, stack identities). No derived
figure is stored on its own: a stored record is read back through fluxopt's one reader, which
re-derives speedups, statistics and verdicts from the raw samples, as for a file.

Concurrency: the database is in WAL mode and every insert is one ``BEGIN IMMEDIATE``
transaction, so the processes of a parallel sweep (joblib, Ray, submitit) can insert at once; a
writer that finds the database locked waits (``busy_timeout``) instead of failing.

Schema changes are numbered migrations (``MIGRATIONS``, recorded in ``PRAGMA user_version``),
applied in order when an older store is opened; a store written by a newer fluxopt is refused
with one line, never rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from fluxopt.errors import ConfigError
from fluxopt.record import (
    RESULT_FILE,
    RunRecord,
    StackRecord,
    UnreadableRecord,
    record_from_json,
)

STORE_ENV = "FLUXOPT_STORE"
DEFAULT_STORE = "fluxopt.sqlite"  # in the working directory, beside Hydra's outputs/ and multirun/
OFF = ("off", "none", "false", "no")
BUSY_TIMEOUT_S = 60.0

# Each entry upgrades the schema by one version; never edit a released one, append a new one.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY,
        identity TEXT NOT NULL UNIQUE,  -- one run, wherever its record was copied (see run_identity)
        label TEXT,
        source TEXT,                    -- where the record was read from
        started TEXT, finished TEXT, complete INTEGER NOT NULL,
        model TEXT NOT NULL, device TEXT NOT NULL,
        revision TEXT, torch TEXT, fluxopt TEXT,
        added TEXT NOT NULL,
        record TEXT NOT NULL            -- the record as written; derived figures are re-derived on read
    );
    CREATE INDEX runs_label ON runs(label);
    CREATE INDEX runs_revision ON runs(revision);
    CREATE TABLE stacks (
        run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
        position INTEGER NOT NULL,      -- 0: the baseline
        stack TEXT NOT NULL,
        match_key TEXT NOT NULL,        -- stack, options, shapes, model, device (see match_key)
        status TEXT NOT NULL,
        PRIMARY KEY (run_id, position)
    );
    CREATE INDEX stacks_match ON stacks(match_key);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of ``script`` (``;`` inside comments and strings does not end one)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer
            buffer = ""
    if buffer.strip():
        yield buffer


def store_path(setting: str | None) -> Path | None:
    """Where the store is: the ``store`` setting, else ``$FLUXOPT_STORE``, else ``fluxopt.sqlite`` in
    the working directory; None when the setting (or the variable) is ``off``."""
    value = setting if setting not in (None, "") else os.environ.get(STORE_ENV) or DEFAULT_STORE
    if str(value).strip().lower() in OFF:
        return None
    return Path(str(value)).expanduser()


def run_identity(record: RunRecord) -> str:
    """What makes two copies of a record the same run: its start, its invocation and job, model and
    device. A run resumed later is the same run (its newer record replaces the older)."""
    job = record.provenance.get("job")
    parts = [record.started, record.provenance.get("invocation"), json.dumps(job, sort_keys=True, default=str),
             record.model.get("name"), record.device]
    if record.started is None and record.provenance.get("invocation") is None:
        parts.append(hashlib.sha256(json.dumps(record.to_json(), sort_keys=True, default=str).encode()).hexdigest())
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:32]


def match_key(record: RunRecord, stack: StackRecord) -> str:
    """Which measurements are of the same thing: stack and options, shapes, model and device."""
    return json.dumps({"stack": stack.stack, "options": stack.options, "shapes": record.shapes,
                       "model": record.model.get("name"), "device": record.device}, sort_keys=True, default=str)


@dataclass
class StoredRun:
    """A run read back from the store (its figures re-derived by the reader)."""

    id: int
    label: str | None
    source: str | None
    added: str
    record: RunRecord


@dataclass
class Selection:
    """Runs picked from the store and the rows that could not be used, each with why."""

    runs: list[StoredRun] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)


class ResultsStore:
    """One SQLite results store; opening it creates or migrates it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"store={self.path} is a directory; give a file path for the SQLite store")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"store={self.path} is not a fluxopt results store ({exc})") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    def _migrate(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            version = self.schema_version
            if version > SCHEMA_VERSION:
                raise ConfigError(f"store={self.path} has schema version {version}; this fluxopt reads up to "
                                  f"{SCHEMA_VERSION} (upgrade fluxopt, or choose another store=)")
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={number}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def add(self, record: RunRecord, text: str, source: str | None = None, label: str | None = None) -> str:
        """Insert ``record`` (read from ``text`` by the one reader) in one transaction. Returns
        ``added``, ``updated`` (a newer version of a stored run, e.g. a resumed run that finished) or
        ``unchanged``. An edited record is refused: its stored figures disagree with its samples."""
        if record.edited:
            raise UnreadableRecord(f"{source or record.path}: edited ({'; '.join(record.edited)})")
        identity = run_identity(record)
        env = record.environment
        row = (label, source, record.started, record.finished, int(record.complete), record.model.get("name"),
               record.device, (env.get("git") or {}).get("revision"), (env.get("packages") or {}).get("torch"),
               env.get("fluxopt_version"), datetime.now(timezone.utc).isoformat(timespec="seconds"), text)
        self._db.execute("BEGIN IMMEDIATE")
        try:
            found = self._db.execute("SELECT id, record, label FROM runs WHERE identity=?", (identity,)).fetchone()
            if found is not None and found[1] == text and (label is None or label == found[2]):
                self._db.execute("COMMIT")
                return "unchanged"
            if found is not None:
                self._db.execute("DELETE FROM runs WHERE id=?", (found[0],))
                row = (label if label is not None else found[2], *row[1:])
            cursor = self._db.execute(
                "INSERT INTO runs (label, source, started, finished, complete, model, device, revision, torch, "
                "fluxopt, added, record, identity) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", (*row, identity))
            stacks = ([record.baseline] if record.baseline else []) + list(record.stacks)
            offset = 0 if record.baseline else 1
            self._db.executemany("INSERT INTO stacks (run_id, position, stack, match_key, status) VALUES (?,?,?,?,?)",
                                 [(cursor.lastrowid, i + offset, s.stack, match_key(record, s), s.status)
                                  for i, s in enumerate(stacks)])
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return "updated" if found is not None else "added"

    def select(self, label: str | None = None, revision: str | None = None, model: str | None = None,
               device: str | None = None, newest: int | None = None) -> Selection:
        """Runs with ``label`` / whose revision starts with ``revision`` / of ``model`` on ``device``
        (all runs when none is given), oldest first, each read back through the reader; ``newest``:
        only that many of the most recent."""
        query, args = "SELECT id, label, source, added, record FROM runs", []
        where = []
        for column, value in (("label", label), ("model", model), ("device", device)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if revision is not None:
            where.append("revision LIKE ? ESCAPE '\\'")
            args.append(revision.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if where:
            query += " WHERE " + " AND ".join(where)
        query += " ORDER BY started DESC, id DESC" + (f" LIMIT {int(newest)}" if newest is not None else "")
        selection = Selection()
        for run_id, run_label, source, added, text in reversed(self._db.execute(query, args).fetchall()):
            where_from = Path(f"{self.path}#run{run_id}")
            try:
                record = record_from_json(json.loads(text), where_from)
            except (UnreadableRecord, ValueError, TypeError, KeyError) as exc:
                selection.unusable.append(f"{where_from} (from {source}): {exc}")
                continue
            if record.edited:
                selection.unusable.append(f"{where_from} (from {source}): edited ({'; '.join(record.edited)})")
                continue
            selection.runs.append(StoredRun(run_id, run_label, source, added, record))
        return selection

    def labels(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT DISTINCT label FROM runs WHERE label IS NOT NULL ORDER BY label")]

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def integrity(self) -> str:
        return str(self._db.execute("PRAGMA integrity_check").fetchone()[0])


# --------------------------------------------------------------------------- finding records on disk
@dataclass
class Found:
    """Records found below some paths (with the text each was read from) and what was not used."""

    records: list[tuple[RunRecord, str]] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)
    not_records: int = 0  # JSON files that are not fluxopt records (other measurements)


def _json_files(paths: Sequence[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.json") if p.is_file())
        else:
            yield path


def find_records(paths: Sequence[Path]) -> Found:
    """Every fluxopt record in ``paths`` (directories are searched): result.json files, and the
    older published bundles (``{"runs": [{"command": ..., "result": {...}}]}``), each through the
    one reader. A file named result.json that cannot be read, or a bundled record of a schema this
    fluxopt does not read, is named with why; other JSON files are counted, not named."""
    found = Found()
    for path in _json_files(paths):
        try:
            text = path.read_text()
            data = json.loads(text)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            if path.name == RESULT_FILE:
                found.unusable.append(f"{path}: {getattr(exc, 'strerror', None) or exc}")
            else:
                found.not_records += 1
            continue
        if isinstance(data, dict) and isinstance(data.get("runs"), list) and all(
                isinstance(r, dict) and "result" in r for r in data["runs"]):
            entries = [(Path(f"{path}#runs[{i}]"), r["result"]) for i, r in enumerate(data["runs"])]
        elif path.name == RESULT_FILE or (isinstance(data, dict) and "schema_version" in data and "stacks" in data):
            entries = [(path, data)]
        else:
            found.not_records += 1
            continue
        for where, entry in entries:
            try:
                record = record_from_json(entry, where)
            except (UnreadableRecord, ValueError, TypeError, KeyError) as exc:
                found.unusable.append(str(exc) if isinstance(exc, UnreadableRecord) else f"{where}: {exc}")
                continue
            if record.edited:
                found.unusable.append(f"{where}: edited ({'; '.join(record.edited)})")
                continue
            found.records.append((record, text if where == path else json.dumps(entry)))
    return found
