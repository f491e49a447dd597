"""One writer per session: an OS file lock (`fcntl.flock`) on `sessions/NAME/.lock`, held while the session is open.

Two processes on one session would interleave metrics rows and overwrite each other's checkpoints; even opening a
session rewrites files (a torn metrics row is cut, partial writes are removed). So the lock is taken before anything
in the folder is touched, and a second opener gets one line naming the holder. The OS drops the lock when the
process ends, however it ends (`kill -9` included): there is no stale lock to clean up.

flock locks belong to an open file description: a second Session of the same process on the same folder is refused
too, as a second process would be. A forked child (a DataLoader worker with `workers` > 0) would share that
description and keep the lock after a `kill -9` of pgshell until it notices its parent is gone (seconds): so each
child closes its copies as it starts (`os.register_at_fork`), and the lock ends with the process that took it.
"""

from __future__ import annotations

import os
import socket
import weakref
from pathlib import Path

from ..engine.errors import PgError

LOCK_NAME = ".lock"

try:
    import fcntl
except ImportError:  # not POSIX: no lock (pgshell's sessions are documented for Linux and macOS)
    fcntl = None


class SessionBusy(PgError):
    """The session is open in another pgshell."""


_HELD: "weakref.WeakSet[SessionLock]" = weakref.WeakSet()  # this process's held locks, for a forked child to drop


def _drop_in_child() -> None:
    """In a freshly forked child: close the inherited lock files (the parent keeps its lock; the child never had
    one of its own)."""
    for lock in list(_HELD):
        if lock._file is not None:
            try:
                lock._file.close()
            except OSError:
                pass
        lock._file, lock.folder = None, None
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_in_child)


class SessionLock:
    def __init__(self):
        self._file = None
        self.folder: Path | None = None

    def holds(self, folder: Path) -> bool:
        return self._file is not None and self.folder is not None and _same(self.folder, folder)

    def acquire(self, folder: Path, what: str) -> None:
        """Hold `folder`'s lock (releasing the one held before); SessionBusy if another holder has it."""
        if self.holds(folder):
            return
        f = take(folder, what)
        self.release()
        self._file, self.folder = f, Path(folder)
        _HELD.add(self)

    def moved(self, folder: Path) -> None:
        """The held folder was renamed: the lock file moved with it and stays held."""
        self.folder = Path(folder)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
        self._file, self.folder = None, None
        _HELD.discard(self)


def take(folder: Path, what: str):
    """The open, locked lock file of `folder` (created with the folder); SessionBusy naming the holder if taken."""
    from ..engine.store.checkpoint import open_append

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    f = open_append(folder / LOCK_NAME)  # a regular file only: a planted link is refused
    if fcntl is None:
        return f
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        holder = _holder(folder / LOCK_NAME)
        if _ended(holder):  # pid N on this machine has ended: what holds the lock is something it left running
            raise SessionBusy(f"{what} is still locked by processes left by a pgshell that has ended{holder}: "
                              "they end within seconds — try again (or end them)") from None
        raise SessionBusy(f"{what} is open in another pgshell{holder}: one process writes a session at a time — "
                          "quit it there first (`plot FILE` reads its curves without opening it)") from None
    os.ftruncate(f.fileno(), 0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def _holder(path: Path) -> str:
    try:
        text = path.read_text(errors="replace").strip()
    except OSError:
        return ""
    return f" ({text[:80]})" if text else ""


def _ended(holder: str) -> bool:
    """Whether the holder line names a process of this machine that no longer exists (the pid is not trusted)."""
    words = holder.strip(" ()").split()
    if len(words) < 4 or words[0] != "pid" or not words[1].isdigit() or words[3] != socket.gethostname():
        return False
    try:
        os.kill(int(words[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists (another user's): not ended
        return False
    return False


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()
