"""The change log: every command that changes what training does, with the position at which it took effect.

`sessions/NAME/changes.jsonl` holds a header line (`{"kind": "start", ...}`: the settings' defaults when the session
began, and whether the log saw its beginning) and then one line per change: `load` (the model, its weights file's
SHA-256, a digest of the weights it produced, the seed that initialised them), `data` (path, split, size and the
fingerprint of the folder's contents, whose per-file manifest is kept in `manifests/`), `freeze`/`unfreeze`, every
`set` (also those made by `tune apply` and `lrfind apply`, marked `via`), and `train` targets (notes: the replay
trains by steps). Each line carries the position (`step`, `epoch` = completed epochs, `batch` = batches into the
next) at which the change applied: a change made while training is recorded inside the function the worker runs
between two batches, so its position is the loop's own. A setting that only applies when training next starts is
held back and logged when it does.

Every checkpoint stores how many changes were logged when it was written (`ChangeCounter`, a loop handler with
state), so reopening a session from a checkpoint drops changes logged after it by a process that died: the log and
the weights always tell the same story.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from ..engine.config import TrainConfig
from ..engine.train.events import Handler

LOG = "changes.jsonl"
VERSION = 1
REPLAYED = ("data", "load", "freeze", "unfreeze", "set", "head")  # what a plan re-does; "train" and "fork" are notes


def value_text(value: Any) -> str:
    """A setting's value as `set` reads it back exactly (floats by repr: they round-trip bit for bit)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return repr(value) if isinstance(value, float) else str(value)


def where(entry: dict) -> str:
    """A position for people, as the pause line says it: epoch in progress and batches done in it."""
    if entry.get("pending"):
        return "when training next starts"
    epoch, batch = entry.get("epoch", 0), entry.get("batch", 0)
    if not entry.get("step"):
        return "before training"
    return f"epoch {epoch + 1} batch {batch}" if batch else f"start of epoch {epoch + 1}"


def label(entry: dict) -> str:
    """A change in a few words, for a mark on a plot: `lr 0.0003`, `unfreeze layer4`."""
    if entry["kind"] == "set":
        return f"{entry['name']} {value_text(entry['value'])}"
    if entry["kind"] == "data":
        return f"data {Path(entry['path']).name}"
    return entry["cmd"] if len(entry["cmd"]) <= 40 else entry["cmd"][:39] + "…"


class ChangeCounter(Handler):
    """Puts the number of changes logged so far into every checkpoint; restoring one rewinds the log to it."""

    key = "changelog"
    order = 0

    def __init__(self, log: "ChangeLog"):
        self.log = log

    def state_dict(self) -> dict:
        return {"count": len(self.log.entries)}

    def load_state_dict(self, state: dict) -> None:
        if "count" in state:
            self.log.rewind(int(state["count"]))


