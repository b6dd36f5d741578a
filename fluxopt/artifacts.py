"""The artifact cache: where built things live (model checkpoints fluxopt makes, compiled
graphs, exported packages, engines), verified before every use.

Layout under the cache directory (``cache.dir``, ``$FLUXOPT_CACHE_DIR`` or ``~/.cache/fluxopt``)::

    artifacts/<kind>/<digest>/          one built entry (kind: a backend's name, or ``model``)
        manifest.json                   the full key and the sha256 + size of every file
        ...                             what the backend's build wrote
    artifacts/<kind>/<digest>.lock      held while the entry is built
    inductor/                           torch.compile's own caches (FX graph, autotune, Triton)

An entry is complete when its manifest exists: the build happens in a temporary sibling,
the manifest is written last and the directory is renamed into place. On every load the
manifest's key is compared with the expected key and every file's checksum is verified; a
partial, corrupt, foreign or unsafe (not ours, group/world-writable) entry is reported and
rebuilt, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fluxopt.environment import DeviceInfo, package_versions
from fluxopt.errors import ExitStatus, FluxoptError
from fluxopt.files import dir_size, file_lock, file_sha256, lock_is_free, private_dir, walk_files

log = logging.getLogger("fluxopt.artifacts")

# Bump when the layout of cache entries changes: older entries are then never read.
CACHE_FORMAT_VERSION = 3

MANIFEST = "manifest.json"
ARTIFACTS = "artifacts"
INDUCTOR = "inductor"


def default_cache_dir() -> Path:
    """``$FLUXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fluxopt``, else ``~/.cache/fluxopt``."""
    if os.environ.get("FLUXOPT_CACHE_DIR"):
        return Path(os.environ["FLUXOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fluxopt"


# ---------------------------------------------------------------------------------- keys
def environment_key(device: DeviceInfo) -> dict[str, Any]:
    """Everything about this machine that makes a built artifact non-portable."""
    return {"device": {"type": device.type, "name": device.name,
                       "capability": list(device.capability) if device.capability else None,
                       "rocm": device.rocm},
            "runtime": {"cuda": torch.version.cuda, "hip": torch.version.hip, "machine": platform.machine(),
                        "python": f"{sys.version_info.major}.{sys.version_info.minor}"},
            "versions": package_versions(), "cache_format": CACHE_FORMAT_VERSION}


def entry_key(key: Mapping[str, Any], device: DeviceInfo) -> dict[str, Any]:
    """``key`` plus everything that makes a built artifact non-portable, JSON-normalised."""
    return _normalise({**key, **environment_key(device)})


def _normalise(value: Any) -> Any:
    """The JSON form of a key (tuples become lists, unknown objects their str), so that the
    key written into a manifest compares equal to the key recomputed later."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def key_digest(full_key: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(full_key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def key_difference(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields where two normalised keys differ (nested mappings descended)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [name for k in sorted(set(a) | set(b))
                for name in key_difference(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def key_summary(full_key: Mapping[str, Any]) -> str:
    """One line naming what an entry is for (for ``fluxopt-cache ls`` and logs)."""
    device = full_key.get("device") or {}
    versions = full_key.get("versions") or {}
    shapes = full_key.get("shapes") or {}
    parts = [str(full_key.get("model") or "-")]
    if shapes:
        parts.append(f"{shapes.get('height')}x{shapes.get('width')}/seq{shapes.get('max_sequence_length')}")
    if full_key.get("dtype"):
        parts.append(str(full_key["dtype"]).removeprefix("torch."))
    parts.append(str(device.get("name") or device.get("type") or "-"))
    parts.append(f"torch {versions.get('torch') or '-'}")
    return " ".join(parts)


def _unsafe(path: Path, uid: int) -> str | None:
    """Why ``path`` may not be trusted (owner, permissions, link), or None."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{path.name} is a symbolic link"
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):o})"
    return None


# ---------------------------------------------------------------------------------- cache
@dataclass
class Verdict:
    """What checking an entry found: ``reason`` is None for a valid entry."""

    reason: str | None
    manifest: dict[str, Any] | None = None

    @property
    def valid(self) -> bool:
        return self.reason is None


@dataclass
class CacheResult:
    """One ``ArtifactCache.get``: where the entry is and how it was obtained."""

    path: Path
    cache_hit: bool  # a valid entry was there (possibly built meanwhile by another process)
    built: bool  # this process built it
    rebuilt: str | None = None  # why an existing entry was discarded and rebuilt
    nearest: str | None = None  # on a miss: how the closest entry of the same kind was keyed differently
    waited_for_other_builder: bool = False
    verify_s: float = 0.0
    build_s: float = 0.0
    size_bytes: int = 0

    def to_stats(self) -> dict[str, Any]:
        stats = {"path": str(self.path), "cache_hit": self.cache_hit, "built": self.built,
                 "verify_s": round(self.verify_s, 4), "size_bytes": self.size_bytes}
        if self.build_s:
            stats["build_s"] = round(self.build_s, 4)
        if self.rebuilt:
            stats["rebuilt"] = self.rebuilt
        if self.nearest:
            stats["nearest"] = self.nearest
        if self.waited_for_other_builder:
            stats["waited_for_other_builder"] = True
        return stats


class CacheLayoutError(FluxoptError):
    """Something in the cache directory is not what the cache put there (a file in place of one of
    its directories): the run cannot use the cache until the user moves it."""

    exit_status = ExitStatus.STACK_FAILED


class ArtifactCache:
    """Verified, locked, atomically written cache entries under ``root/artifacts/<kind>/``."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser()

    @property
    def artifacts_dir(self) -> Path:
        return self.root / ARTIFACTS

    def entry_path(self, kind: str, full_key: Mapping[str, Any]) -> Path:
        if not kind or "/" in kind or kind.startswith("."):
            raise ValueError(f"bad artifact kind {kind!r}")
        return self.artifacts_dir / kind / key_digest(full_key)

    # ------------------------------------------------------------------ checking
    def verify(self, path: Path, expected_key: Mapping[str, Any] | None = None) -> Verdict:
        """Check an entry: ownership and permissions, manifest, key, file set, sizes, checksums."""
        if not path.exists():
            return Verdict("absent")
        uid = os.getuid()
        for p in (path.parent.parent, path.parent, path):  # artifacts/, artifacts/<kind>/, the entry
            reason = _unsafe(p, uid)
            if reason:
                return Verdict(f"unsafe entry: {reason}")
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            return Verdict("incomplete entry (no manifest)")
        reason = _unsafe(manifest_path, uid)
        if reason:
            return Verdict(f"unsafe entry: {reason}")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            key = manifest["key"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            return Verdict(f"unreadable manifest ({type(exc).__name__})")
        if manifest.get("cache_format") != CACHE_FORMAT_VERSION:
            return Verdict(f"cache format {manifest.get('cache_format')} (expected {CACHE_FORMAT_VERSION})", manifest)
        if key_digest(key) != path.name:
            return Verdict("key mismatch: the manifest's key does not hash to this entry's name", manifest)
        if expected_key is not None and _normalise(key) != _normalise(expected_key):
            return Verdict("key mismatch: the entry was built for another key", manifest)
        present = {rel: p for rel, p in walk_files(path) if rel != MANIFEST}
        for rel in sorted(set(present) - set(files)):
            return Verdict(f"unexpected file {rel}", manifest)
        for rel in sorted(files):
            if rel not in present:
                return Verdict(f"missing file {rel}", manifest)
            reason = _unsafe(present[rel], uid)
            if reason:
                return Verdict(f"unsafe entry: {reason}", manifest)
            size = os.lstat(present[rel]).st_size
            if size != files[rel]["size"]:
                return Verdict(f"truncated or changed file {rel} ({size} bytes, manifest says {files[rel]['size']})",
                               manifest)
            if file_sha256(present[rel]) != files[rel]["sha256"]:
                return Verdict(f"checksum mismatch in {rel}", manifest)
        return Verdict(None, manifest)

    # ------------------------------------------------------------------ building
    def lookup(self, kind: str, full_key: Mapping[str, Any]) -> tuple[Path | None, str | None]:
        """The valid entry for ``full_key`` or None, and why an existing entry was discarded.

        An invalid entry is reported and removed (under the lock) so that it is never loaded.
        """
        full_key = _normalise(full_key)
        target = self.entry_path(kind, full_key)
        if self.verify(target, full_key).valid:
            return target, None
        with file_lock(target.with_name(target.name + ".lock")):
            verdict = self.verify(target, full_key)
            if verdict.valid:
                return target, None
            if verdict.reason != "absent":
                self._discard(target, verdict.reason)
                return None, verdict.reason
        return None, None

    def get(self, kind: str, full_key: Mapping[str, Any], build: Callable[[Path], None]) -> CacheResult:
        """The entry for ``full_key``, built with ``build(tmp_dir)`` if absent or invalid. A file
        where the cache needs a directory is :class:`CacheLayoutError`, naming it and the setting."""
        try:
            return self._get(kind, full_key, build)
        except (NotADirectoryError, FileExistsError) as exc:
            blocking = next((p for p in (Path(exc.filename), *Path(exc.filename).parents)
                             if p.exists() and not p.is_dir()), Path(exc.filename))
            raise CacheLayoutError(f"the cache directory {self.root} (cache.dir, else $FLUXOPT_CACHE_DIR) has a file "
                                   f"where a directory is needed: {blocking}; move that file away, or set "
                                   "cache.dir=<another directory>") from None

    def _get(self, kind: str, full_key: Mapping[str, Any], build: Callable[[Path], None]) -> CacheResult:
        full_key = _normalise(full_key)
        target = self.entry_path(kind, full_key)
        start = time.perf_counter()
        if self.verify(target, full_key).valid:
            return CacheResult(target, cache_hit=True, built=False, verify_s=time.perf_counter() - start,
                               size_bytes=dir_size(target))
        lock_path = target.with_name(target.name + ".lock")
        waited = not lock_is_free(lock_path)
        with file_lock(lock_path):
            verify_start = time.perf_counter()
            verdict = self.verify(target, full_key)
            verify_s = time.perf_counter() - verify_start
            if verdict.valid:  # another process built it while we waited for the lock
                return CacheResult(target, cache_hit=True, built=False, waited_for_other_builder=True,
                                   verify_s=verify_s, size_bytes=dir_size(target))
            rebuilt = nearest = None
            if verdict.reason != "absent":
                rebuilt = verdict.reason
                self._discard(target, rebuilt)
            else:
                nearest = self.nearest_entry(kind, full_key)
                if nearest:
                    log.info("artifact cache: no %s entry for this key; %s", kind, nearest)
            build_start = time.perf_counter()
            self._build(target, full_key, build)
            return CacheResult(target, cache_hit=False, built=True, rebuilt=rebuilt, nearest=nearest,
                               waited_for_other_builder=waited, verify_s=verify_s,
                               build_s=time.perf_counter() - build_start, size_bytes=dir_size(target))

    def nearest_entry(self, kind: str, full_key: Mapping[str, Any]) -> str | None:
        """On a miss, the entry of ``kind`` whose key differs from ``full_key`` in the fewest fields,
        and those fields: what tells a user (and a record) why a build they expected to be warm was
        cold. Reads manifests only; None when the kind has no entry."""
        best: tuple[int, str, list[str]] | None = None
        kind_dir = self.artifacts_dir / kind
        for manifest_path in sorted(kind_dir.glob(f"*/{MANIFEST}")) if kind_dir.is_dir() else ():
            try:
                key = json.loads(manifest_path.read_text())["key"]
            except (OSError, ValueError, KeyError, TypeError):
                continue
            fields = key_difference(_normalise(key), _normalise(full_key))
            if best is None or len(fields) < best[0]:
                best = (len(fields), manifest_path.parent.name, fields)
        if best is None:
            return None
        return f"the nearest, {best[1]}, was built for a key differing in {', '.join(best[2][:8]) or 'nothing'}"

    def _discard(self, target: Path, reason: str) -> None:
        log.warning("artifact cache: discarding %s: %s; it will be rebuilt", target, reason)
        self.remove(target)

    def _build(self, target: Path, full_key: Mapping[str, Any], build: Callable[[Path], None]) -> None:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=private_dir(target.parent)))
        private_dir(self.artifacts_dir)
        try:
            build(tmp)
            files = {}
            for rel, path in walk_files(tmp):
                if rel == MANIFEST:
                    raise RuntimeError(f"a build may not write {MANIFEST} itself")
                if path.is_symlink():
                    raise RuntimeError(f"a build wrote a symbolic link ({rel}); cache entries hold plain files")
                os.chmod(path, 0o600 | (os.stat(path).st_mode & 0o100))
                files[rel] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
            for dirpath, _, _ in os.walk(tmp):
                os.chmod(dirpath, 0o700)
            manifest = {"cache_format": CACHE_FORMAT_VERSION, "kind": target.parent.name, "key": full_key,
                        "files": files, "created": time.time(), "summary": key_summary(full_key)}
            manifest_tmp = tmp / (MANIFEST + ".tmp")
            with open(manifest_tmp, "w") as handle:
                json.dump(manifest, handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(manifest_tmp, 0o600)
            os.replace(manifest_tmp, tmp / MANIFEST)
            if target.exists() or target.is_symlink():
                self.remove(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def remove(path: Path) -> None:
        """Delete an entry: renamed aside first (atomic), so no reader sees it half deleted."""
        if not (path.exists() or path.is_symlink()):
            return
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    # ------------------------------------------------------------------ listing
    def entry_paths(self) -> Iterator[Path]:
        """The path of every entry and leftover, its kind the parent's name, without inspecting it."""
        if self.artifacts_dir.is_dir():
            for kind_dir in sorted(p for p in self.artifacts_dir.iterdir() if p.is_dir()):
                yield from (path for path in sorted(kind_dir.iterdir()) if not path.name.endswith(".lock"))

    def has_builds(self) -> bool:
        """Whether anything a build made is here (model checkpoints are not builds): cheap, nothing
        is read or verified."""
        inductor = self.root / INDUCTOR
        return (any(path.parent.name != "model" and not path.name.startswith(".") for path in self.entry_paths())
                or (inductor.is_dir() and any(inductor.iterdir())))

    def entries(self) -> Iterator[EntryInfo]:
        """Every entry (model checkpoints included) and leftover in the cache (for ``fluxopt-cache``)."""
        yield from (self.inspect(path) for path in self.entry_paths())
        inductor = self.root / INDUCTOR
        if inductor.is_dir():
            yield EntryInfo(path=inductor, kind="inductor", id=INDUCTOR, size_bytes=dir_size(inductor),
                            mtime=inductor.stat().st_mtime, status="valid", reason=None,
                            summary="torch.compile caches (FX graph, AOT autograd, autotune, Triton)", key=None)

    def inspect(self, path: Path) -> EntryInfo:
        kind = path.parent.name
        mtime = path.lstat().st_mtime
        if path.name.startswith("."):  # temporary directory of a build, or a removal in progress
            digest = path.name[1:].split(".")[0].removeprefix("trash-").split("-")[0]
            return EntryInfo(path=path, kind=kind, id=path.name, size_bytes=dir_size(path) if path.is_dir() else 0,
                             mtime=mtime, status="incomplete", reason="leftover of an interrupted build",
                             summary="-", key=None, building=_building(path.with_name(digest)))
        verdict = self.verify(path)
        manifest = verdict.manifest or {}
        key = manifest.get("key")
        created = manifest.get("created") or mtime
        status = "valid" if verdict.valid else ("incomplete" if verdict.reason.startswith("incomplete")
                                                  else "corrupt")
        return EntryInfo(path=path, kind=kind, id=path.name, size_bytes=dir_size(path) if path.is_dir() else 0,
                         mtime=created, status=status, reason=verdict.reason,
                         summary=key_summary(key) if key else "-", key=key, building=_building(path))


def _building(entry: Path) -> bool:
    return not lock_is_free(entry.with_name(entry.name + ".lock"))


@dataclass
class EntryInfo:
    path: Path
    kind: str
    id: str
    size_bytes: int
    mtime: float
    status: str  # valid | corrupt | incomplete
    reason: str | None
    summary: str
    key: dict[str, Any] | None
    building: bool = False

    def stale_for(self, device: DeviceInfo) -> str | None:
        """Why a valid entry can never be used on this machine/installation, or None."""
        if self.key is None:
            return None
        here = _normalise(environment_key(device))
        for part, label in (("cache_format", "cache format"), ("device", "device"), ("runtime", "runtime"),
                            ("versions", "package versions")):
            if part not in self.key:  # an entry keyed without it (a built checkpoint) is portable there
                continue
            if self.key.get(part) != here[part]:
                if part == "versions":
                    diff = sorted(k for k in set(here[part]) | set(self.key.get(part) or {})
                                  if (self.key.get(part) or {}).get(k) != here[part].get(k))
                    return f"built for other package versions ({', '.join(diff)})"
                return f"built for another {label} ({json.dumps(self.key.get(part), default=str)})"
        return None
