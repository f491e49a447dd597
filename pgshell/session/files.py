"""The session on disk: `sessions/NAME.session` (its document: session/document.py) and its folder `sessions/NAME/`
(checkpoints/, metrics.csv, quarantine.txt, errors.log). Naming, moving, and what a reopen reads (Session._reopen
assigns it).

The session file is rewritten at every checkpoint, so the pair always agrees. On reopen the checkpoint it names is
loaded — or a newer one of the same run (a kill between a checkpoint and the session file leaves the file one behind),
or an older one of that run when the named one is damaged; checkpoints of another run (each header names its run's
`lineage`) are never taken. The model is the one the session file names: a checkpoint never chooses code to import.
The session's lock (session/lock.py) is taken before anything in the folder is touched. Nothing here runs while the
worker trains except through the worker itself.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import secrets
import shutil
import traceback
from datetime import datetime
from pathlib import Path

from ..engine.errors import PgError
from ..engine.names import escape, unescape
from . import fingerprint as FP
from .document import DataBinding, SessionDoc, folder_of, read_raw
from .lock import LOCK_NAME, take


from ..engine.store.saver import C  # store/checkpoint.py, imported at first use (it imports torch)


# ---------------------------------------------------------------- errors, disk
def disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_message(folder: Path | None) -> str:
    return (f"the disk is full (saving to {folder}): free some space, then `save` (or `continue`) — the last "
            "checkpoint is intact")


def log_error(folder: Path, error: BaseException) -> Path | None:
    """Append the full trace to FOLDER/errors.log (the one writer of that file); None if it cannot be written."""
    log = Path(folder) / "errors.log"
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(error))
        with C.open_append(log) as f:  # a regular file only, never through a link
            f.write(f"--- {datetime.now().isoformat(timespec='seconds')}\n"
                    + text.encode("utf-8", "backslashreplace").decode("utf-8") + "\n")  # file names not in UTF-8
    except (OSError, PgError):
        return None
    return log


def log_warning(folder: Path | None, text: str) -> None:
    """A library's warning, into FOLDER/errors.log (dropped while the session has no folder): never the output."""
    if folder is None:
        return
    try:
        with C.open_append(Path(folder) / "errors.log") as f:
            f.write(f"--- {datetime.now().isoformat(timespec='seconds')} warning\n"
                    + text.encode("utf-8", "backslashreplace").decode("utf-8"))
    except (OSError, PgError):
        pass


def new_lineage() -> str:
    """The id of a run: in the session file and every checkpoint header it writes."""
    return secrets.token_hex(4)


# ---------------------------------------------------------------- validation of hand-editable content
def check_optimizer_state(state: dict, module) -> None:
    """The optimizer state's tensors have their parameters' shapes: a hand-edited one would only fail at the next
    training step, far from its cause."""
    opt = state.get("optimizer")
    if opt is None:
        return
    shapes = {n: p.shape for n, p in module.named_parameters()}
    for name, entries in opt["state"].items():
        for key, value in entries.items():
            if name in shapes and getattr(value, "ndim", 0) and value.shape != shapes[name]:  # "step" is 0-dim
                raise ValueError(f"optimizer state {key} of {name} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(shapes[name])}")


def load_weights(module, state: dict, what: str = "the checkpoint") -> None:
    """Put a checkpoint's weights into `module` and restore its frozen set — the one place that does both."""
    from ..engine.models.weights import restore_weights

    restore_weights(module, state["model"], state.get("frozen", []), what)


# ---------------------------------------------------------------- names
def auto_name(root: Path, model_name: str | None) -> str:
    """MODEL-YYYYmmdd-HHMMSS, unused in `root`."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", (model_name or "session").split("/")[-1]).strip("-.")
    base = f"{base or 'session'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    name, i = base, 1
    while (root / f"{name}.session").exists() or (root / name).exists():
        i += 1
        name = f"{base}-{i}"
    return name


def folder_name(doc: SessionDoc | dict, file: Path) -> str:
    return folder_of(file, doc).name


# ---------------------------------------------------------------- the session file
def new_uid() -> str:
    import uuid

    return uuid.uuid4().hex


# the session file itself (SessionDoc, read_document, write_document): session/document.py


class SessionExists(PgError):
    """`save NAME` onto another session: the shell asks (interactive) or refuses (plans) unless --force."""


def other_session(s, name: str, root: Path) -> Path | None:
    """The session file or folder already at root/name that is not this session's, if any."""
    if s.name is not None and (name, root.resolve()) == (s.name, s.root.resolve()):
        return None
    for p in (root / f"{name}.session", root / name):
        if p.exists() or p.is_symlink():
            return p
    return None


