"""Choosing a C++ compiler whose AOTInductor packages the running process can load: a compiler
linking a newer libstdc++ than the loaded one is replaced by a compatible one, or refused."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from fluxopt_plugins._libstdcxx import choose_compiler, glibcxx_version, likely_compiler, loaded_libstdcxx


def fake_libstdcxx(path: Path, newest: str) -> Path:
    path.write_bytes(b"\x7fELF...GLIBCXX_3.4\x00GLIBCXX_3.4.21\x00" + f"GLIBCXX_{newest}\x00".encode())
    return path


def fake_compiler(directory: Path, name: str, library: Path, version: str) -> None:
    script = directory / name
    script.write_text(f'#!/bin/sh\ncase "$1" in -dumpversion) echo {version};; *) echo {library};; esac\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A machine where the process loaded GLIBCXX_3.4.33 (GCC 14's runtime), Inductor is configured
    with a GCC 15 whose libstdc++ is newer (3.4.34), and the system g++ is GCC 13."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    loaded = fake_libstdcxx(tmp_path / "system-libstdc++.so.6", "3.4.33")
    newer = fake_libstdcxx(tmp_path / "gcc15-libstdc++.so.6", "3.4.34")
    fake_compiler(bin_dir, "gcc15-g++", newer, "15.2.0")
    fake_compiler(bin_dir, "g++", loaded, "13")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return loaded


def test_versions_are_read_from_the_binary(machine):
    assert glibcxx_version(machine) == (3, 4, 33)


def test_a_compiler_with_a_newer_libstdcxx_is_replaced_by_a_compatible_one(machine):
    chosen, why = choose_compiler("gcc15-g++", loaded=machine, candidates=("g++",))
    assert chosen == "g++" and "GCC 15" in why and "newer than the loaded" in why


def test_newer_headers_are_refused_even_when_the_loaded_library_is_linked(machine, tmp_path):
    """The H100 case: /opt/gcc/bin/g++ links the very libstdc++ the process loaded, but it is a
    newer GCC than that runtime, and every package it built crashed on load."""
    fake_compiler(tmp_path / "bin", "opt-g++", machine, "15.2.0")
    assert choose_compiler("opt-g++", loaded=machine, candidates=("g++",))[0] == "g++"
    fake_compiler(tmp_path / "bin", "same-g++", machine, "14.2.0")
    assert choose_compiler("same-g++", loaded=machine, candidates=("g++",))[0] == "same-g++"


def test_the_likely_compiler_is_the_one_installed_with_the_loaded_runtime(tmp_path, monkeypatch):
    """The build starts with the compiler the probe will most likely confirm: of those that pass
    the version checks, the one installed beside the loaded libstdc++ (the GPU machines' case:
    /opt/gcc/bin/g++ configured, the runtime from /usr, only /usr/bin/g++'s packages loaded)."""
    loaded = fake_libstdcxx((tmp_path / "usr" / "lib").mkdir(parents=True) or tmp_path / "usr/lib/libstdc++.so.6",
                            "3.4.33")
    for prefix, name in (("opt/gcc", "opt-g++"), ("usr", "sys-g++")):
        (tmp_path / prefix / "bin").mkdir(parents=True)
        fake_compiler(tmp_path / prefix / "bin", name, loaded, "14")
        monkeypatch.setenv("PATH", f"{tmp_path / prefix / 'bin'}{os.pathsep}{os.environ['PATH']}")
    assert likely_compiler("opt-g++", loaded=loaded, candidates=("sys-g++",)) == "sys-g++"
    assert choose_compiler("opt-g++", loaded=loaded, candidates=("sys-g++",))[0] == "opt-g++"  # unless probed
    assert likely_compiler("opt-g++", loaded=loaded, candidates=()) == "opt-g++"  # no native one: the first


def test_a_compatible_configured_compiler_is_kept(machine):
    assert choose_compiler("g++", loaded=machine, candidates=())[0] == "g++"


def test_no_compatible_compiler_is_an_error_naming_what_was_tried(machine, tmp_path):
    with pytest.raises(RuntimeError, match=r"gcc15-g\+\+ \(GCC 15, links GLIBCXX_3.4.34\)"):
        choose_compiler("gcc15-g++", loaded=machine, candidates=("gcc15-g++",))


def test_this_process_has_a_libstdcxx_loaded():
    import torch  # noqa: F401 - libtorch links libstdc++

    path = loaded_libstdcxx()
    assert path is not None and glibcxx_version(path) is not None


def test_the_ground_truth_overrules_the_version_checks(machine, tmp_path):
    """The H100 case: the configured compiler passes the version checks but its package crashes
    on load; the first candidate whose package loads is used. Every version-compatible compiler
    is handed to ``verify`` in one call (their probes run side by side), once each."""
    fake_compiler(tmp_path / "bin", "opt-g++", machine, "13.3.0")
    verdicts = {"opt-g++": (False, "failed to load (signal 11)"), "g++": (True, "loads")}
    asked = []

    def verify(compilers):
        asked.append(list(compilers))
        return {c: verdicts[c] for c in compilers}

    chosen, why = choose_compiler("opt-g++", loaded=machine, candidates=("g++", "g++"), verify=verify)
    assert chosen == "g++" and "signal 11" in why
    assert asked == [["opt-g++", "g++"]]
    with pytest.raises(RuntimeError, match="signal 11"):
        choose_compiler("opt-g++", loaded=machine, candidates=(), verify=verify)


def test_a_real_package_is_built_and_loaded_with_the_system_compiler(tmp_path):
    from fluxopt_plugins._libstdcxx import packages_load

    verdicts = packages_load(["g++", "no-such-compiler-xyz"], tmp_path)
    ok, why, seconds = verdicts["g++"]
    assert ok, why
    assert seconds["build_s"] > 0 and seconds["load_s"] > 0
    ok, why, seconds = verdicts["no-such-compiler-xyz"]
    assert not ok and "could not build" in why and "load_s" not in seconds


def test_a_crashing_load_is_a_verdict_not_a_crash(tmp_path, monkeypatch):
    """What the H100's configured compiler did: the loading process dies of a signal. The probe
    reports it, without writing a core dump (on a 16-core machine a dump can take longer than
    the probe); the calling process goes on."""
    import fluxopt_plugins._libstdcxx as libstdcxx

    # the build is the real probe's (tested above); here only its file is needed
    monkeypatch.setattr(libstdcxx, "BUILD_CHILD", "import pathlib, sys; pathlib.Path(sys.argv[2]).write_bytes(b'')")
    monkeypatch.setattr(libstdcxx, "LOAD_CHILD", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    ok, why, _ = libstdcxx.package_loads("g++", tmp_path)
    assert not ok and "signal 11" in why
    limit = libstdcxx.Children().run(["import resource; print(resource.getrlimit(resource.RLIMIT_CORE))"])
    assert limit.stdout.strip() == "(0, 0)"
