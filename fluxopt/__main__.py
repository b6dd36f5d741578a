"""``python -m fluxopt`` (and the ``fluxopt`` script). Signals are answered from the first instant:
importing torch and diffusers takes seconds, and an interrupt that lands inside a C extension's
import leaves it half-loaded (a later error, not a KeyboardInterrupt). So while the CLI imports,
Ctrl-C and SIGTERM are only noted; once the import is done, a noted signal ends the command with
one line and exit 130, before anything runs (and the CLI, what is noted until its own handlers are in)."""

import signal
import sys

_noted: list[int] = []


def _note(signum: int, frame: object) -> None:
    _noted.append(signum)


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _note)
    from fluxopt.cli import main as cli_main

    if _noted:
        print("fluxopt: error: interrupted while starting; nothing was run", file=sys.stderr)
        sys.exit(130)
    cli_main(noted=_noted)  # the list itself: a signal that lands before the CLI's handlers goes in it


if __name__ == "__main__":
    main()
