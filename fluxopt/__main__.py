"""``python -m fluxopt``. Signals are answered from the first instant: importing torch and
diffusers takes seconds, and Ctrl-C or SIGTERM then must still end in one line and exit 130."""

import signal
import sys


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        from fluxopt.cli import main as cli_main
    except KeyboardInterrupt:
        print("fluxopt: error: interrupted while starting; nothing was run", file=sys.stderr)
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
