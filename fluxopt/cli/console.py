"""What a person sees on the terminal: one-line errors and notes, a live progress line per
run, and library noise (warnings, compiler logs, progress bars) kept in the run's log file
unless ``verbose=true``."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console


PREFIX = "fluxopt"
# Loggers whose records stay on the console whatever the verbosity (besides fluxopt's warnings).
CONSOLE_LOGGERS = ("HYDRA", "hydra")
# Libraries whose logging is routed through the root handlers (console filter, run log file).
LIBRARY_LOGGERS = ("torch", "torchao", "diffusers", "transformers")


def error(message: str) -> None:
    """One line on stderr, no traceback."""
    print(f"{PREFIX}: error: {' '.join(message.split())}", file=sys.stderr)


def say(message: str) -> None:
    print(f"{PREFIX}: {message}", file=sys.stderr)


class _ConsoleFilter(logging.Filter):
    """Lets through Hydra's records and fluxopt's warnings and errors (its progress is shown by
    the progress display); counts the library records it drops (they still reach the log file,
    whose handler has no such filter)."""

    def __init__(self) -> None:
        super().__init__()
        self.dropped = 0
        self._last: logging.LogRecord | None = None  # one record passes every console handler in turn

    def filter(self, record: logging.LogRecord) -> bool:
        root = record.name.split(".")[0]
        if root == "fluxopt":
            return record.levelno >= logging.WARNING
        if root in CONSOLE_LOGGERS:
            return True
        if record is not self._last:
            self.dropped += 1
            self._last = record
        return False


_FILTER = _ConsoleFilter()


def quiet_libraries(output_dir: Path, verbose: bool) -> None:
    """Send Python warnings through logging and keep library records off the console handlers
    Hydra installed (they stay in ``<output_dir>/<job>.log``); progress bars off."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    logging.captureWarnings(True)
    warnings.simplefilter("default")
    # torch (torch._inductor, torch._dynamo...) and diffusers install their own stderr handlers and
    # some stop propagation: their records would bypass both the console filter and the log file.
    for name in [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in LIBRARY_LOGGERS]:
        logger = logging.getLogger(name)
        logger.propagate = True
        for handler in [h for h in logger.handlers
                        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]:
            logger.removeHandler(handler)
    if verbose:
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and _FILTER not in handler.filters:
            handler.addFilter(_FILTER)


def dropped_records() -> int:
    return _FILTER.dropped


_POSITION = re.compile(r"^stack (\d+)/\d+ ")


class Eta:
    """The remaining time of a run, updated as its phases start: the estimates of the stacks not
    begun, plus what is left of the current one's (never below zero). The estimates come from
    the ``fluxopt_expected_durations`` hook (the history ring); a stack with none (it never ran
    here, or no plugin answers) is counted at the baseline's time once the baseline is measured,
    since every stack makes as many generations, and the ETA says so. Builds make it a lower bound."""

    def __init__(self, order: Sequence[str], expected: dict[str, float]):
        self.order = ["baseline", *order]
        self.expected = expected
        self.current, self.since = 0, time.monotonic()
        self.baseline_s: float | None = None  # measured in this run
        self._baseline_seen = False

    def update(self, index: int) -> None:
        if index == 0:
            self._baseline_seen = True
        if index != self.current:
            now = time.monotonic()
            if self.current == 0 and self._baseline_seen:  # a resumed run reuses its baseline: none measured
                self.baseline_s = now - self.since
            self.current, self.since = index, now

    def text(self) -> str | None:
        left = self.order[self.current:]
        guessed = [name for name in left if name not in self.expected and name != "baseline"] \
            if self.baseline_s is not None else []
        estimates = {**{name: self.baseline_s for name in guessed}, **self.expected}
        unknown = [name for name in left if name not in estimates]
        if len(unknown) == len(left):
            return None
        spent = time.monotonic() - self.since
        seconds = sum(max(estimates[name] - (spent if i == 0 else 0.0), 0.0)
                      for i, name in enumerate(left) if name in estimates)
        minutes = f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
        if guessed:
            return (f"ETA over {minutes}, {len(guessed)} stack(s) never ran here, counted at the baseline's "
                    f"{self.baseline_s:.0f} s")
        return f"ETA {minutes}" if not unknown else f"ETA over {minutes}, {len(unknown)} stack(s) never ran here"


@contextlib.contextmanager
def progress(enabled: bool = True, eta: Eta | None = None) -> Iterator[Callable[[str, str], None]]:
    """Yields ``on_phase(stack, phase)``: on a terminal, a live line "stack: phase (elapsed)";
    elsewhere one plain line per phase. With ``eta``, each line also gives the time the run has
    left, from how long its stacks took when they last ran here (``stack 2/5`` tells it which)."""
    stream = sys.stderr  # this stream, even while a stack's library output is sent to the log
    console = Console(file=stream)
    if not enabled:
        yield lambda stack, phase: None
        return

    def line(stack: str, phase: str) -> str:
        if eta is None:
            return f"{stack}: {phase}"
        found = _POSITION.match(stack)
        eta.update(int(found.group(1)) if found else 0)
        left = eta.text()
        return f"{stack}: {phase}" + (f" [{left}]" if left else "")

    if not console.is_terminal:
        yield lambda stack, phase: print(f"{PREFIX}: {line(stack, phase)}", file=stream, flush=True)
        return
    with console.status("fluxopt: starting") as status:
        yield lambda stack, phase: status.update(f"fluxopt: {line(stack, phase)}")


class _ToLog(io.TextIOBase):
    """A text stream whose lines go to the run's log (logger ``fluxopt.output``, INFO: the log file,
    never the console), for what libraries print straight to stdout/stderr while a stack is built
    and measured (Inductor's autotuning tables, Triton's benchmarking lines)."""

    def __init__(self, name: str):
        self.log = logging.getLogger(f"fluxopt.output.{name}")
        self.pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        for line in lines:
            if line.strip():
                self.log.info(line)
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.log.info(self.pending)
        self.pending = ""


@contextlib.contextmanager
def library_output_to_log(enabled: bool) -> Iterator[None]:
    """While a run measures (unless ``verbose``), Python-level stdout/stderr go to the run's log;
    the progress display and the logging handlers hold their own streams and still reach the console."""
    if not enabled:
        yield
        return
    out, err = _ToLog("stdout"), _ToLog("stderr")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        out.flush()
        err.flush()


def print_run(data: Any, output_dir: Path, hook: Any) -> None:
    """After a single run: the plugins present it (``fluxopt_terminal_summary``), then where it is."""
    hook.fluxopt_terminal_summary(result=data, output_dir=str(output_dir))
    dropped = dropped_records()
    if dropped:
        say(f"{dropped} library log record(s) and warning(s) kept off the console; see the log in {output_dir}")
    print(f"results: {output_dir / 'result.json'}")