def move_folder(s, name: str, root: Path, replace: bool = False) -> bool:
    """`save other.session`: the session's files move to the new name (the session assigns what follows from it:
    Session._save_now). An auto-named session's folder is renamed (one folder, not two copies); a named one's is
    copied, leaving the old session as it was saved. `replace` removes another session already there — whole, and
    only once its lock is ours. Returns whether the folder was copied (the copy is another session)."""
    if not s.writes:  # DDP: rank 0 alone moves files; the others follow the name
        s.use_name(name, root)
        return False
    return _move_files(s, name, root, replace, s.folder, s.file)


def _move_files(s, name: str, root: Path, replace: bool, old_folder: Path | None, old_file: Path | None) -> bool:
    check_name(name)
    root.mkdir(parents=True, exist_ok=True)  # fails (unwritable place) before anything changed
    if replace:
        _remove_session(root, name)
    elif other_session(s, name, root):
        raise SessionExists(f"{root / name}.session exists: `save {root / name}.session --force` replaces it")
    target = root / name
    if old_folder is None or not old_folder.exists():
        s.use_name(name, root)
        return False
    if s.auto_named:
        _rename(old_folder, target)
        s.lock.moved(target)
        if old_file is not None and old_file.exists():
            old_file.unlink()
        s.use_name(name, root)
        return False
    shutil.copytree(old_folder, target, ignore=shutil.ignore_patterns(LOCK_NAME))
    s.use_name(name, root)  # takes the new folder's lock, then lets the old one go
    return True


