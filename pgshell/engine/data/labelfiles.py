"""Data sources that are not class folders: label files (CSV, JSON lines) and Hugging Face `datasets`.

Each reads its source into {split: {class: [sample, ...]}} and hands it to `data.assemble`, the same last step as
`scan_folder`: header checks, classes without training images, the refusals of datasets that cannot train. A sample
of a label file is an image path; a sample of a Hugging Face dataset is a row of one of its Arrow files
(`arrow:FILE#COLUMN[ROW]`, engine/_arrow.py), which `data.load_image` decodes. So training, exact resume, the
quarantine and the caches need nothing else.

Sample order is fixed by the source alone: a label file's images are sorted by path within each class (as a
folder's are), a dataset's rows keep their order. Without a validation split, each class's training samples are
split with `data.split_class`, seeded as folders are — so a label file listing a folder's images gives the very same
splits, batches and metrics as the folder.
"""

from __future__ import annotations

import csv
import io
import json
import os
import unicodedata
from pathlib import Path

from . import _arrow
from .. import data as D
from ..errors import PgError
from ..names import escape

LABEL_SUFFIXES = (".csv", ".jsonl", ".ndjson")
# split names as datasets and label files spell them -> pgshell's
_SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
           "test": "test", "testing": "test"}
_NO_SPLIT = ""  # the key of samples without a split: split into train/val by the fraction
_IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")  # preferred when a dataset has several image columns
_LABEL_COLUMNS = ("label", "labels", "class", "fine_label")


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


# ---------------------------------------------------------------------------------------------------- label files
def scan_label_file(path: str, root: str | None, split: float, seed: int, check: bool,
                    allow_outside: bool = False) -> D.Splits:
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
    return _finish(per_split, str(file), file.name, split, seed, check, rejected)


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
        return _NO_SPLIT
    value = str(row["split"] or "").strip().lower()
    if value not in _SPLITS:
        raise PgError(f"{file} line {line} has split {row['split']!r}: use train, val or test (or leave the split "
                      "column out to split by --split)")
    return _SPLITS[value]


# ---------------------------------------------------------------------------------------------------- the last step
def _finish(per_split: dict[str, dict[str, list[str]]], source: str, short: str, split: float, seed: int,
            check: bool, rejected: list[tuple[str, str]], order: list[str] | None = None,
            columns: str = "") -> D.Splits:
    """Train/val(/test) from the source's splits (a missing val split is split off train by the fraction), then
    `data.assemble`."""
    given = sorted(k for k in per_split if k != _NO_SPLIT)
    if given and _NO_SPLIT in per_split:
        raise PgError(f"{source} mixes rows with and without a split: give every row one")
    train, val, test = per_split.get("train" if given else _NO_SPLIT, {}), per_split.get("val"), per_split.get("test")
    if not train:
        raise PgError(f"{source} has no training images" + (f" (its splits: {', '.join(given)})" if given else "")
                      + ": name some rows' split train")
    if val is None:
        if not 0 < split < 1:
            raise PgError(f"split must be between 0 and 1 (the fraction of each class held out for validation), "
                          f"got {split}: try 0.2")
        pairs = {name: D.split_class(files, split, seed, name) for name, files in train.items()}
        train, val = {n: t for n, (t, _) in pairs.items()}, {n: v for n, (_, v) in pairs.items()}
        layout = f"{short}: split {split:g} seed {seed}" + (" from train, test as given" if test else "")
    else:
        layout = f"{short}: {'/'.join(n for n in ('train', 'val', 'test') if n in per_split)} as given"
    terms = D.Terms(place=lambda split_name, name: f"{short} class '{name}'", empty="no training images",
                     no_images=lambda bad: f"no usable images in {source}" + (
                         f" ({len(bad)} rejected, e.g. {bad[0][0]}: {bad[0][1]})" if bad else ""),
                     one_class=lambda name: (f"{source} needs at least 2 classes to train a classifier, found only "
                                             f"'{name}'"))
    return D.assemble(train, val, test, layout + columns, rejected, check, terms, order)


