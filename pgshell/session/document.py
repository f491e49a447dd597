"""The session file, `sessions/NAME.session`: a typed, versioned document (`SessionDoc`, with the data it is bound
to as a `DataBinding`), and reading and writing it — pure functions of a path and a document. `Session.document()`
makes one from the session; `Session.open` assigns what `read_document` returns, in one place (session/core.py).

The JSON keeps the layout of version 1 (`format`, `version`, `name`, `folder`, `model`, `data`, `config`,
`checkpoint`, `id`, `lineage`, `auto_named`, `best`, `target`, `saved`); a field of the wrong type is a hand edit,
reported as a TypeError naming it (Session.open turns it into "damaged or edited by hand").
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..engine.config import TrainConfig
from ..engine.errors import PgError

SESSION_FORMAT = "pgshell-session"
SESSION_VERSION = 1
_IDENTITY = ("classes", "fingerprint", "counts")  # what the data held when bound, beside its path in the file


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


@dataclass
class DataBinding:
    """The data a session trains on: where it is, how it is split and sized, and what it held when it was bound."""

    path: str  # an image folder, a label file or hf:NAME (absolute)
    split: float = 0.2  # the validation fraction, for a folder without val/
    size: int = 0  # image size override (0: the model's own)
    seed: int | None = None  # the seed the split was drawn with (None: the session's)
    root: str | None = None  # where a label file's relative paths start
    keep: bool = False  # `data --keep`: train on the recorded file lists (less the files gone), reopen included
    allow_outside: bool = False  # `data --allow-outside`: a label file's images outside its root, asked for
    identity: dict | None = None  # {"classes", "fingerprint", "counts"} of the files when bound (session/fingerprint.py)
    lists: dict | None = field(default=None, repr=False, compare=False)  # the lists behind `identity`: data-files.json
    exclude: dict | None = None  # `data --exclude FILE`: {"file", "sha256", "paths"}, the names left out

    def where(self) -> dict:
        """The binding as the rest of the session reads it (`Session.data`): path, split, size, seed, root, keep."""
        out: dict[str, Any] = {"path": self.path, "split": self.split, "size": self.size}
        if self.seed is not None:
            out["seed"] = self.seed
        if self.root is not None:
            out["root"] = self.root
        if self.keep:
            out["keep"] = True
        if self.allow_outside:
            out["allow_outside"] = True
        if self.exclude:
            out["exclude"] = self.exclude
        return out

    def to_dict(self) -> dict:
        return {**self.where(), **{k: v for k, v in (self.identity or {}).items() if k in _IDENTITY}}

    @classmethod
    def from_dict(cls, d: Any) -> "DataBinding":
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not isinstance(d.get("split"), (int, float)) \
                or isinstance(d.get("split"), bool):
            raise TypeError(f"'data' should hold a path and a split, not {d!r}"[:200])
        for key, kind in (("size", int), ("seed", int), ("root", str)):
            if d.get(key) is not None and (not isinstance(d[key], kind) or isinstance(d[key], bool)):
                raise TypeError(f"'data' {key} should be {kind.__name__}, not {d[key]!r}"[:200])
        identity = {k: d[k] for k in _IDENTITY if k in d} or None
        return cls(path=d["path"], split=float(d["split"]), size=int(d.get("size") or 0), seed=d.get("seed"),
                   root=d.get("root"), keep=d.get("keep") is True, allow_outside=d.get("allow_outside") is True,
                   identity=identity, exclude=d["exclude"] if isinstance(d.get("exclude"), dict) else None)


@dataclass
class SessionDoc:
    """What a .session file holds."""

    name: str | None = None  # the session's name (its file is NAME.session)
    folder: str | None = None  # its folder beside the file (the name; older files may differ)
    model: dict | None = None  # engine.models.ModelSpec.to_dict(): the model is the one the file names
    data: DataBinding | None = None
    config: TrainConfig = field(default_factory=TrainConfig)  # the settings as they are now (not only trained with)
    checkpoint: str | None = None  # the latest checkpoint, relative to the sessions folder
    id: str | None = None  # who the session is, whatever its name: kept by a rename, new for a copy or a fork
    lineage: str | None = None  # the run its checkpoints belong to (None: a file from before lineages)
    auto_named: bool = False  # named by pgshell: `save NAME` renames its folder instead of copying it
    best: dict | None = None  # {"path", "value", "epoch", "metric"} of the best epoch checkpoint
    target: dict | None = None  # what the paused run trains towards: {"epoch"} or {"step"} (+ finetune's phase)
    saved: str = ""  # when it was written (ISO time)

    def to_dict(self) -> dict:
        return {"format": SESSION_FORMAT, "version": SESSION_VERSION, "name": self.name, "folder": self.folder,
                "model": self.model, "data": self.data.to_dict() if self.data is not None else None,
                "config": self.config.to_dict(), "checkpoint": self.checkpoint, "id": self.id,
                "lineage": self.lineage, "auto_named": self.auto_named, "best": self.best, "target": self.target,
                "saved": self.saved or datetime.now().isoformat(timespec="seconds")}

    @classmethod
    def from_dict(cls, d: dict) -> "SessionDoc":
        """A document from its JSON (format and version checked by `read_document`); a field of the wrong type
        raises TypeError naming it, an unknown setting PgError (engine.config)."""
        if d.get("model") is not None and not isinstance(d["model"], dict):
            raise TypeError(f"'model' should be a model's fields, not {d['model']!r}"[:200])
        lineage, checkpoint = d.get("lineage"), d.get("checkpoint")
        if lineage is not None and not isinstance(lineage, str):
            raise TypeError(f"'lineage' should be text, not {lineage!r}"[:200])
        if checkpoint is not None and not isinstance(checkpoint, str):
            raise TypeError(f"'checkpoint' should be a path, not {checkpoint!r}"[:200])
        best = checked(d.get("best"), "best", {"path": str, "value": (int, float), "epoch": int, "metric": str})
        target = checked(d.get("target"), "target", {"epoch": int, "step": int, "unfreeze_at": int,
                                                     "backbone_lr_scale": (int, float)}, required=False)
        return cls(name=d.get("name"), folder=d.get("folder"), model=d.get("model"),
                   data=DataBinding.from_dict(d["data"]) if d.get("data") else None,
                   config=TrainConfig.from_dict(d.get("config") or {}), checkpoint=checkpoint,
                   id=str(d["id"]) if d.get("id") else None, lineage=lineage, auto_named=d.get("auto_named") is True,
                   best=best, target=target, saved=str(d.get("saved") or ""))

    def replace(self, **changes) -> "SessionDoc":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- the file
def read_raw(file: Path) -> dict:
    """The JSON of a pgshell session file, any version (what `sessions` and `compare` list); PgError saying what is
    wrong when it is missing, unreadable or not a session file."""
    try:
        doc = json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise PgError(f"no session file {file}: check the path (sessions live in sessions/NAME.session)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PgError(f"{file} is not a readable session file ({type(e).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != SESSION_FORMAT:
        raise PgError(f"{file} is not a pgshell session file")
    return doc


def read_document(file: Path) -> SessionDoc:
    """The session file as a SessionDoc: PgError for a missing, unreadable or foreign file or another version;
    TypeError / ValueError / PgError for a field edited by hand."""
    raw = read_raw(file)
    if raw.get("version") != SESSION_VERSION:
        raise PgError(f"{file} has session version {raw.get('version')!r}; this pgshell reads {SESSION_VERSION}")
    return SessionDoc.from_dict(raw)


def folder_of(file: Path, raw: dict | SessionDoc) -> Path:
    """The session's folder beside its file: the document's `folder` (a plain name), else the file's stem."""
    name = str((raw.folder if isinstance(raw, SessionDoc) else raw.get("folder")) or Path(file).stem)
    if "/" in name or "\\" in name or name.startswith("."):
        raise PgError(f"{file}: bad folder name {name!r}")
    return Path(file).parent / name


def write_document(file: Path, doc: SessionDoc) -> None:
    """Write the document atomically (temp file, fsync, rename)."""
    from ..engine.store.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(file), (json.dumps(doc.to_dict(), indent=2) + "\n").encode())
