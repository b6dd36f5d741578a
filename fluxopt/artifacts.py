"""Where built things live (tiny model checkpoint, compiled graphs, exported packages,
engines) and how they are written: atomically, under a lock, in a user-only directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

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
