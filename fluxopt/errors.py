"""Errors fluxopt raises on purpose: each carries a message meant for the user, and the exit
status the command line ends with when it stops the run.

The CLI prints these as one line without a traceback; anything else is a bug (or a backend
failure, which the runner records with its phase instead of crashing).
"""

import argparse
import difflib
import enum
from collections.abc import Iterable


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the known name closest to ``name``, or nothing when none is
    close: every "unknown name" message ends its first sentence with it, then lists what is known."""
    close = difflib.get_close_matches(str(name), sorted(known), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


class ExitStatus(enum.IntEnum):
    """What ``fluxopt`` exits with (README, "Exit status")."""

    OK = 0  # every requested stack ran and passed its gate
    STACK_FAILED = 1  # a requested stack failed (build, run, fidelity) or was refused on this machine
    USAGE = 2  # bad command line or configuration; nothing was measured
    INTERRUPTED = 130  # Ctrl-C / SIGINT / SIGTERM; partial results are kept, marked incomplete


# Ctrl-C and SIGTERM noted by the command line's handler, which then raises KeyboardInterrupt.
_signals: list[int] = []


def note_signal(signum: int) -> None:
    """Record that ``signum`` arrived; the handler raises KeyboardInterrupt after it."""
    _signals.append(signum)


def signal_arrived() -> bool:
    """Whether Ctrl-C or SIGTERM has arrived. A signal can land inside a library whose own cleanup
    then fails with an error of its own (OmegaConf building a config, a backend mid-call): an error
    raised once a signal has arrived is the interrupt's consequence and ends as the interrupt."""
    return bool(_signals)


class FluxoptError(Exception):
    """Base class: the message says what is wrong and what to do about it."""

    exit_status = ExitStatus.USAGE


class ConfigError(FluxoptError):
    """The configuration or the requested stack is invalid (caught before loading a model)."""


class UnavailableError(FluxoptError):
    """A backend cannot run on this machine (missing package, no CUDA, GPU too old...)."""

    exit_status = ExitStatus.STACK_FAILED


class ModelLoadError(FluxoptError):
    """The model could not be obtained (no network, wrong path, missing or corrupt weights)."""

    exit_status = ExitStatus.STACK_FAILED


class DiskFullError(FluxoptError):
    """The disk filled up while fluxopt wrote a file; what was written before is intact."""

    exit_status = ExitStatus.STACK_FAILED


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments end in one line naming the argument and what is allowed (exit 2), no usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")