class ChangeLog:
    """`position`: the session's (step, completed epochs, batches into the next) now — the session alone answers it;
    `writes`: whether this process writes files (DDP: rank 0 alone); `notify`: one line for the user."""

    def __init__(self, position: Callable[[], tuple[int, int, int]], writes: Callable[[], bool] = lambda: True,
                 notify: Callable[[str], None] = lambda msg: None):
        self._position, self._writes, self._notify = position, writes, notify
        self.header: dict = {"kind": "start", "version": VERSION, "complete": True,
                             "defaults": TrainConfig().to_dict(), "time": _now()}
        self.entries: list[dict] = []
        self.pending: list[dict] = []  # settings that apply when training next starts, not logged until then
        self.folder: Path | None = None
        self.on_disk = 0  # entries read from the folder's file when it was opened (older than this process)
        self.counter = ChangeCounter(self)
        self._manifests: dict[str, tuple[list, str]] = {}  # fingerprint -> (rows, title), until there is a folder
        self._via: str | None = None
        self._lock = threading.RLock()

    # ---------------- the folder
    def use(self, folder: Path | None) -> None:
        """The session's folder (named, moved, reopened): read its log, or write ours into it."""
        with self._lock:
            if folder is None or folder == self.folder:
                return
            self.folder = Path(folder)
            file = self.folder / LOG
            if file.exists() and not self.entries:  # a reopened session
                self.header, self.entries = read_log(file)
                self.on_disk = len(self.entries)
                if not file.read_bytes().endswith(b"\n"):  # a kill mid-append: the next line must not join it
                    self._rewrite()
            else:
                if not self.entries and (self.folder / "checkpoints").is_dir():
                    self.header = {**self.header, "complete": False}  # a session older than the change log
                self._rewrite()
            for fp, (rows, title) in list(self._manifests.items()):
                self._write_manifest(fp, rows, title)

    def manifest_path(self, fingerprint: str) -> Path | None:
        return self.folder / "manifests" / f"{fingerprint[:16]}.tsv" if self.folder else None

    def add_manifest(self, fingerprint: str, rows: list, title: str) -> None:
        with self._lock:
            if self.folder is None:
                self._manifests[fingerprint] = (rows, title)
            else:
                self._write_manifest(fingerprint, rows, title)

    def _write_manifest(self, fingerprint: str, rows: list, title: str) -> None:
        from ..engine.store.digests import write_manifest

        if self._writes():
            write_manifest(self.manifest_path(fingerprint), rows, title)
        self._manifests.pop(fingerprint, None)

    # ---------------- recording
    def position(self) -> tuple[int, int, int]:
        """(step, completed epochs, batches into the next) of the session's weights now (a new run's carried start
        included: the session answers it)."""
        return self._position()

    def record(self, kind: str, cmd: str, at: tuple[int, int, int] | None = None, **detail) -> dict:
        """Log a change that has just been applied; `at` is the position it applied at (default: now)."""
        step, epoch, batch = at or self.position()
        entry = {"n": 0, "kind": kind, "cmd": cmd, "step": step, "epoch": epoch, "batch": batch, "time": _now(),
                 **detail}
        if self._via:
            entry["via"] = self._via
        with self._lock:
            entry["n"] = len(self.entries) + 1
            self.entries.append(entry)
            self._append(entry)
        return entry

    def record_load(self, at, name: str, pretrained: bool, weights: str, classes: int | None, built, spec,
                    seed: int) -> dict:
        """`load` has built `built` from `spec`, initialised with `seed`: the command as a replay types it (absolute
        paths), the weights file's and the model file's checksums, and a digest of the weights it produced."""
        from ..engine.store.digests import file_sha256, weights_digest

        detail: dict[str, Any] = {"model": spec.to_dict(), "digest": weights_digest(built.module), "init_seed": seed}
        if ".py" in name and ":" in built.full_name:  # the user's own file.py:factory
            name = built.full_name
            code = name.rpartition(":")[0]
            detail.update(code=code, code_sha256=file_sha256(code))
        cmd = f"load {shlex.quote(name)}" + (" --pretrained" if pretrained else "")
        if weights:
            path = str(Path(weights).expanduser().resolve())
            detail.update(weights=path, weights_sha256=file_sha256(path))
            cmd += f" --weights {shlex.quote(path)}"
        if classes is not None:
            cmd += f" --classes {classes}"
        return self.record("load", cmd, at=at, **detail)

    def record_data(self, at, splits, root: str, split: float, size: int, check: bool, kept_position: bool,
                    rebuilt=None, seed: int = 0, exclusion: dict | None = None) -> dict:
        """`data` has attached `splits` from `root`: the command, and the fingerprint of every file it found (the
        per-file manifest goes to manifests/, so a replay can name the file that changed). `rebuilt`: the model whose
        head was re-initialised (with `seed`) for the data's classes, if it was. With `exclusion` (`data --exclude`):
        the list's file and SHA-256 (a replay checks it) and the names it left out."""
        from ..engine.store.digests import data_manifest, manifest_digest, weights_digest

        rows = data_manifest(root, data_files(splits))
        fingerprint = manifest_digest(rows)
        cmd = f"data {shlex.quote(root)} --split {split!r} --size {size}" + (" --check" if check else "")
        if exclusion:
            cmd += f" --exclude {shlex.quote(exclusion['file'])}"
        self.add_manifest(fingerprint, rows, cmd)
        detail: dict[str, Any] = {"path": root, "split": split, "size": size, "fingerprint": fingerprint,
                                  "files": len(rows)}
        if exclusion:
            detail.update(exclude=exclusion["file"], exclude_sha256=exclusion["sha256"], excluded=exclusion["paths"])
        if kept_position:  # a reopened session whose data was missing: its weights and position carry on
            detail["kept_position"] = True
        if rebuilt is not None:  # a new head for another number of classes, initialised from the seed in force
            detail.update(init_seed=seed, digest=weights_digest(rebuilt.module))
        return self.record("data", cmd, at=at, **detail)

    def hold(self, kind: str, cmd: str, **detail) -> None:
        """A change that applies when training next starts (a non-live setting changed mid-run)."""
        with self._lock:
            self.pending.append({"kind": kind, "cmd": cmd, **detail, **({"via": self._via} if self._via else {})})

    def flush_pending(self) -> None:
        """Training (re)starts here: the held changes apply now, at this position."""
        with self._lock:
            held, self.pending = self.pending, []
            for p in held:
                via = p.pop("via", None)
                with self.via(via) if via else contextlib.nullcontext():
                    self.record(p.pop("kind"), p.pop("cmd"), **p)

    @contextlib.contextmanager
    def via(self, what: str):
        """Mark the changes made inside as made by `what` (`tune apply 3`, `lrfind apply valley`)."""
        outer, self._via = self._via, what
        try:
            yield
        finally:
            self._via = outer

    def rewind(self, count: int) -> None:
        """A checkpoint written after `count` changes was restored: drop the changes logged after it by an older
        process (a kill before the next checkpoint); this process's own are kept."""
        with self._lock:
            # a fork's own line is written with its folder, after the checkpoint it starts from: it stays; so does
            # a soup's, whose file is written beside the checkpoints and changes nothing of the run
            later = [e for e in self.entries[count:self.on_disk] if e["kind"] not in ("fork", "soup")]
            if not later:
                return
            dropped = len(later)
            self.entries = [e for e in self.entries[:self.on_disk] if e not in later] + self.entries[self.on_disk:]
            for i, e in enumerate(self.entries, 1):
                e["n"] = i
            self.on_disk -= dropped
            self._rewrite()
        self._notify(f"dropped {dropped} change-log entr{'y' if dropped == 1 else 'ies'} written after the "
                            "checkpoint")

    def init_step(self) -> int:
        """The step at which the weights now in the model were initialised (`load`, a new head, `set seed` before
        training), 0 if the log did not see it."""
        for e in reversed(self.entries):
            if "init_seed" in e:
                return int(e["step"])
        return 0

    def init_seed(self) -> int | None:
        """The seed that initialised the weights now in the model, if the log saw it."""
        for e in reversed(self.entries):
            if "init_seed" in e:
                return e["init_seed"]
        return None

    # ---------------- the file
    def _append(self, entry: dict) -> None:
        if self.folder is None or not self._writes():
            return
        file = self.folder / LOG
        if not file.exists():
            self._rewrite()
            return
        from ..engine.store.checkpoint import open_append

        with open_append(file) as f:  # a regular file only: a link planted as changes.jsonl is refused
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _rewrite(self) -> None:
        from ..engine.store.checkpoint import atomic_write_bytes

        if self.folder is None or not self._writes():
            return
        lines = [json.dumps(self.header)] + [json.dumps(e) for e in self.entries]
        atomic_write_bytes(self.folder / LOG, ("\n".join(lines) + "\n").encode())


def data_files(splits) -> list[str]:
    """Every file a data folder's training depends on: the images of each split and the files it rejected (fixing a
    bad image changes training too); those `data --exclude` left out too, so the manifest is the folder's."""
    files = [p for p, _ in splits.train + splits.val + (splits.test or []) + getattr(splits, "excluded", [])]
    return files + [p for p, _ in splits.rejected if os.path.isfile(p)]


def read_log(file: Path) -> tuple[dict, list[dict]]:
    """(header, entries) of a changes.jsonl; a torn last line (a kill mid-append) is left out."""
    header: dict = {"kind": "start", "complete": False}
    entries = []
    for line in Path(file).read_text().splitlines():
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(doc, dict):
            continue
        if doc.get("kind") == "start":
            header = doc
        elif isinstance(doc.get("cmd"), str) and isinstance(doc.get("step"), int):
            entries.append(doc)
    return header, entries


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")
