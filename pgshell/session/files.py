"""The session on disk: `sessions/NAME.session` (JSON, versioned) and its folder `sessions/NAME/` (checkpoints/,
metrics.csv, quarantine.txt, errors.log). Naming, writing, reading and validating, moving, and reopening.

The session file is rewritten at every checkpoint, so the pair always agrees; on reopen the newest checkpoint that
verifies is loaded. Nothing here runs while the worker trains except through the worker itself.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import traceback
from datetime import datetime
from pathlib import Path
from typing import Any

from ..engine.config import TrainConfig
from ..engine.errors import PgError

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
        with open(log, "a") as f:
            f.write(f"--- {datetime.now().isoformat(timespec='seconds')}\n"
                    + "".join(traceback.format_exception(error)) + "\n")
    except OSError:
        return None
    return log


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
def session_doc(s) -> dict:
    return {
        "format": SESSION_FORMAT, "version": SESSION_VERSION, "name": s.name, "folder": s.name,
        "model": s.spec.to_dict() if s.spec else None,
        "data": s.data, "config": s.config.to_dict(),
        "checkpoint": str(s.latest_checkpoint.relative_to(s.root)) if s.latest_checkpoint else None,
        "best": s.best, "target": s.target, "saved": datetime.now().isoformat(timespec="seconds"),
    }


def write_session_file(s) -> None:
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


def move_folder(s, name: str, root: Path) -> None:
    """`save other.session`: the session continues under the new name; its folder is copied across."""
    old_folder = s.folder
    (root / name).mkdir(parents=True, exist_ok=True)  # fails (unwritable place) before anything changed
    s.use_name(name, root)
    if old_folder is not None and old_folder.exists() and old_folder.resolve() != s.folder.resolve():
        shutil.copytree(old_folder, s.folder, dirs_exist_ok=True)
        saver = s.saver
        if saver.latest is not None:
            saver.latest = s.folder / "checkpoints" / saver.latest.name
        if saver.best:
            saver.best["path"] = str(Path(name) / Path(saver.best["path"]).relative_to(old_folder.name))


# ---------------------------------------------------------------- reopening
def reopen(s, file: Path, doc: dict) -> None:
    """Fill a fresh Session `s` from its file and newest good checkpoint: model, optimizer, schedule, position."""
    s.use_name(folder_name(doc, file), file.parent)
    s.file = file
    s.config = TrainConfig.from_dict(doc.get("config") or {})
    s.saver.best = checked(doc.get("best"), "best", {"path": str, "value": (int, float), "epoch": int, "metric": str})
    # a kill can interrupt any atomic write: a checkpoint, metrics.csv's truncation, the session file itself
    removed = (C.clean_partial_writes(s.folder / "checkpoints") + C.clean_partial_writes(s.folder)
               + C.clean_partial_writes(file.parent, file.name))
    if removed:
        s.notify(f"removed {len(removed)} partial file(s) left by an interrupted write")
    skipped: list[str] = []
    found = C.load_latest(s.folder / "checkpoints", warn=lambda m: (skipped.append(m), s.notify(m)))
    if found is None and doc.get("checkpoint"):  # never start over silently from fresh weights
        raise PgError(f"{file}: no usable checkpoint in {s.folder / 'checkpoints'}"
                      + (f" ({skipped[-1]})" if skipped else " (the folder has none)"))
    if doc.get("model"):
        _rebuild_model(s, doc["model"], found)
    if found:
        _restore_checkpoint(s, *found)
    if doc.get("data"):
        _reattach_data(s, doc["data"])
    if s.splits is not None and s.built is not None and found:
        s.ensure_trainer()
    target = checked(doc.get("target"), "target", {"epoch": int, "step": int, "unfreeze_at": int,
                                                   "backbone_lr_scale": (int, float)}, required=False)
    s.target = target if found else None
    s.dirty = False


def _rebuild_model(s, model: dict, found) -> None:
    from ..engine import models as M

    spec = M.ModelSpec.from_dict(model)
    if found:
        spec = M.ModelSpec.from_dict(found[1]["model_spec"])
    # weights come from the checkpoint: never touch the network or the original weights file again
    s.built = M.build_model(M.ModelSpec(spec.name, spec.num_classes) if found else spec)
    s.spec = spec


def _restore_checkpoint(s, path: Path, state: dict) -> None:
    from ..engine.metrics import MetricsLog

    s.saver.latest = path
    s.config = TrainConfig.from_dict(state["config"])
    s._log = MetricsLog(s.folder / "metrics.csv")
    dropped = s._log.truncate_after(int(state["position"]["step"]))
    if dropped:
        s.notify(f"dropped {dropped} metrics rows written after the checkpoint")
    s.pending_state = state
    load_weights(s.built.module, state)  # now, so `eval`/`predict` work before data is attached
    check_optimizer_state(state, s.built.module)


def _reattach_data(s, data: dict) -> None:
    from ..engine import data as D

    s.data = data
    try:
        s.splits = D.scan_folder(data["path"], split=data["split"], seed=s.config.seed)
        s.quarantine(s.splits.rejected)  # files gone bad since
    except PgError as e:
        s.notify(f"data not attached: {e} — `data PATH` to attach it again")
        s.splits = None


# ---------------------------------------------------------------- quarantine.txt
class Quarantine:
    """quarantine.txt: every bad file once, with its reason. Files found before the session has a folder (at `data`
    time) wait until it has one. Written by one thread at a time: the shell while idle, the worker while training."""

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
            self._listed = {ln.split("\t")[0] for ln in file.read_text().splitlines()} if file.exists() else set()
        fresh = []
        for path, reason in self._unfiled:
            if path not in self._listed:
                self._listed.add(path)
                fresh.append((path, reason))
        self._unfiled = []
        if fresh:
            with open(file, "a") as f:
                f.writelines(f"{path}\t{reason}\n" for path, reason in fresh)
        return fresh