def _rename(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copytree(src, dst)  # another file system: copy, then remove
        shutil.rmtree(src)


def _remove_session(root: Path, name: str) -> None:
    """`save NAME --force`: delete the session root/NAME — only a real one (`session_file_problem`), holding its
    lock so no other process is using it."""
    check_name(name)
    file = root / f"{name}.session"
    if not (file.is_file() and not file.is_symlink()):
        if (root / name).exists() or (root / name).is_symlink():  # a data folder `cats/` beside `cats.session`...
            raise PgError(f"{root / name} is not a pgshell session (there is no {file.name}): --force replaces "
                          "sessions only — choose another name")
        return
    problem = session_file_problem(file)
    if problem:
        raise PgError(f"{problem}: --force replaces a session only whole — choose another name")
    delete_session(root / name, file)


# ---------------------------------------------------------------- deleting: pgshell's own session folders only
SESSION_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # as `fork` takes it: no '.', '..', separators
# what pgshell writes in a session folder; a folder holding anything else is not deleted by pgshell
OWN_FILES = frozenset({LOCK_NAME, "checkpoints", "metrics.csv", "changes.jsonl", "manifests", "quarantine.txt",
                       "errors.log", "data-files.json", "tensorboard", "probe.json", "lrfind.json", "tune.db",
                       "tune.db-journal", "tune.db-wal", "tune.db-shm", "tune.json", "trials"})
_MARKERS = frozenset({LOCK_NAME, "checkpoints", "metrics.csv", "changes.jsonl"})  # at least one of these
FORK_TEMP = ".fork-"  # a fork is built as `.NAME.fork-XXXX` and renamed to NAME when whole (session/replay.py)


def check_name(name: str) -> None:
    if not SESSION_NAME.match(name or "") or name.endswith(".session"):
        raise PgError(f"a session name is letters, digits, '_', '-' and '.' (not first; no separators), not "
                      f"{name!r}"[:200])


def folder_problem(folder: Path) -> str | None:
    """Why `folder` is not a session folder pgshell made (None when it is): a real folder, not a link, holding
    pgshell's files and nothing else. Nothing is deleted without this check."""
    if folder.is_symlink():
        return f"{folder} is a symbolic link, not a session folder: pgshell leaves it (and what it points at) alone"
    if not folder.is_dir():
        return f"{folder} is not a folder"
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError as e:
        return f"{folder} cannot be listed ({e.strerror or e})"
    foreign = sorted(n for n in names if n not in OWN_FILES and not (n.startswith(".") and n.endswith(".tmp")))
    if foreign:
        return (f"{folder} holds files pgshell did not write ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}): move them out first if it is to go")
    if not names & _MARKERS:
        return f"{folder} holds none of a session's files"
    return None


def session_file_problem(file: Path) -> str | None:
    """Why the session `file` may not take its folder with it (None when it may): its folder is NAME beside it, a
    folder pgshell made, and no other session file names it (a copied file still names the original's folder)."""
    try:
        name = folder_name(read_raw(file), file)
    except PgError:
        name = file.stem  # a damaged file: its folder by the usual name, if that folder is pgshell's
    if name != file.stem:
        return f"{file} names the folder {name}/ of another session (a copy of its file?)"
    folder = file.parent / name
    if not folder.exists() and not folder.is_symlink():
        return None
    problem = folder_problem(folder)
    if problem:
        return problem
    others = [o.name for o in sharing_folder(file)]
    if others:
        return f"{folder} is also named by {', '.join(others[:2])}"
    return None


def sharing_folder(file: Path) -> list[Path]:
    """The other session files beside `file` that name its folder."""
    out = []
    for other in sorted(file.parent.glob("*.session")):
        if other.name == file.name:
            continue
        try:
            name = folder_name(read_raw(other), other)
        except PgError:
            continue
        if name == file.stem:
            out.append(other)
    return out


def orphan_folders(root: Path) -> list[Path]:
    """Session folders under `root` that no session file names: left by a kill during `fork` (its temporary
    `.NAME.fork-XXXX`, or NAME before its file was written) or by a session file deleted by hand."""
    if not root.is_dir():
        return []
    named = set()
    for file in root.glob("*.session"):
        try:
            named.add(folder_name(read_raw(file), file))
        except PgError:
            named.add(file.stem)  # a damaged file still claims its folder by the usual name
    return sorted(p for p in root.iterdir()
                  if p.name not in named and not p.name.endswith(".session")
                  and (SESSION_NAME.match(p.name) or FORK_TEMP in p.name)
                  and folder_problem(p) is None)


def delete_session(folder: Path, file: Path | None = None) -> None:
    """Delete a session folder pgshell made (checked again here) and then its file, holding the folder's lock: a
    session another pgshell has open is refused (SessionBusy), never deleted under it."""
    if folder.exists() or folder.is_symlink():
        problem = folder_problem(folder)
        if problem:
            raise PgError(problem)
        lock = take(folder, str(file or folder))
        try:
            shutil.rmtree(folder)
        finally:
            lock.close()
    if file is not None and (file.exists() or file.is_symlink()):
        file.unlink()


# ---------------------------------------------------------------- reopening
# What Session._reopen (session/core.py) reads, each a function returning what it found: the session assigns it.
def clean_partial_writes(folder: Path, file: Path) -> list:
    """Remove what a kill left of an atomic write (a checkpoint, metrics.csv's truncation, the session file)."""
    return (C.clean_partial_writes(folder / "checkpoints") + C.clean_partial_writes(folder)
            + C.clean_partial_writes(file.parent, file.name))


def find_checkpoint(folder: Path, root: Path, file: Path, doc: SessionDoc, notify):
    """(path, state) of the checkpoint to continue from: the newest that verifies among the session's run's (see
    the module's doc); never one of another run, and never none when the file names one (no silent start from
    fresh weights)."""
    skipped: list[str] = []
    others: list[str] = []
    named = (root / doc.checkpoint).resolve() if doc.checkpoint else None

    def ours(path: Path, meta) -> bool:
        if doc.lineage is None or meta is None or meta.get("lineage") == doc.lineage or path.resolve() == named:
            return True
        others.append(meta.get("step", "?"))
        return False

    found = C.load_latest(folder / "checkpoints", warn=lambda m: (skipped.append(m), notify(m)), accept=ours)
    if found is None and doc.checkpoint:
        raise PgError(f"{file}: no usable checkpoint in {folder / 'checkpoints'}"
                      + (f" ({skipped[-1]})" if skipped else " (the folder has none of this session's run)"))
    newer = [st for st in others if found is None or int(st or -1) > found[1]["position"]["step"]]
    if newer:
        notify(f"{len(newer)} newer checkpoint(s) in {folder / 'checkpoints'} belong to another run and are left "
               "aside: the session continues from the checkpoint its file names")
    return found


def rebuild_model(file: Path, model: dict, found):
    """(spec, built) of the model the session file names; a checkpoint only brings weights, and one made by another
    model is an error: a checkpoint never chooses the code that is imported (a `file.py:factory` name in it is
    inert)."""
    from ..engine import models as M

    spec = M.ModelSpec.from_dict(model)
    if found:
        theirs = found[1].get("model_spec")
        mine = (spec.name, spec.num_classes)
        if not isinstance(theirs, dict) or (theirs.get("name"), theirs.get("num_classes")) != mine:
            got = theirs.get("name") if isinstance(theirs, dict) else theirs
            raise PgError(f"{found[0].name} holds another model ({str(got)[:80]!s}) than {file} names "
                          f"({spec.name}): a checkpoint never chooses the model — edit neither; reopen the session "
                          "that made it")
    # weights come from the checkpoint: never touch the network or the original weights file again
    return spec, M.build_skeleton(spec) if found else M.build_model(spec)


def reopen_metrics(folder: Path, state: dict, notify):
    """The folder's metrics log, cut back to the checkpoint's step (rows a killed process wrote after it)."""
    from ..engine.train.metrics import MetricsLog

    log = MetricsLog(folder / "metrics.csv")  # the saver syncs it before each checkpoint
    dropped = log.truncate_after(int(state["position"]["step"]))
    if dropped:
        notify(f"dropped {dropped} metrics rows written after the checkpoint")
    if log.skipped:
        notify(f"metrics.csv: {log.skipped} unreadable row(s) skipped and removed")
    return log


def restore_checkpoint(module, path: Path, state: dict, notify) -> None:
    """The checkpoint's weights into `module` now (so `eval`/`predict` work before data is attached), its
    optimizer state checked against the parameters."""
    if state.get("optimizer") is None and state["position"]["step"]:
        notify(f"{path.name} keeps the weights only (a newer checkpoint held the optimizer state): training goes on "
               "from them with the optimizer's momentum restarted")
    load_weights(module, state)
    check_optimizer_state(state, module)


def rebind_data(data: DataBinding, folder: Path, state: dict | None, seed: int, notify):
    """(binding, splits, what changed, fingerprint of the lists on disk): the data folder scanned again and
    compared with what the session recorded. The same data attaches silently; changed data is described and left
    detached (splits None) until the user chooses (see session/fingerprint.py)."""
    recorded = data.identity
    if recorded is None and state and state.get("classes"):  # a file from before fingerprints: the classes at least
        recorded = {"classes": list(state["classes"])}
    lists = FP.read_lists(folder)
    if lists and recorded and FP.fingerprint(lists) != recorded.get("fingerprint"):
        lists = None  # not the lists behind the file's fingerprint (a kill between the two writes)
    written = recorded.get("fingerprint") if recorded and lists else None
    bound = dataclasses.replace(data, identity=recorded, lists=lists)
    try:
        if data.keep and lists:
            splits, gone = FP.kept_splits(lists, data.path)
            if gone:
                notify(f"{gone} of the kept images are gone from {escape(data.path)}: training goes on without them")
        else:
            from ..engine import data as D

            splits = D.resolve_data(data.path, split=data.split, seed=seed if data.seed is None else data.seed,
                                    root=data.root, allow_outside=data.allow_outside)
            if data.exclude:  # `data --exclude`: the names recorded then, left out again
                from .fingerprint import apply_exclusion

                apply_exclusion(splits, data.path, data.exclude["paths"])
    except PgError as e:
        notify(f"data not attached: {e} — `data PATH` to attach it again")
        return bound, None, None, written
    now_lists = FP.file_lists(splits, data.path)
    now = FP.identity(now_lists)
    kept = bool(data.keep and lists)  # the user pinned the recorded lists: what is gone was said above
    if recorded and not kept and (now["classes"] != recorded["classes"]
                                  or recorded.get("fingerprint", now["fingerprint"]) != now["fingerprint"]):
        change = FP.changes(dict(recorded, **(lists or {})), dict(now, **now_lists))
        notify(f"the data changed since this session was saved: {change} — the data is not attached. "
               "`data --keep` trains on with the recorded images that still exist; `data PATH` re-splits the "
               "folder as a new run (the checkpoints so far stay); or quit: the session stays as it was")
        return bound, None, change, written
    return dataclasses.replace(data, identity=now, lists=now_lists), splits, None, written


# ---------------------------------------------------------------- quarantine.txt
class Quarantine:
    """quarantine.txt: every bad file once, with its reason, one `ESCAPED-PATH<tab>REASON` line each
    (engine/names.py: `unescape` gives the exact file name back). Files found before the session has a folder (at
    `data` time) wait until it has one. Written by one thread at a time: the shell while idle, the worker while
    training."""

    def __init__(self):
        self.folder: Path | None = None
        self.writes = True
        self._listed: set[str] | None = None
        self._unfiled: list[tuple[str, str]] = []

    def use(self, folder: Path | None) -> None:
        self.folder, self._listed = folder, None  # another folder: its own quarantine.txt

    def add(self, bad: list) -> list:
        """File `bad` [(path, reason)]; returns the ones new to the list."""
        self._unfiled.extend(bad)
        if self.folder is None or not self._unfiled or not self.writes:
            return list(bad)
        file = self.folder / "quarantine.txt"
        if self._listed is None:
            self._listed = set()
            if file.exists():
                with open(file, encoding="utf-8", errors="replace") as f:
                    self._listed = {unescape(ln.split("\t")[0]) for ln in f.read().splitlines()}
        fresh = []
        for path, reason in self._unfiled:
            if path not in self._listed:
                self._listed.add(path)
                fresh.append((path, reason))
        self._unfiled = []
        if fresh:
            # one line per file whatever its name holds (a newline, bytes that are not UTF-8): escaped, losslessly
            with C.open_append(file) as f:
                f.writelines(f"{escape(path)}\t{escape(reason)}\n" for path, reason in fresh)
        return fresh
