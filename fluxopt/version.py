"""fluxopt's version and the source revision it was installed from.

The version comes from the installed distribution's metadata; the revision from
``fluxopt/_build_info.json``, written when the package is built or installed (``setup.py``),
so a copy installed from a wheel or a non-git directory still knows where it came from. In a
git checkout the live revision is read too and wins, with its dirty flag.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path
from typing import Any

BUILD_INFO = Path(__file__).resolve().parent / "_build_info.json"

try:
    __version__ = importlib.metadata.version("fluxopt")
except importlib.metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=BUILD_INFO.parent.parent, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def git_revision() -> dict[str, Any]:
    """``{"revision", "dirty", "source"}``: from the checkout fluxopt runs from if it is one,
    else from the build info recorded at install time (``source`` says which)."""
    top = _git("rev-parse", "--show-toplevel")
    if top and Path(top).resolve() == BUILD_INFO.parent.parent:
        status = _git("status", "--porcelain", "--untracked-files=no")
        return {"revision": _git("rev-parse", "HEAD"), "dirty": bool(status), "source": "git checkout"}
    try:
        info = json.loads(BUILD_INFO.read_text())
        return {"revision": info.get("revision"), "dirty": info.get("dirty"), "source": "recorded at install"}
    except (OSError, ValueError):
        return {"revision": None, "dirty": None, "source": "unknown (no checkout, no build info)"}
