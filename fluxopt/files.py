"""How fluxopt writes and guards files: every file atomically (temporary sibling, fsync,
rename), directories that may hold native code private to the user, and inter-process locks.

A reader therefore sees either the old file or the whole new one, never half of one; a disk
that fills up mid-write leaves the previous content intact and raises :class:`DiskFullError`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from fluxopt.errors import DiskFullError

_HASH_CHUNK = 1 << 20


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(handle)`` into a temporary sibling, fsync it, rename it over
    ``path``. On any failure the temporary file is removed and ``path`` is untouched; a full
    disk is reported as :class:`DiskFullError` naming the file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on the device while writing {path}; what was written "
                                "before is intact. Free some space and run again") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: Path, data: bytes) -> None:
    write_atomic(path, lambda handle: handle.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON (NaN/inf stored as null), written atomically."""
    text = json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def save_image_atomic(path: Path, image: Any) -> None:
    """A PIL image (format from the suffix), written atomically."""
    fmt = Path(path).suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG"
    write_atomic(path, lambda handle: image.save(handle, format=fmt))


def save_figure_atomic(path: Path, figure: Any, **kwargs: Any) -> None:
    """A matplotlib figure, written atomically."""
    write_atomic(path, lambda handle: figure.savefig(handle, format=Path(path).suffix.lstrip("."), **kwargs))


def move_aside(path: Path, why: str) -> Path:
    """Rename ``path`` to ``<name>.<why>-<UTC time>[-n]<suffix>`` next to it (never overwrite a
    file fluxopt could not parse or did not write: keep it for the user) and return the new path."""
    path = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"{path.stem}.{why}-{stamp}{path.suffix}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.stem}.{why}-{stamp}-{n}{path.suffix}")
        n += 1
    os.replace(path, target)
    return target


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) readable by the owner only: cache entries may hold native code."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


@contextlib.contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (flock), so two processes never build the same thing at once."""
    private_dir(lock_path.parent)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_is_free(lock_path: Path) -> bool:
    """Whether no process holds ``lock_path`` now."""
    if not lock_path.exists():
        return True
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def walk_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, path) of every non-directory below ``root``, links included."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames) + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = Path(dirpath) / name
            yield path.relative_to(root).as_posix(), path


def dir_size(path: Path) -> int:
    total = 0
    for _, p in walk_files(path):
        with contextlib.suppress(OSError):
            total += os.lstat(p).st_size
    return total
