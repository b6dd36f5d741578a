"""``python -m fluxopt`` (and the ``fluxopt`` script). Signals are answered from the first instant:
importing torch and diffusers takes seconds, and an interrupt that lands inside a C extension's
import leaves it half-loaded (a later error, not a KeyboardInterrupt). So while the CLI imports,
Ctrl-C and SIGTERM are only noted; once the import is done, a noted signal ends the command with
one line and exit 130, before anything runs."""

import signal
import sys

_noted: list[int] = []


def _note(signum: int, frame: object) -> None:
    _noted.append(signum)


def main() -> None:
    previous = {sig: signal.signal(sig, _note) for sig in (signal.SIGINT, signal.SIGTERM)}
    from fluxopt.cli import main as cli_main

    if _noted:
        print("fluxopt: error: interrupted while starting; nothing was run", file=sys.stderr)
        sys.exit(130)
    signal.signal(signal.SIGINT, previous[signal.SIGINT])  # the CLI answers from here on
    signal.signal(signal.SIGTERM, previous[signal.SIGTERM])
    cli_main()


if __name__ == "__main__":
    main()
