"""`python -m pgshell` and the `pgshell` script: `main`, with SIGTERM/SIGHUP handled outside it too."""

import signal
import sys

_started = False


def _exit_on_termination(signum, _frame):
    """SIGTERM/SIGHUP outside `main` (its imports before, its final line after: `main` handles them in between):
    exit 128 + signal with a line before, as `main` does, never the default's silent death (rc -15) after."""
    if not _started:
        try:
            print(f"{signal.Signals(signum).name} while starting: stopped before anything ran", file=sys.stderr)
        except (OSError, ValueError):  # SIGHUP: the terminal may be gone
            pass
    raise SystemExit(128 + signum)


def run() -> None:
    global _started
    for name in ("SIGTERM", "SIGHUP"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), _exit_on_termination)
    from .shell import main  # torch and timm: seconds, covered by the handler above

    _started = True
    raise SystemExit(main())


if __name__ == "__main__":
    run()