# ---------------------------------------------------------------------------------------------------- Hugging Face
def scan_hf(spec: str, split: float, seed: int, check: bool) -> D.Splits:
    """`hf:NAME[:CONFIG]` from the local datasets cache (or the Hub when online), or a `save_to_disk` folder: an
    image column (a datasets.Image feature) and a label column (a ClassLabel, or strings/ints)."""
    datasets = _import_datasets()
    loaded, name = _load_hf(datasets, spec)
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {_NO_SPLIT: loaded}
    first = next(iter(parts.values()), None)
    if first is None:
        raise PgError(f"{name} holds no splits: save a DatasetDict with train (and validation) splits")
    image_col, label_col, names = _columns(datasets, first.features, name)
    rejected: list[tuple[str, str]] = []
    per_split: dict[str, dict[str, list[str]]] = {}
    for split_name, ds in parts.items():
        ours = _SPLITS.get(split_name.lower()) if split_name else _NO_SPLIT
        if ours is None or ours in per_split:
            rejected.append((f"{name} split '{split_name}'", "not a train, validation or test split: left out"))
            continue
        per_split[ours] = _rows_by_class(ds, image_col, label_col, names, f"{name} split '{split_name}'", rejected)
    order = list(names) if names is not None else None
    return _finish(per_split, spec, name, split, seed, check, rejected, order,
                   f" (image '{image_col}', label '{label_col}')")


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise PgError("Hugging Face datasets need the datasets package: pip install 'pgshell[datasets]' "
                      "(or pip install datasets)") from None
    # its cache notices and progress bars would print over the shell's prompt; errors still come through
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets


def _load_hf(datasets, spec: str):
    """(Dataset or DatasetDict, a short name for messages) of a hub name or a save_to_disk folder."""
    if not spec.startswith("hf:"):
        try:
            return datasets.load_from_disk(str(Path(spec).expanduser())), Path(spec).name
        except (FileNotFoundError, ValueError, KeyError, OSError) as exc:
            raise PgError(f"{spec} is not a folder datasets' save_to_disk wrote ({exc})") from None
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise PgError("name the dataset: hf:NAME or hf:NAME:CONFIG (e.g. hf:uoft-cs/cifar10)")
    try:
        return datasets.load_dataset(name, config or None), spec
    except (ConnectionError, FileNotFoundError, ValueError, OSError) as exc:
        cache = datasets.config.HF_DATASETS_CACHE
        detail = " ".join(str(exc).split())[:200]
        raise PgError(f"the dataset {name}{' config ' + config if config else ''} is not in the local datasets cache "
                      f"{cache} and cannot be downloaded here ({detail}). Run `python -c \"import datasets; "
                      f"datasets.load_dataset('{name}'{', ' + repr(config) if config else ''})\"` on a machine with "
                      f"internet and copy its cache into {cache}, or attach a folder written by save_to_disk"
                      ) from None


def _columns(datasets, features, name: str) -> tuple[str, str, list[str] | None]:
    """(image column, label column, class names of a ClassLabel, else None)."""
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel)] or [
        c for c, f in features.items() if c.lower() in _LABEL_COLUMNS and isinstance(f, datasets.Value)]
    if not images or not labels:
        raise PgError(f"{name} needs an image column (a datasets.Image feature) and a label column (a ClassLabel); "
                      f"its columns: {', '.join(f'{c} ({type(f).__name__})' for c, f in features.items())}")
    image = next((c for c in images if c.lower() in _IMAGE_COLUMNS), images[0])
    label = next((c for c in labels if c.lower() in _LABEL_COLUMNS), labels[0])
    feature = features[label]
    return image, label, list(feature.names) if isinstance(feature, datasets.ClassLabel) else None


def _rows_by_class(ds, image_col: str, label_col: str, names: list[str] | None, where: str,
                   rejected: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{class: [arrow row samples]} of one split, rows in their order; unlabelled rows (-1, empty) are rejected."""
    if getattr(ds, "_indices", None) is not None:  # a select()/shuffle() view: its rows are not the files' rows
        ds = ds.flatten_indices()
    files = [f["filename"] for f in ds.cache_files]
    if not files:
        raise PgError(f"{where} lives in memory only: save it with save_to_disk and attach that folder")
    by_class: dict[str, list[str]] = {}
    rows = 0
    for file in files:
        for row, value in enumerate(_arrow.column_values(file, label_col)):
            sample = _arrow.row_uri(file, image_col, row)
            label = _class_name(value, names)
            if label is None:
                rejected.append((sample, f"no label ({where})"))
            else:
                by_class.setdefault(label, []).append(sample)
        rows += _arrow.num_rows(file)
    if rows != ds.num_rows:
        raise PgError(f"{where} has {ds.num_rows} rows but its files {rows}: re-save it with save_to_disk")
    return by_class


def _class_name(value, names: list[str] | None) -> str | None:
    if value is None or value == "" or (isinstance(value, int) and value < 0 and names is not None):
        return None
    if names is not None:
        return names[value] if isinstance(value, int) and value < len(names) else None
    return str(value)
