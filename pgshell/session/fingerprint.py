"""What data a session trains on, so that a change on disk is never a silent relabel.

The session file stores the data's classes and a fingerprint (SHA-256) of its file lists — every (path relative to
the data folder, class) of train, val and test — and the folder keeps the lists themselves in `data-files.json`.
Reopening rescans the folder and compares: the same fingerprint says nothing; another one names what changed
(classes renamed, added or gone; images added, gone, moved between splits) and the session opens with its data
detached until the user chooses: keep the old split's files that still exist (`data --keep`: the run goes on), re-split
the folder as a new run (`data PATH`), or leave it (quit).

Paths are stored relative, so a data folder moved elsewhere and attached again (`data NEWPATH`) is the same data.
Names that are not UTF-8 survive JSON as \\udcXX escapes (os.fsdecode's surrogates), losslessly.
`apply_exclusion` leaves out of the splits the files `data --exclude` listed (session/dataaudit.py reads the list).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path

from ..engine.errors import PgError

FILES_NAME = "data-files.json"
_SPLITS = ("train", "val", "test")


def file_lists(splits, root: str) -> dict:
    """{"classes", "train": [[relative path, class index], ...], "val": ..., "test": ... or None}. Paths are relative
    to `root` (a data folder, or a label file); a dataset's rows (`arrow:...`) are named as they are."""
    def rel(samples):
        return [[_relative(p, root), label] for p, label in samples]

    return {"classes": list(splits.classes), "train": rel(splits.train), "val": rel(splits.val),
            "test": None if splits.test is None else rel(splits.test)}


def _relative(path: str, root: str) -> str:
    if path.startswith("arrow:") or not os.path.isabs(path) or not os.path.isabs(root):
        return path
    return os.path.relpath(path, root)


def absolute(path: str, root: str) -> str:
    """The inverse of the relative names in the lists."""
    if path.startswith("arrow:") or os.path.isabs(path) or not os.path.isabs(root):
        return path
    return os.path.normpath(os.path.join(root, path))


def fingerprint(lists: dict) -> str:
    body = json.dumps([lists["classes"], *(lists.get(k) for k in _SPLITS)], ensure_ascii=True,
                      separators=(",", ":"))
    return hashlib.sha256(body.encode("ascii")).hexdigest()


def identity(lists: dict) -> dict:
    """What the session file keeps of the lists: classes, fingerprint, counts."""
    return {"classes": list(lists["classes"]), "fingerprint": fingerprint(lists),
            "counts": {k: None if lists.get(k) is None else len(lists[k]) for k in _SPLITS}}


def changes(old: dict, new: dict) -> str:
    """One line: what differs between two identities (with the old lists when there are: the images too)."""
    parts = []
    if old["classes"] != new["classes"]:
        gone = [c for c in old["classes"] if c not in new["classes"]]
        added = [c for c in new["classes"] if c not in old["classes"]]
        what = "; ".join(f"{_short(names)} {how}" for names, how in ((gone, "gone"), (added, "new")) if names)
        parts.append(f"classes {_short(old['classes'])} -> {_short(new['classes'])}" + (f" ({what})" if what else
                                                                                          " (another order)"))
    if "train" in old and "train" in new:
        parts += _file_changes(old, new)
    elif old.get("counts") and old["counts"] != new.get("counts"):
        parts.append("images " + ", ".join(f"{k} {old['counts'].get(k)} -> {new['counts'].get(k)}"
                                           for k in _SPLITS if old["counts"].get(k) != new["counts"].get(k)))
    return "; ".join(parts) or "the file lists differ"


def _file_changes(old: dict, new: dict) -> list[str]:
    def where(lists):
        return {p: (split, lists["classes"][label]) for split in _SPLITS for p, label in (lists.get(split) or [])}

    a, b = where(old), where(new)
    parts = []
    added, gone = len(b.keys() - a.keys()), len(a.keys() - b.keys())
    if added:
        parts.append(f"{added} image{'s' * (added != 1)} added")
    if gone:
        parts.append(f"{gone} image{'s' * (gone != 1)} gone")
    both = a.keys() & b.keys()
    moved = Counter((a[p][0], b[p][0]) for p in both if a[p][0] != b[p][0])
    parts += [f"{n} moved from {src} to {dst}" for (src, dst), n in sorted(moved.items())]
    relabelled = sum(1 for p in both if a[p][1] != b[p][1])
    if relabelled:
        parts.append(f"{relabelled} under another class")
    return parts


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n})" if len(names) > n else "")


# ---------------------------------------------------------------- the lists on disk
def write_lists(folder: Path, lists: dict) -> None:
    from ..engine.store.checkpoint import atomic_write_bytes

    atomic_write_bytes(Path(folder) / FILES_NAME, json.dumps(lists, ensure_ascii=True).encode("ascii"))


def read_lists(folder: Path | None) -> dict | None:
    """The lists of `folder`'s data-files.json, or None when there is none (or it is not readable)."""
    if folder is None:
        return None
    try:
        lists = json.loads((Path(folder) / FILES_NAME).read_text())
        for split in _SPLITS:
            for p, label in lists.get(split) or []:
                if not isinstance(p, str) or not 0 <= int(label) < len(lists["classes"]):
                    raise ValueError
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    return lists


def kept_splits(lists: dict, root: str):
    """Splits of the recorded lists' files that still exist under `root`, and how many are gone. `data --keep`."""
    from ..engine import data as D

    gone = 0

    def still(split):
        nonlocal gone
        if lists.get(split) is None:
            return None
        out = []
        for p, label in lists[split]:
            full = absolute(p, root)
            if full.startswith("arrow:") or os.path.isfile(full):  # a dataset's rows stay while its table does
                out.append((full, int(label)))
            else:
                gone += 1
        return out

    train, val, test = still("train"), still("val"), still("test")
    if len({label for _, label in train}) < 2:
        raise PgError(f"too few of the recorded images are left under {root} to keep training on them: "
                      "`data PATH` re-splits the folder as it is now (a new run)")
    return D.Splits(classes=list(lists["classes"]), train=train, val=val, test=test,
                    layout="the recorded file lists (data --keep)", rejected=[]), gone


def apply_exclusion(splits, root: str, paths: list[str]):
    """`splits` without the samples named in `paths` (relative to the data folder); they go to `splits.excluded`.
    Nothing on disk is touched."""
    base = root if os.path.isdir(root) else os.path.dirname(root)
    drop = {absolute(p, base) for p in paths}
    excluded = []

    def keep(samples):
        if samples is None:
            return None
        excluded.extend(sm for sm in samples if sm[0] in drop)
        return [sm for sm in samples if sm[0] not in drop]

    splits.train, splits.val, splits.test = keep(splits.train), keep(splits.val), keep(splits.test)
    splits.excluded = excluded
    if len({label for _, label in splits.train}) < 2:
        raise PgError("the exclusion leaves fewer than 2 classes with training images: check the list")
    return splits
