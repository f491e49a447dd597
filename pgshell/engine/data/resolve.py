"""Any data source pgshell reads -> Splits: which reader a path needs (`kind_of`: a class folder, a label file, a
Hugging Face dataset) and `resolve_data`, the one entry point; `data_location`, how a session file records it."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import PgError
from .folders import Splits, scan_folder
from .hub import scan_hf
from .labelfiles import LABEL_SUFFIXES, scan_label_file


def resolve_data(path: str, split: float = 0.2, seed: int = 0, root: str | None = None, check: bool = True,
                 allow_outside: bool = False) -> Splits:
    """Any data source pgshell reads -> Splits, each sample (path or Arrow row, class index):

    - a folder of class folders, or of train/ val/ [test/] class folders: `scan_folder`
    - a label file, .csv or .jsonl (.ndjson): one row per image with `path` and `label`, optionally `split`; paths
      relative to `root` (default: the file's folder)
    - a Hugging Face dataset: `hf:NAME[:CONFIG]` from the local datasets cache, or a folder `save_to_disk` wrote
    Without a validation split, `split` of each class's training images is held out, seeded as for folders.
    """
    kind = kind_of(path)
    if root is not None and kind != "labels":
        raise PgError(f"--root is for label files (.csv, .jsonl): it says where their relative paths start; "
                      f"{path} is not one")
    if kind == "labels":
        return scan_label_file(path, root, split, seed, check, allow_outside)
    if kind == "hf":
        return scan_hf(path, split, seed, check)
    return scan_folder(path, split, seed, check)


def data_location(path: str) -> str:
    """How a session file records a data source: `hf:` names as given, paths absolute."""
    return path if path.startswith("hf:") else os.path.abspath(os.path.expanduser(path))


def kind_of(path: str) -> str:
    """'hf' (a hub name or a save_to_disk folder), 'labels' (a label file) or 'folder' (everything else)."""
    if path.startswith("hf:"):
        return "hf"
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in LABEL_SUFFIXES:
        return "labels"
    if p.is_dir() and ((p / "dataset_dict.json").is_file() or (p / "state.json").is_file()):
        return "hf"
    return "folder"
