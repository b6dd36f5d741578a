"""Choosing a C++ compiler whose AOTInductor packages this process can load.

An AOTInductor package is a shared library that links against libstdc++. The Python process
has already loaded one libstdc++ (torch's, usually the system's). If Inductor's compiler
(``torch._inductor.config.cpp.cxx``, ``$CXX``) ships a *newer* libstdc++, the package uses
symbols the loaded library lacks or implements differently; seen on the H100 machine we measure
on: every package segfaulted on load in ``std::regex``. The same one-Linear package built with
the system ``g++`` loaded and ran.

So before compiling, compare the newest ``GLIBCXX_x.y.z`` symbol version each compiler's
libstdc++ provides with the newest one the loaded libstdc++ provides, and use the configured
compiler only if it is not newer; otherwise the first compatible candidate (``g++``,
``/usr/bin/g++``, ``c++``); otherwise refuse with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

FALLBACK_COMPILERS = ("g++", "/usr/bin/g++", "c++")
_VERSION = re.compile(rb"GLIBCXX_(\d+)\.(\d+)(?:\.(\d+))?")


def glibcxx_version(library: Path) -> tuple[int, ...] | None:
    """The newest GLIBCXX symbol version a libstdc++ binary provides."""
    try:
        data = Path(library).read_bytes()
    except OSError:
        return None
    versions = [tuple(int(g or 0) for g in m.groups()) for m in _VERSION.finditer(data)]
    return max(versions) if versions else None


def loaded_libstdcxx(maps: Path = Path("/proc/self/maps")) -> Path | None:
    """The libstdc++ this process has loaded (Linux), or None."""
    try:
        for line in maps.read_text().splitlines():
            path = line.split()[-1] if line.split() else ""
            if "libstdc++.so" in Path(path).name:
                return Path(path)
    except OSError:
        pass
    return None


def compiler_libstdcxx(compiler: str) -> Path | None:
    """The libstdc++ a compiler links against (``-print-file-name``), or None."""
    exe = shutil.which(compiler)
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-print-file-name=libstdc++.so.6"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    path = Path(out)
    return path.resolve() if path.is_absolute() and path.exists() else None


def _fmt(version: tuple[int, ...] | None) -> str:
    return "GLIBCXX_" + ".".join(map(str, version)) if version else "unknown"


def choose_compiler(configured: str, loaded: Path | None = None,
                    candidates: tuple[str, ...] = FALLBACK_COMPILERS) -> tuple[str, str]:
    """(compiler to use, why). Raises RuntimeError when no candidate is compatible.

    Best is a compiler that links the very libstdc++ this process loaded (same file); the
    version tag alone is not enough: on the H100 machine, ``/opt/gcc/bin/g++`` and the system
    library both report GLIBCXX_3.4.33, yet packages built by the former crashed in std::regex."""
    loaded = loaded or loaded_libstdcxx()
    have = glibcxx_version(loaded) if loaded else None
    if have is None:
        return configured, "no libstdc++ loaded in this process to compare with; using the configured compiler"
    loaded_file = loaded.resolve()
    own = compiler_libstdcxx(configured)
    if own is not None and own.resolve() == loaded_file:
        return configured, f"{configured} links the libstdc++ this process loaded ({loaded_file})"
    for candidate in candidates:
        lib = compiler_libstdcxx(candidate)
        if candidate != configured and lib is not None and lib.resolve() == loaded_file:
            return candidate, (f"{configured} links {own} rather than the libstdc++ this process loaded "
                               f"({loaded_file}): its packages may crash on load; using {candidate}, which links it")
    needs = glibcxx_version(own or Path("/nonexistent"))
    if needs is not None and needs <= have:
        return configured, (f"{configured} links {own} ({_fmt(needs)}), not the loaded {loaded_file} ({_fmt(have)}), "
                            "but no compiler links the loaded one; keeping it as its version is not newer")
    tried = [f"{configured} ({_fmt(needs)})"]
    for candidate in candidates:
        if candidate == configured:
            continue
        version = glibcxx_version(compiler_libstdcxx(candidate) or Path("/nonexistent"))
        if version is not None and version <= have:
            return candidate, (f"{configured} links a newer libstdc++ ({_fmt(needs)}) than this process loaded "
                               f"({loaded}, {_fmt(have)}): its packages would crash on load; using {candidate} "
                               f"({_fmt(version)})")
        tried.append(f"{candidate} ({_fmt(version)})")
    raise RuntimeError(f"no C++ compiler builds AOTInductor packages this process can load: it loaded {loaded} "
                       f"({_fmt(have)}), and the compilers found need newer ones: {', '.join(tried)}. Install a "
                       "g++ matching the system libstdc++ or set CXX to one")
