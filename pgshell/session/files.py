"""The session on disk: `sessions/NAME.session` (JSON, versioned) and its folder `sessions/NAME/` (checkpoints/,
metrics.csv, quarantine.txt, errors.log). Naming, writing, reading and validating, moving, and reopening.

The session file is rewritten at every checkpoint, so the pair always agrees. On reopen the checkpoint it names is
loaded — or a newer one of the same run (a kill between a checkpoint and the session file leaves the file one behind),
or an older one of that run when the named one is damaged; checkpoints of another run (each header names its run's
`lineage`) are never taken. The model is the one the session file names: a checkpoint never chooses code to import.
The session's lock (session/lock.py) is taken before anything in the folder is touched. Nothing here runs while the
worker trains except through the worker itself.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from ..engine.config import TrainConfig
from ..engine.errors import PgError
from ..engine.names import escape, unescape
from . import fingerprint as FP
from .lock import LOCK_NAME, take

SESSION_FORMAT = "pgshell-session"
SESSION_VERSION = 1


from ..engine.saver import C  # engine.checkpoint, imported at first use (it imports torch)


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
def checked(value: Any, what: str, fields: dict[str, type | tuple], required: bool = True) -> dict | None:
    """A dict from a session file with only `fields`, each of its type (all of them if `required`, else at least
    one); anything else is a hand edit, reported as a TypeError naming it."""
    if value is None:
        return None
    present = value.keys() & fields.keys() if isinstance(value, dict) else set()
    if (not present or set(value) - present
            or not all(isinstance(value.get(k), fields[k]) and not isinstance(value.get(k), bool)
                       for k in (fields if required else present))):
        raise TypeError(f"'{what}' should be {{{', '.join(fields)}}}, not {value!r}"[:200])
    return value


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
    from ..engine.models import restore_weights

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


def folder_name(doc: dict, file: Path) -> str:
    name = str(doc.get("folder") or file.stem)
    if "/" in name or "\\" in name or name.startswith("."):
        raise PgError(f"{file}: bad folder name {name!r}")
    return name


# ---------------------------------------------------------------- the session file
def new_uid() -> str:
    import uuid

    return uuid.uuid4().hex


def session_doc(s) -> dict:
    data = None
    if s.data:  # the data's classes and fingerprint beside its path: reopen compares them with the folder
        data = dict(s.data, **{k: v for k, v in (s.data_id or {}).items() if k in ("classes", "fingerprint", "counts")})
    return {
        "format": SESSION_FORMAT, "version": SESSION_VERSION, "name": s.name, "folder": s.name,
        "model": s.spec.to_dict() if s.spec else None,
        "data": data, "config": s.config.to_dict(),
        "checkpoint": str(s.latest_checkpoint.relative_to(s.root)) if s.latest_checkpoint else None,
        "id": s.uid, "lineage": s.lineage, "auto_named": s.auto_named,
        "best": s.best, "target": s.target, "saved": datetime.now().isoformat(timespec="seconds"),
    }


def write_session_file(s) -> None:
    fingerprint = (s.data_id or {}).get("fingerprint")
    if s.data_lists is not None and s.folder is not None and fingerprint and s.lists_written != fingerprint:
        FP.write_lists(s.folder, s.data_lists)  # the lists behind the fingerprint, once per change
        s.lists_written = fingerprint
    C.atomic_write_bytes(s.file, (json.dumps(session_doc(s), indent=2) + "\n").encode())


def read_session_file(file: Path) -> dict:
    try:
        doc = json.loads(file.read_text())
    except FileNotFoundError:
        raise PgError(f"no session file {file}: check the path (sessions live in sessions/NAME.session)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PgError(f"{file} is not a readable session file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != SESSION_FORMAT:
        raise PgError(f"{file} is not a pgshell session file")
    if doc.get("version") != SESSION_VERSION:
        raise PgError(f"{file} has session version {doc.get('version')!r}; this pgshell reads {SESSION_VERSION}")
    return doc


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


def move_folder(s, name: str, root: Path, replace: bool = False) -> None:
    """`save other.session`: the session continues under the new name. An auto-named session's folder is renamed
    (one folder, not two copies); a named one's is copied, leaving the old session as it was saved. `replace`
    removes another session already there — whole, and only once its lock is ours."""
    old_folder, old_file = s.folder, s.file
    if not s._writes:  # DDP: rank 0 alone moves files; the others follow the name
        s.use_name(name, root)
        old_folder = None
    else:
        _move_files(s, name, root, replace, old_folder, old_file)
    s.auto_named = False
    saver = s.saver
    if saver.latest is not None:
        saver.latest = s.folder / "checkpoints" / saver.latest.name
    if saver.best and old_folder is not None:
        saver.best["path"] = str(Path(name) / Path(saver.best["path"]).relative_to(old_folder.name))


def _move_files(s, name: str, root: Path, replace: bool, old_folder: Path | None, old_file: Path | None) -> None:
    root.mkdir(parents=True, exist_ok=True)  # fails (unwritable place) before anything changed
    if replace:
        _remove_session(root, name)
    elif other_session(s, name, root):
        raise SessionExists(f"{root / name}.session exists: `save {root / name}.session --force` replaces it")
    target = root / name
    if old_folder is None or not old_folder.exists():
        s.use_name(name, root)
    elif s.auto_named:
        _rename(old_folder, target)
        s.lock.moved(target)
        if old_file is not None and old_file.exists():
            old_file.unlink()
        s.use_name(name, root)
    else:
        shutil.copytree(old_folder, target, ignore=shutil.ignore_patterns(LOCK_NAME))
        s.use_name(name, root)  # takes the new folder's lock, then lets the old one go
        s.uid = new_uid()  # save-as: another session from here on (the old one keeps its id)


def _rename(src: Path, dst: Path) -> None:
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copytree(src, dst)  # another file system: copy, then remove
        shutil.rmtree(src)


def _remove_session(root: Path, name: str) -> None:
    """Delete the session root/name (its file and folder), holding its lock so no other process is using it."""
    folder, file = root / name, root / f"{name}.session"
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        folder.unlink()
    elif folder.exists():
        lock = take(folder, f"{file}")
        try:
            shutil.rmtree(folder)
        finally:
            lock.close()
    if file.exists() or file.is_symlink():
        file.unlink()


# ---------------------------------------------------------------- reopening
def reopen(s, file: Path, doc: dict) -> None:
    """Fill a fresh Session `s` from its file and its checkpoint: model, optimizer, schedule, position, data."""
    s.use_name(folder_name(doc, file), file.parent)  # the lock first: nothing below touches a session in use
    s.file = file
    s.config = TrainConfig.from_dict(doc.get("config") or {})
    s.saver.best = checked(doc.get("best"), "best", {"path": str, "value": (int, float), "epoch": int, "metric": str})
    lineage = doc.get("lineage")
    if lineage is not None and not isinstance(lineage, str):
        raise TypeError(f"'lineage' should be text, not {lineage!r}"[:200])
    s.auto_named = doc.get("auto_named") is True
    # a file from before session ids: its folder's path, which is what identified it then (session/study.py)
    s.uid = str(doc.get("id") or s.folder.resolve())
    if s._writes:  # DDP: rank 0 alone touches the folder (another node's cleaning could remove its temp files)
        # a kill can interrupt any atomic write: a checkpoint, metrics.csv's truncation, the session file itself
        removed = (C.clean_partial_writes(s.folder / "checkpoints") + C.clean_partial_writes(s.folder)
                   + C.clean_partial_writes(file.parent, file.name))
        if removed:
            s.notify(f"removed {len(removed)} partial file(s) left by an interrupted write")
    found = _find_checkpoint(s, file, doc, lineage)
    s.lineage = lineage  # None: a session file from before lineages stays without one until a new run
    s.saver.lineage = lineage or ""
    if doc.get("model"):
        _rebuild_model(s, file, doc["model"], found)
    if found:
        named = doc.get("checkpoint") and (s.root / str(doc["checkpoint"])).resolve() == found[0].resolve()
        _restore_checkpoint(s, *found, keep_settings=bool(named))
    if doc.get("data"):
        _reattach_data(s, doc["data"], found[1] if found else None)
    if s.splits is not None and s.built is not None and found:
        s.device_fallback = True  # the device is a preference: reopen on what exists, with a note
        tr = s.ensure_trainer()
        if tr.runtime.note:
            s.notify(tr.runtime.note)
    target = checked(doc.get("target"), "target", {"epoch": int, "step": int, "unfreeze_at": int,
                                                   "backbone_lr_scale": (int, float)}, required=False)
    s.target = target if found else None
    s.settle()
    s.dirty = False


def _find_checkpoint(s, file: Path, doc: dict, lineage: str | None):
    """The checkpoint to continue from: the newest that verifies among the session's run's (see the module's doc);
    never one of another run, and never none when the file names one (no silent start from fresh weights)."""
    skipped: list[str] = []
    others: list[str] = []
    named = (s.root / str(doc["checkpoint"])).resolve() if doc.get("checkpoint") else None

    def ours(path: Path, meta) -> bool:
        if lineage is None or meta is None or meta.get("lineage") == lineage or path.resolve() == named:
            return True
        others.append(meta.get("step", "?"))
        return False

    found = C.load_latest(s.folder / "checkpoints", warn=lambda m: (skipped.append(m), s.notify(m)), accept=ours)
    if found is None and doc.get("checkpoint"):
        raise PgError(f"{file}: no usable checkpoint in {s.folder / 'checkpoints'}"
                      + (f" ({skipped[-1]})" if skipped else " (the folder has none of this session's run)"))
    newer = [st for st in others if found is None or int(st or -1) > found[1]["position"]["step"]]
    if newer:
        s.notify(f"{len(newer)} newer checkpoint(s) in {s.folder / 'checkpoints'} belong to another run and are left "
                 "aside: the session continues from the checkpoint its file names")
    return found


def _rebuild_model(s, file: Path, model: dict, found) -> None:
    """The model the session file names; a checkpoint only brings weights, and one made by another model is an
    error: a checkpoint never chooses the code that is imported (a `file.py:factory` name in it is inert)."""
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
    s.built = M.build_model(M.ModelSpec(spec.name, spec.num_classes) if found else spec)
    s.spec = spec


def _restore_checkpoint(s, path: Path, state: dict, keep_settings: bool) -> None:
    """`keep_settings`: the session file names this checkpoint, so its settings (changed since, not trained yet:
    they apply when training next starts) win over the checkpoint's; otherwise the file lags and the checkpoint's
    settings are the newer."""
    from ..engine.metrics import MetricsLog

    s.saver.latest = path
    config = TrainConfig.from_dict(state["config"])  # checked either way: a hand edit is an error
    if not keep_settings:
        s.config = config
    if s._writes:  # DDP: rank 0 alone keeps the log; every other rank appending too would double each row
        s._log = s.saver.log = MetricsLog(s.folder / "metrics.csv")  # the saver syncs it before each checkpoint
        dropped = s._log.truncate_after(int(state["position"]["step"]))
        if dropped:
            s.notify(f"dropped {dropped} metrics rows written after the checkpoint")
        if s._log.skipped:
            s.notify(f"metrics.csv: {s._log.skipped} unreadable row(s) skipped and removed")
    s.pending_state = state
    if state.get("optimizer") is None and state["position"]["step"]:
        s.notify(f"{path.name} keeps the weights only (a newer checkpoint held the optimizer state): training "
                 "goes on from them with the optimizer's momentum restarted")
    load_weights(s.built.module, state)  # now, so `eval`/`predict` work before data is attached
    check_optimizer_state(state, s.built.module)


def _reattach_data(s, data: dict, state: dict | None) -> None:
    """Scan the data folder again and compare it with what the session recorded: the same data attaches silently;
    changed data is described and left detached until the user chooses (see session/fingerprint.py)."""
    s.data = {k: data[k] for k in ("path", "split", "size", "seed", "keep", "root", "exclude") if k in data}
    if not isinstance(data["path"], str) or not isinstance(data["split"], (int, float)):
        raise TypeError(f"'data' should hold a path and a split, not {data!r}"[:200])
    recorded = {k: data[k] for k in ("classes", "fingerprint", "counts") if k in data} or None
    if recorded is None and state and state.get("classes"):  # a file from before fingerprints: the classes at least
        recorded = {"classes": list(state["classes"])}
    s.data_id, s.data_lists = recorded, FP.read_lists(s.folder)
    if s.data_lists and recorded and FP.fingerprint(s.data_lists) != recorded.get("fingerprint"):
        s.data_lists = None  # not the lists behind the file's fingerprint (a kill between the two writes)
    s.lists_written = recorded.get("fingerprint") if recorded and s.data_lists else None
    try:
        if data.get("keep") and s.data_lists:
            splits, gone = FP.kept_splits(s.data_lists, data["path"])
            if gone:
                s.notify(f"{gone} of the kept images are gone from {escape(data['path'])}: training goes on without "
                         "them")
        else:
            from ..engine import data as D

            splits = D.resolve_data(data["path"], split=data["split"], seed=data.get("seed", s.config.seed),
                                    root=data.get("root"))
            if data.get("exclude"):  # `data --exclude`: the names recorded then, left out again
                from .audit import apply_exclusion

                apply_exclusion(splits, data["path"], data["exclude"]["paths"])
    except PgError as e:
        s.notify(f"data not attached: {e} — `data PATH` to attach it again")
        s.splits = None
        return
    lists = FP.file_lists(splits, data["path"])
    now = FP.identity(lists)
    kept = bool(data.get("keep") and s.data_lists)  # the user pinned the recorded lists: what is gone was said above
    if recorded and not kept and (now["classes"] != recorded["classes"]
                     or recorded.get("fingerprint", now["fingerprint"]) != now["fingerprint"]):
        s.data_change = FP.changes(dict(recorded, **(s.data_lists or {})), dict(now, **lists))
        s.notify(f"the data changed since this session was saved: {s.data_change} — the data is not attached. "
                 "`data --keep` trains on with the recorded images that still exist; `data PATH` re-splits the "
                 "folder as a new run (the checkpoints so far stay); or quit: the session stays as it was")
        s.splits = None
        return
    s.splits, s.data_id, s.data_lists = splits, now, lists
    s.quarantine(splits.rejected)  # files gone bad since


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
