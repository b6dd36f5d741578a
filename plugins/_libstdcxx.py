"""Choosing a C++ compiler whose AOTInductor packages this process can load.

An AOTInductor package is a shared library that links against libstdc++. The Python process
has already loaded one libstdc++ (torch's, usually the system's). If Inductor's compiler
(``torch._inductor.config.cpp.cxx``, ``$CXX``) ships a *newer* libstdc++, the package uses
symbols the loaded library lacks or implements differently; seen on the H100 machine we measure
on: every package segfaulted on load in ``std::regex``. The same one-Linear package built with
the system ``g++`` loaded and ran.

So before compiling, check the configured compiler against the loaded runtime: neither the
libstdc++ it links (its newest ``GLIBCXX_x.y.z`` symbol version) nor its own GCC version (its
headers) may be newer. Otherwise use the first compatible candidate (``/usr/bin/g++``, ``g++``,
``c++``); otherwise refuse with the reason.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

FALLBACK_COMPILERS = ("/usr/bin/g++", "g++", "c++")
# libstdc++'s newest symbol version -> the GCC release that ships that runtime.
GCC_OF_GLIBCXX = {(3, 4, 29): 11, (3, 4, 30): 12, (3, 4, 31): 13, (3, 4, 32): 13, (3, 4, 33): 14, (3, 4, 34): 15,
                  (3, 4, 35): 16}
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
    """The libstdc++ a compiler links against (``-print-file-name=libstdc++.so``, the linker name
    it resolves at link time), or None."""
    out = _ask(compiler, "-print-file-name=libstdc++.so")
    path = Path(out) if out else None
    return path.resolve() if path is not None and path.is_absolute() and path.exists() else None


def compiler_major(compiler: str) -> int | None:
    """The compiler's major version (``-dumpversion``): its C++ headers are that GCC's."""
    out = _ask(compiler, "-dumpversion")
    try:
        return int(out.split(".")[0]) if out else None
    except ValueError:
        return None


def _ask(compiler: str, flag: str) -> str | None:
    exe = shutil.which(compiler)
    if exe is None:
        return None
    try:
        return subprocess.run([exe, flag], capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _fmt(version: tuple[int, ...] | None) -> str:
    return "GLIBCXX_" + ".".join(map(str, version)) if version else "unknown"


def compatible(compiler: str, have: tuple[int, ...]) -> tuple[bool, str]:
    """Whether packages built by ``compiler`` can run on a libstdc++ providing ``have``: neither the
    library it links nor its headers (its GCC version) may be newer."""
    lib = compiler_libstdcxx(compiler)
    lib_version = glibcxx_version(lib) if lib else None
    major = compiler_major(compiler)
    runtime_major = GCC_OF_GLIBCXX.get(have)
    desc = f"{compiler} (GCC {major if major is not None else '?'}, links {_fmt(lib_version)})"
    if lib_version is not None and lib_version > have:
        return False, desc
    if major is not None and runtime_major is not None and major > runtime_major:
        return False, desc
    return lib_version is not None or major is not None, desc


def choose_compiler(configured: str, loaded: Path | None = None,
                    candidates: tuple[str, ...] = FALLBACK_COMPILERS) -> tuple[str, str]:
    """(compiler to use, why): the configured one if compatible, else the first compatible
    candidate. Raises RuntimeError when none is.

    The library a compiler links is not enough: on the H100 machine ``/opt/gcc/bin/g++`` links the
    very libstdc++ the process loaded (GLIBCXX_3.4.33, GCC 14's runtime), but its headers are a
    newer GCC's, and every package it built crashed on load in std::regex."""
    loaded = loaded or loaded_libstdcxx()
    have = glibcxx_version(loaded) if loaded else None
    if have is None:
        return configured, "no libstdc++ loaded in this process to compare with; using the configured compiler"
    runtime = f"{loaded} ({_fmt(have)}, GCC {GCC_OF_GLIBCXX.get(have, '?')}'s runtime)"
    ok, desc = compatible(configured, have)
    if ok:
        return configured, f"{desc} is compatible with the loaded {runtime}"
    tried = [desc]
    for candidate in candidates:
        if candidate == configured:
            continue
        ok, other = compatible(candidate, have)
        if ok:
            return candidate, (f"{desc} is newer than the loaded {runtime}: its packages would crash on load; "
                               f"using {other}")
        tried.append(other)
    raise RuntimeError(f"no C++ compiler builds AOTInductor packages this process can load: it loaded {runtime}, "
                       f"and the compilers found are newer: {', '.join(tried)}. Install a g++ no newer than that "
                       "runtime or set CXX to one")
