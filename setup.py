"""Build hook: record the git revision the package is built from (fluxopt/_build_info.json), so
an installed copy (wheel, non-editable install) can say where it came from. Everything else
about the package is in pyproject.toml.

A copy of the source shipped to another machine (a GPU host's working tree, whose git metadata
is not the sender's) is told its revision by the sender: ``$FLUXOPT_SOURCE_REVISION``, a commit
id with ``+dirty`` appended when the sender's tree had uncommitted changes; it wins over git."""

import json
import os
import re
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _own_checkout():
    """Whether this source tree is the top of its own git checkout (not a copy of the source that
    sits inside some other repository, whose revision would name the wrong code)."""
    top = _git("rev-parse", "--show-toplevel")
    return bool(top) and Path(top).resolve() == Path(__file__).parent.resolve()


class BuildPyWithRevision(build_py):
    def run(self):
        super().run()
        given = os.environ.get("FLUXOPT_SOURCE_REVISION", "")
        if given:
            match = re.fullmatch(r"([0-9a-f]{40})(\+dirty)?", given)
            if not match:
                raise SystemExit(f"FLUXOPT_SOURCE_REVISION={given!r} is not allowed: a 40-digit commit id, "
                                 "optionally followed by +dirty")
            info = {"revision": match[1], "dirty": bool(match[2])}
        elif _own_checkout():
            status = _git("status", "--porcelain", "--untracked-files=no")
            info = {"revision": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}
        else:
            info = {"revision": None, "dirty": None}
        target = Path(self.build_lib) / "fluxopt" / "_build_info.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(info) + "\n")


setup(cmdclass={"build_py": BuildPyWithRevision})
