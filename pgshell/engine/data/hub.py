"""Hugging Face `datasets` -> Splits: `hf:NAME[:CONFIG]` from the local datasets cache, or a folder `save_to_disk`
wrote. A sample is a row of one of the dataset's Arrow files (`arrow:FILE#COLUMN[ROW]`, _arrow.py), which
images.load_image decodes, so training, exact resume, the quarantine and the caches need nothing else. Rows keep the
dataset's order; without a validation split each class's training rows are split as a folder's images are.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import PgError
from . import _arrow
from .folders import NO_SPLIT, Splits, assemble_per_split
from .labelfiles import SPLIT_NAMES


_IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")  # preferred when a dataset has several image columns
_LABEL_COLUMNS = ("label", "labels", "class", "fine_label")


# ---------------------------------------------------------------------------------------------------- Hugging Face
def scan_hf(spec: str, split: float, seed: int, check: bool) -> Splits:
    """`hf:NAME[:CONFIG]` from the local datasets cache (or the Hub when online), or a `save_to_disk` folder: an
    image column (a datasets.Image feature) and a label column (a ClassLabel, or strings/ints)."""
    datasets = _import_datasets()
    loaded, name = _load_hf(datasets, spec)
    parts = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {NO_SPLIT: loaded}
    first = next(iter(parts.values()), None)
    if first is None:
        raise PgError(f"{name} holds no splits: save a DatasetDict with train (and validation) splits")
    image_col, label_col, names = _columns(datasets, first.features, name)
    rejected: list[tuple[str, str]] = []
    per_split: dict[str, dict[str, list[str]]] = {}
    for split_name, ds in parts.items():
        ours = SPLIT_NAMES.get(split_name.lower()) if split_name else NO_SPLIT
        if ours is None or ours in per_split:
            rejected.append((f"{name} split '{split_name}'", "not a train, validation or test split: left out"))
            continue
        per_split[ours] = _rows_by_class(ds, image_col, label_col, names, f"{name} split '{split_name}'", rejected)
    order = list(names) if names is not None else None
    return assemble_per_split(per_split, spec, name, split, seed, check, rejected, order,
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
