"""Label files (CSV, JSON lines) -> Splits: one row per image with `path` and `label`, optionally `split`; paths
relative to `--root` (default: the file's folder), refused outside it unless allowed.

The rows become {split: {class: [path, ...]}} for folders.assemble_per_split, the same last step as `scan_folder`:
header checks, classes without training images, the refusals of data that cannot train. A label file's images are
sorted by path within each class (as a folder's are); without a validation split each class's training images are
split with `split_class`, seeded as folders are — so a label file listing a folder's images gives the very same
splits, batches and metrics as the folder. Hugging Face datasets are hub.py's.
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from pathlib import Path

from ..errors import PgError
from ..names import escape
from .folders import NO_SPLIT, Splits, assemble_per_split


LABEL_SUFFIXES = (".csv", ".jsonl", ".ndjson")
# split names as datasets and label files spell them -> pgshell's
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
           "test": "test", "testing": "test"}


# ---------------------------------------------------------------------------------------------------- label files
def scan_label_file(path: str, root: str | None, split: float, seed: int, check: bool,
                    allow_outside: bool = False) -> Splits:
    """A CSV (with a header) or JSON-lines file of `path`, `label` and optionally `split` (train, val, test). Paths
    stay inside the root (`../x.png`, absolute paths and links out are refused unless `allow_outside`: a label file
    from elsewhere must not make pgshell open, hash and record /etc/passwd), and labels are printable text."""
    file = Path(path).expanduser().resolve()
    base = Path(root).expanduser().resolve() if root is not None else file.parent
    if not base.is_dir():
        raise PgError(f"--root {base} is not a folder: give the folder the label file's paths start from")
    per_split: dict[str, dict[str, list[str]]] = {}
    rejected: list[tuple[str, str]] = []
    first_line: dict[str, int] = {}
    for line, row in _label_rows(file):
        image, label = str(row.get("path") or "").strip(), str(row.get("label") or "").strip()
        if not image:
            raise PgError(f"{file} line {line} has no path: every row names an image (and its label)")
        full = os.path.normpath(base / os.path.expanduser(image))
        if not allow_outside and not _inside(full, base):
            raise PgError(f"{file} line {line}: {escape(image)[:120]} is outside {base}: a label file's images stay "
                          "under --root (the file's folder by default); `data FILE --allow-outside` if you mean it")
        _check_label(label, file, line)
        if not label:
            rejected.append((full, f"no label ({file.name} line {line})"))
        elif full in first_line:
            rejected.append((full, f"listed again on line {line} of {file.name} (first on line {first_line[full]})"))
        else:
            first_line[full] = line
            per_split.setdefault(_split_of(row, file, line), {}).setdefault(label, []).append(full)
    for classes in per_split.values():
        for files in classes.values():
            files.sort()
    return assemble_per_split(per_split, str(file), file.name, split, seed, check, rejected)


def _inside(path: str, base: Path) -> bool:
    """`path` (normalised), with every link followed, is `base` or under it."""
    real, top = os.path.realpath(path), os.path.realpath(base)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


# control characters make look-alike classes ("cat" and "cat\0") and break lines; bidi controls reorder the text shown
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _check_label(label: str, file: Path, line: int) -> None:
    bad = next((ch for ch in label if unicodedata.category(ch) == "Cc" or ch in _BIDI), None)
    if bad is not None:
        raise PgError(f"{file} line {line}: the label {escape(label)[:60]!r} holds the control character "
                      f"U+{ord(bad):04X}: labels are printable text — fix the file")


def _label_rows(file: Path):
    """(line number, {column: value}) of a label file, column names in lower case."""
    if not file.is_file():
        raise PgError(f"no label file {file}: check the path")
    try:
        text = file.read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark is not a column name
    except (OSError, UnicodeDecodeError) as exc:
        raise PgError(f"cannot read {file} ({exc}): save it as UTF-8 text") from None
    if file.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))  # a quoted newline stays in its cell: refused below
        columns = [str(c).strip().lower() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise PgError(f"{file} needs a header with the columns path and label (and optionally split); it has "
                          f"{', '.join(columns) or 'no header'}")
        for row in reader:
            yield reader.line_num, {str(k).strip().lower(): v for k, v in row.items() if k is not None}
        return
    for number, text_line in enumerate(text.splitlines(), start=1):
        if not text_line.strip():
            continue
        try:
            row = json.loads(text_line)
        except ValueError as exc:
            raise PgError(f"{file} line {number} is not JSON ({exc}): one object per line, "
                          '{"path": "cats/1.jpg", "label": "cat"}') from None
        if not isinstance(row, dict):
            raise PgError(f'{file} line {number} is not an object: write {{"path": "cats/1.jpg", "label": "cat"}}')
        yield number, {str(k).lower(): v for k, v in row.items()}


def _split_of(row: dict, file: Path, line: int) -> str:
    if "split" not in row:
        return NO_SPLIT
    value = str(row["split"] or "").strip().lower()
    if value not in SPLIT_NAMES:
        raise PgError(f"{file} line {line} has split {row['split']!r}: use train, val or test (or leave the split "
                      "column out to split by --split)")
    return SPLIT_NAMES[value]
