"""Choosing a C++ compiler whose AOTInductor packages this process can load.

The rule: a package may link no newer libstdc++ than the one this process has loaded. An
AOTInductor package is a shared library linked against libstdc++, and the Python process has
already loaded one (torch's, usually the system's); a package built by a compiler
(``torch._inductor.config.cpp.cxx``, ``$CXX``) that ships a newer one uses symbols the loaded
library lacks or implements differently, and crashes on load (a GPU machine's ``/opt/gcc`` did,
in ``std::regex``, while the system ``g++`` built packages that loaded).

So before compiling, the configured compiler is checked against the loaded runtime: neither the
libstdc++ it links (its newest ``GLIBCXX_x.y.z`` symbol version) nor its own GCC version (its
headers) may be newer; then a one-Linear package built with it is loaded in a child process
(:func:`package_loads`), the ground truth. The version checks are necessary, not sufficient.
Candidates' probes run side by side (they take minutes each). Otherwise the first candidate
that passes (``/usr/bin/g++``, ``g++``, ``c++``) is used; otherwise the stack is refused with the reason.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def _runtime(loaded: Path | None) -> tuple[tuple[int, ...] | None, str]:
    have = glibcxx_version(loaded) if loaded else None
    return have, f"{loaded} ({_fmt(have)}, GCC {GCC_OF_GLIBCXX.get(have, '?')}'s runtime)" if have else ""


def _ordered(configured: str, candidates: tuple[str, ...]) -> list[str]:
    """The configured compiler, then each installed candidate; one name per binary."""
    order: list[str] = []
    for compiler in (configured, *candidates):
        if (compiler == configured or shutil.which(compiler)) and _binary(compiler) not in map(_binary, order):
            order.append(compiler)
    return order


def install_prefix(path: Path) -> Path:
    """The toolchain installation a file belongs to: ``/usr`` for ``/usr/bin/g++`` and for
    ``/usr/lib/x86_64-linux-gnu/libstdc++.so.6``; ``/opt/gcc`` for ``/opt/gcc/bin/g++``."""
    path = path.resolve()
    for parent in path.parents:
        if parent.name == "bin" or parent.name.startswith("lib"):
            return parent.parent
    return path.parent


def likely_compiler(configured: str, loaded: Path | None = None,
                    candidates: tuple[str, ...] = FALLBACK_COMPILERS) -> str:
    """The compiler the probes will most likely confirm, for a build that starts while they run
    (redone only if they reject it): among those that pass the version checks, the first from
    the installation the loaded libstdc++ comes from (its own toolchain), else the first. A
    compiler installed beside another runtime passed the version checks and was rejected by the
    probe on two GPU machines (``/opt/gcc/bin/g++``, the configured one, against ``/usr``'s
    runtime). The configured one when no libstdc++ is loaded to compare with."""
    loaded = loaded or loaded_libstdcxx()
    have, _ = _runtime(loaded)
    if have is None or loaded is None:
        return configured
    passing = [c for c in _ordered(configured, candidates) if compatible(c, have)[0]]
    home = install_prefix(loaded)
    native = [c for c in passing if shutil.which(c) and install_prefix(Path(shutil.which(c))) == home]
    return (native or passing or [configured])[0]


def choose_compiler(configured: str, loaded: Path | None = None,
                    candidates: tuple[str, ...] = FALLBACK_COMPILERS,
                    verify: Callable[[list[str]], dict[str, tuple[bool, str]]] | None = None) -> tuple[str, str]:
    """(compiler to use, why): the configured one if compatible, else the first compatible
    candidate. Raises RuntimeError when none is.

    The version checks are necessary, not sufficient: ``/opt/gcc/bin/g++`` on one GPU machine
    (a GCC 13.3 wrapper whose own libstdc++ cannot be located) passes them, yet every package it
    built crashed on load, while the system ``/usr/bin/g++``, the same GCC 13.3, worked. So
    ``verify(compilers)`` (:func:`packages_load`, cached by the caller) has the last word; it is
    given every version-compatible compiler at once, so their probes can run side by side."""
    loaded = loaded or loaded_libstdcxx()
    have, runtime = _runtime(loaded)
    if have is None:
        return configured, "no libstdc++ loaded in this process to compare with; using the configured compiler"
    order = _ordered(configured, candidates)
    checks = {c: compatible(c, have) for c in order}
    verdicts = verify([c for c in order if checks[c][0]]) if verify is not None else {}
    tried = []
    for compiler in order:
        ok, desc = checks[compiler]
        if not ok:
            tried.append(f"{desc}: newer than the loaded {runtime}")
            continue
        loads, why = verdicts.get(compiler, (True, f"compatible with the loaded {runtime}"))
        if loads:
            reason = f"{desc}: {why}"
            return compiler, reason if not tried else f"{'; '.join(tried)}; using {reason}"
        tried.append(f"{desc}: {why}")
    raise RuntimeError(f"no C++ compiler builds AOTInductor packages this process can load: "
                       f"{'; '.join(tried)}. Install a g++ no newer than the loaded runtime or set CXX to one")


def _binary(compiler: str) -> str:
    exe = shutil.which(compiler)
    return os.path.realpath(exe) if exe else compiler


# A child builds a one-Linear CPU package with the compiler in argv[1]; a grandchild loads it.
BUILD_CHILD = """
import sys, torch
model = torch.nn.Linear(4, 4)
with torch.no_grad():
    model.weight.fill_(0.5)
    model.bias.fill_(0.25)
