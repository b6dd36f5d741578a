"""Choosing a C++ compiler whose AOTInductor packages this process can load.

An AOTInductor package is a shared library that links against libstdc++. The Python process
has already loaded one libstdc++ (torch's, usually the system's). If Inductor's compiler
(``torch._inductor.config.cpp.cxx``, ``$CXX``) ships a *newer* libstdc++, the package uses
symbols the loaded library lacks or implements differently; seen on the H100 machine we measure
on: every package segfaulted on load in ``std::regex``. The same one-Linear package built with
the system ``g++`` loaded and ran.

So before compiling, check the configured compiler against the loaded runtime: neither the
libstdc++ it links (its newest ``GLIBCXX_x.y.z`` symbol version) nor its own GCC version (its
headers) may be newer; then build and load a one-Linear package with it in a child process
(:func:`package_loads`), the ground truth. Otherwise use the first candidate that passes
(``/usr/bin/g++``, ``g++``, ``c++``); otherwise refuse with the reason. Checked on the H100
(2026-11-25, ``benchmarks/aoti_compiler_probe.py``): the configured ``/opt/gcc/bin/g++`` passes
the version checks, its probe package dies with SIGSEGV; ``/usr/bin/g++``'s loads and is correct.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
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
                    candidates: tuple[str, ...] = FALLBACK_COMPILERS,
                    verify: Callable[[str], tuple[bool, str]] | None = None) -> tuple[str, str]:
    """(compiler to use, why): the configured one if compatible, else the first compatible
    candidate. Raises RuntimeError when none is.

    The version checks are necessary, not sufficient: on the H100 machine ``/opt/gcc/bin/g++``
    (a GCC 13.3 wrapper whose own libstdc++ cannot be located) passes them, yet every package it
    built crashed on load, while the system ``/usr/bin/g++``, the same GCC 13.3, worked. So
    ``verify(compiler)`` (``package_loads``, cached by the caller) has the last word."""
    loaded = loaded or loaded_libstdcxx()
    have = glibcxx_version(loaded) if loaded else None
    if have is None:
        return configured, "no libstdc++ loaded in this process to compare with; using the configured compiler"
    runtime = f"{loaded} ({_fmt(have)}, GCC {GCC_OF_GLIBCXX.get(have, '?')}'s runtime)"

    def usable(compiler: str) -> tuple[bool, str]:
        ok, desc = compatible(compiler, have)
        if not ok:
            return False, f"{desc}: newer than the loaded {runtime}"
        if verify is None:
            return True, f"{desc}: compatible with the loaded {runtime}"
        loads, why = verify(compiler)
        return loads, f"{desc}: {why}"

    ok, first = usable(configured)
    if ok:
        return configured, first
    tried = [first]
    for candidate in candidates:
        if candidate == configured or shutil.which(candidate) == shutil.which(configured):
            continue
        ok, other = usable(candidate)
        if ok:
            return candidate, f"{first}; using {other}"
        tried.append(other)
    raise RuntimeError(f"no C++ compiler builds AOTInductor packages this process can load: "
                       f"{'; '.join(tried)}. Install a g++ no newer than the loaded runtime or set CXX to one")


PROBE_CHILD = "import sys, torch; m = torch._inductor.aoti_load_package(sys.argv[1]); print(float(m(torch.ones(2, 4)).sum()))"


def package_loads(compiler: str, workdir: Path) -> tuple[bool, str]:
    """Build a one-Linear AOTInductor package for the CPU with ``compiler`` and load it in a
    child process: the loader's crash does not depend on the model or the device, so this is the
    ground truth the version checks above only approximate (a few seconds)."""
    import sys

    import torch

    model = torch.nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.fill_(0.25)
    program = torch.export.export(model, (torch.ones(2, 4),), strict=False)
    path = Path(workdir) / f"probe-{Path(compiler).name}.pt2"
    try:
        with torch._inductor.config.patch({"cpp.cxx": (None, compiler)}):
            torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    except Exception as exc:  # noqa: BLE001 - a compiler that cannot build is not usable
        return False, f"{compiler} could not build a package ({type(exc).__name__})"
    proc = subprocess.run([sys.executable, "-c", PROBE_CHILD, str(path)], capture_output=True, text=True, timeout=300)
    if proc.returncode == 0 and proc.stdout.strip() == "18.0":  # 2 x 4 outputs of 4 * 0.5 + 0.25
        return True, f"a package built by {compiler} loads and computes correctly"
    how = f"exit {proc.returncode}" if proc.returncode >= 0 else f"signal {-proc.returncode}"
    return False, f"a package built by {compiler} failed to load ({how})"
