"""Where built things live (tiny model checkpoint, compiled graphs, exported packages,
engines) and how they are written: atomically, under a lock, in a user-only directory."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fluxopt.environment import DeviceInfo

# Bump when the layout of cache entries changes: older entries are then never read.
CACHE_FORMAT_VERSION = 1

COMPLETE_MARKER = ".complete"


def default_cache_dir() -> Path:
    """``$FLUXOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fluxopt``, else ``~/.cache/fluxopt``."""
    if os.environ.get("FLUXOPT_CACHE_DIR"):
        return Path(os.environ["FLUXOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fluxopt"


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only: cache entries may hold native code."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so two processes never build the same entry at once."""
    private_dir(lock_path.parent)
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_directory(target: Path, builder: Callable[[Path], None]) -> Path:
    """Return ``target``, building it first with ``builder(tmp_dir)`` if it is not complete.

    The build happens in a temporary sibling that is renamed into place, so a killed build
    never leaves a half-written entry that looks valid.
    """
    if (target / COMPLETE_MARKER).exists():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if (target / COMPLETE_MARKER).exists():  # another process finished it meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=private_dir(target.parent)))
        try:
            builder(tmp)
            (tmp / COMPLETE_MARKER).touch()
            if target.exists():  # an incomplete leftover of a killed build
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def entry_key(key: Mapping[str, Any], device: DeviceInfo) -> dict[str, Any]:
    """``key`` plus everything that makes a built artifact non-portable."""
    from fluxopt.environment import package_versions

    return {**key, "device": {"type": device.type, "name": device.name, "capability": device.capability,
                              "rocm": device.rocm},
            "versions": package_versions(), "cache_format": CACHE_FORMAT_VERSION}


def artifact_entry(cache_dir: Path, kind: str, key: Mapping[str, Any], device: DeviceInfo,
                   build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The cache entry for ``key`` (built with ``build`` if absent); returns (path, built_now)."""
    full = entry_key(key, device)
    digest = hashlib.sha256(json.dumps(full, sort_keys=True, default=str).encode()).hexdigest()[:24]
    target = private_dir(cache_dir / "artifacts" / kind) / digest
    built = not (target / COMPLETE_MARKER).exists()

    def build_with_key(tmp: Path) -> None:
        build(tmp)
        (tmp / "key.json").write_text(json.dumps(full, indent=2, sort_keys=True, default=str))

    return build_directory(target, build_with_key), built
