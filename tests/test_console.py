"""What a person sees: progress as a live line on a terminal and plain lines
elsewhere; library records and warnings kept off the console (counted) unless verbose."""

from __future__ import annotations

import io
import logging
import warnings

import pytest
from rich.console import Console

from fluxopt.cli import console


def test_progress_without_a_terminal_prints_one_plain_line_per_phase(capsys):
    with console.progress() as on_phase:
        on_phase("baseline", "timing")
        on_phase("compile", "build")
    err = capsys.readouterr().err
    assert err.splitlines() == ["fluxopt: baseline: timing", "fluxopt: compile: build"]


def test_progress_on_a_terminal_is_one_live_line(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(console, "Console", lambda **kw: Console(file=screen, force_terminal=True, width=100))
    with console.progress() as on_phase:
        on_phase("compile", "build")
    shown = screen.getvalue()
    assert "fluxopt: compile: build" in shown
    assert "\x1b[" in shown  # redrawn in place (cursor control), not printed line after line
    assert shown.endswith("\x1b[2K")  # and erased when the run ends: no stale progress left on the screen


def test_progress_disabled_prints_nothing(capsys):
    with console.progress(enabled=False) as on_phase:
        on_phase("compile", "build")
    assert capsys.readouterr().err == ""


@pytest.fixture
def terminal_handler():
    """A console handler as Hydra installs one, restored afterwards (the filter is process-wide)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    yield stream, handler
    root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.mark.parametrize("verbose", [False, True])
def test_library_noise_stays_off_the_console_unless_verbose(tmp_path, terminal_handler, verbose):
    stream, handler = terminal_handler
    before = console.dropped_records()
    console.quiet_libraries(tmp_path, verbose=verbose)
    logging.getLogger("torch._inductor").warning("AUTOTUNE mm(4096x3072)")
    logging.getLogger("diffusers.models").warning("should be kept in float32")
    # what warnings.warn reaches once captured (pytest records warnings.warn calls itself)
    warnings.showwarning("Unable to import torchao Tensor objects", UserWarning, "torchao/__init__.py", 1)
    logging.getLogger("fluxopt").warning("stack compile failed: reason")
    logging.getLogger("fluxopt").info("compile: build")  # shown by the progress display instead
    shown = stream.getvalue()
    assert "stack compile failed: reason" in shown
    noise = ("AUTOTUNE", "float32", "Unable to import torchao")
    if verbose:
        assert all(n in shown for n in noise)
    else:
        assert not any(n in shown for n in noise) and "compile: build" not in shown
        assert console.dropped_records() - before == 3  # counted for the "kept off the console" note
        handler.removeFilter(console._FILTER)


@pytest.mark.parametrize("verbose", [False, True])
def test_what_libraries_print_during_a_build_goes_to_the_log_not_the_console(tmp_path, plugin_env, verbose):
    """Inductor's autotuning tables and Triton's benchmarking lines are printed straight to the
    streams, past logging: while a stack runs they go to the run's log; verbose=true shows them."""
    from conftest import run_cli

    proc = run_cli("+backend=fault_noisy", "bench.iterations=1", "save_images=false", f"verbose={str(verbose).lower()}",
                   f"hydra.run.dir={tmp_path}", env=plugin_env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shown = proc.stdout + proc.stderr
    logged = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    for line in ("AUTOTUNE mm(4096x3072, 3072x3072) fake table", "triton: benchmarking fake kernel"):
        assert (line in shown) is verbose
        assert (line in logged) is not verbose or line in shown
    assert "fluxopt: stack 1/1 fault_noisy: build" in proc.stderr  # the progress display still reaches the console
