import signal
import sys


def _exit_on_termination(signum, _frame):
    """SIGTERM/SIGHUP outside `main` (its imports before, its final line after: `main` handles them in between):
    exit 128 + signal with a line before, as `main` does, never the default's silent death (rc -15) after."""
    if not _started:
        print(f"{signal.Signals(signum).name} while starting: stopped before anything ran", file=sys.stderr)
    raise SystemExit(128 + signum)


_started = False
for _sig in ("SIGTERM", "SIGHUP"):
    if hasattr(signal, _sig):
        signal.signal(getattr(signal, _sig), _exit_on_termination)

from .shell import main  # noqa: E402  (torch and timm: seconds, covered by the handler above)

_started = True
raise SystemExit(main())