program = torch.export.export(model, (torch.ones(2, 4),), strict=False)
with torch._inductor.config.patch({"cpp.cxx": (None, sys.argv[1])}):
    torch._inductor.aoti_compile_and_package(program, package_path=sys.argv[2])
"""
LOAD_CHILD = "import sys, torch; m = torch._inductor.aoti_load_package(sys.argv[1]); print(float(m(torch.ones(2, 4)).sum()))"
PROBE_TIMEOUT_S = 900


def package_loads(compiler: str, workdir: Path, children: Children | None = None) -> tuple[bool, str, dict[str, float]]:
    """Build a one-Linear AOTInductor package for the CPU with ``compiler`` in a child process and
    load it in another: the loader's crash does not depend on the model or the device, so this is
    the ground truth the version checks above only approximate. Both run in children (nothing in
    this process is patched), so probes of several compilers can run side by side; the seconds
    each took come back as the third element. Core dumps are off: a crash is the expected answer."""
    children = children or Children()
    path = Path(workdir) / f"probe-{abs(hash(_binary(compiler)))}.pt2"
    timings: dict[str, float] = {}
    start = time.perf_counter()
    build = children.run([BUILD_CHILD, compiler, str(path)])
    timings["build_s"] = round(time.perf_counter() - start, 1)
    if build.returncode != 0 or not path.exists():
        return False, f"{compiler} could not build a package ({_ended(build)})", timings
    start = time.perf_counter()
    load = children.run([LOAD_CHILD, str(path)])
    timings["load_s"] = round(time.perf_counter() - start, 1)
    if load.returncode == 0 and load.stdout.strip() == "18.0":  # 2 x 4 outputs of 4 * 0.5 + 0.25
        return True, f"a package built by {compiler} loads and computes correctly", timings
    return False, f"a package built by {compiler} failed to load ({_ended(load)})", timings


def packages_load(compilers: list[str], workdir: Path,
                  children: Children | None = None) -> dict[str, tuple[bool, str, dict[str, float]]]:
    """:func:`package_loads` for every compiler at once (threads waiting on child processes)."""
    if not compilers:
        return {}
    children = children or Children()
    with ThreadPoolExecutor(max_workers=len(compilers)) as pool:
        return dict(zip(compilers, pool.map(lambda c: package_loads(c, workdir, children), compilers), strict=True))


class Children:
    """The probe processes started for one build. ``stop()`` kills those running (each in a
    process group of its own, the C++ compiler it started included) and refuses new ones: a build
    that ends first (failed, stopped over its budget) must leave no compiler running beside the
    stacks measured after it. A stopped probe is no verdict: :attr:`stopped` says so to callers,
    who must not cache what it returned."""

    def __init__(self) -> None:
        self._running: set[subprocess.Popen] = set()
        self._lock = threading.Lock()
        self.stopped = False

    def run(self, args: list[str]) -> subprocess.CompletedProcess:
        """``python -c ARGS`` without a core dump, its output captured, killed after PROBE_TIMEOUT_S."""
        def no_core_dump() -> None:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        with self._lock:
            if self.stopped:
                return subprocess.CompletedProcess(args, -signal.SIGKILL, "", "the build ended first")
            proc = subprocess.Popen([sys.executable, "-c", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, preexec_fn=no_core_dump, start_new_session=True)
            self._running.add(proc)
        try:
            out, err = proc.communicate(timeout=PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return subprocess.CompletedProcess(args, 124, "", f"timed out after {PROBE_TIMEOUT_S} s")
        finally:
            with self._lock:
                self._running.discard(proc)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            running = list(self._running)
        for proc in running:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _ended(proc: subprocess.CompletedProcess) -> str:
    if proc.returncode < 0:
        return f"signal {-proc.returncode}"
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    return f"exit {proc.returncode}" + (f": {last[:200]}" if last else "")
