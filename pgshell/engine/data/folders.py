"""Image folders -> Splits: a folder of class folders (split by a seeded fraction) or of train/ val/ [test/] class
folders; what every data source shares at the end (`assemble`, `assemble_per_split`: header checks, classes without
training images, the refusals of data that cannot train) and `split_class`, the seeded split of one class. Bad files
are left out with their reason (`Splits.rejected`), never a stop.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from torchvision.datasets.folder import IMG_EXTENSIONS as _TV_EXTENSIONS

from ..errors import PgError
from .images import check_image


# torchvision's list (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp) plus .gif, which PIL reads (first frame).
IMG_EXTENSIONS: tuple[str, ...] = tuple(_TV_EXTENSIONS) + (".gif",)

_TRAIN_DIR, _VAL_DIR, _TEST_DIR = "train", "val", "test"
NO_SPLIT = ""  # the key of samples without a split: split into train/val by the fraction


class ScanError(PgError):
    """A folder with nothing to train on; `rejected` is what the scan left out and why (`data --check` shows it)."""

    def __init__(self, message: str, rejected: list[tuple[str, str]]):
        super().__init__(message)
        self.rejected = rejected


# --------------------------------------------------------------------------------------------------------------
# Scanning a folder into splits
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Splits:
    """What `scan_folder` found: class names, (absolute path, class index) lists per split, and what it left out."""

    classes: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]] | None
    layout: str  # "train/val folders" or "split 0.2 seed 0"
    rejected: list[tuple[str, str]]  # (path, reason): bad files and ignored class folders
    excluded: list[tuple[str, int]] = field(default_factory=list)  # left out by `data --exclude` (still on disk)

    def counts(self) -> list[dict]:
        """One row per class: {"class", "train", "val", "test"}; "test" is None when there is no test split."""
        rows = [{"class": name, "train": 0, "val": 0, "test": None if self.test is None else 0}
                for name in self.classes]
        for split_name, samples in (("train", self.train), ("val", self.val), ("test", self.test or [])):
            for _, label in samples:
                rows[label][split_name] += 1
        return rows


def scan_folder(path: str, split: float = 0.2, seed: int = 0, check: bool = True) -> Splits:
    """Find the classes and images under `path` and split them into train/val(/test).

    Two layouts:
    - `path/train/<class>/`, `path/val/<class>/` and optionally `path/test/<class>/`: used as they are.
    - `path/<class>/`: each class is split on its own (stratified), `split` of its images going to val. The split
      is a shuffle seeded by (seed, class name) of the class's sorted file list, so it is the same on every machine
      and adding a class does not move the images of the others. It is made before the bad files are dropped, so
      `check` never changes which split a good file lands in.

    Files are sorted, hidden files and folders are skipped, and sub-folders inside a class folder are included.
    check=True opens each file's header (no decode) and moves empty, non-image, unreadable and over-sized files to
    `rejected`. Truncated data only shows when decoding; `ImageDataset` reports those during training.
    """
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(root):
        raise PgError(f"no such folder: {root}. Give the folder that holds your class folders (e.g. {root}/cats/*.jpg)")
    if not os.path.isdir(root):
        raise PgError(f"{root} is a file, not a folder. Give the folder that holds your class folders")

    rejected: list[tuple[str, str]] = []
    has_train = os.path.isdir(os.path.join(root, _TRAIN_DIR))
    has_val = os.path.isdir(os.path.join(root, _VAL_DIR))
    if has_train != has_val:
        found, missing = (_TRAIN_DIR, _VAL_DIR) if has_train else (_VAL_DIR, _TRAIN_DIR)
        raise PgError(f"found {root}/{found}/ but no {root}/{missing}/: add {root}/{missing}/<class>/ folders, "
                      f"or point at {root}/{found} alone to split it automatically")

    if has_train:
        layout = "train/val folders"
        train_files = _class_files(os.path.join(root, _TRAIN_DIR), rejected)
        val_files = _class_files(os.path.join(root, _VAL_DIR), rejected)
        test_dir = os.path.join(root, _TEST_DIR)
        test_files = _class_files(test_dir, rejected) if os.path.isdir(test_dir) else None
        for split_name, files in ((_VAL_DIR, val_files), (_TEST_DIR, test_files or {})):
            unknown = sorted(set(files) - set(train_files))
            if unknown:
                raise PgError(f"{root}/{split_name}/ has class folders that {root}/train/ lacks: "
                              f"{', '.join(unknown)}. Add them to train/ (or remove them from {split_name}/)")
    else:
        if not 0 < split < 1:
            raise PgError(f"split must be between 0 and 1 (the fraction of each class held out for validation), "
                          f"got {split}: try 0.2")
        layout = f"split {split:g} seed {seed}"
        all_files = _class_files(root, rejected)
        train_files, val_files, test_files = {}, {}, None
        for name, files in all_files.items():
            train_files[name], val_files[name] = split_class(files, split, seed, name)

    terms = Terms(
        place=lambda split_name, name: (os.path.join(root, name) if split_name == _TRAIN_DIR and not has_train
                                        else os.path.join(root, split_name, name)),
        empty="empty class folder",
        no_images=lambda bad: _nothing_to_train_on(root, bad),
        one_class=lambda name: (f"{root} needs at least 2 classes to train a classifier, found only '{name}': "
                                "add another class folder next to it"))
    return assemble(train_files, val_files, test_files, layout, rejected, check, terms)


@dataclass
class Terms:
    """How a data source names its parts in rejections and errors (a folder path, a label file's class, ...)."""

    place: Callable[[str, str], str]  # (split, class) -> where the class's images of that split are
    empty: str  # why a class without training images is left out
    no_images: Callable[[list], str]  # the error when no class has training images; given what was rejected
    one_class: Callable[[str], str]  # the error when only one class is left


def assemble(train_files: dict[str, list[str]], val_files: dict[str, list[str]],
             test_files: dict[str, list[str]] | None, layout: str, rejected: list[tuple[str, str]], check: bool,
             terms: Terms, order: list[str] | None = None) -> Splits:
    """{class: samples} per split -> Splits: the part every data source shares (labelfiles.py and hub.py use it too).

    check=True opens each sample's header and moves bad ones to `rejected`. Classes come in `order` (default:
    sorted names); a class without training images is noted and left out rather than failing the scan.
    """
    if check:
        bad = {}
        for files in (train_files, val_files, test_files or {}):
            for class_files in files.values():
                for file in class_files:
                    reason = check_image(file)
                    if reason is not None:
                        bad[file] = reason
        rejected.extend(sorted(bad.items()))
        for files in (train_files, val_files, test_files or {}):
            for name in files:
                files[name] = [f for f in files[name] if f not in bad]

    classes = []
    for name in order or sorted(set(train_files) | set(val_files) | set(test_files or {})):
        if train_files.get(name):
            classes.append(name)
            continue
        if name in train_files or order is not None:
            rejected.append((terms.place(_TRAIN_DIR, name), terms.empty))
        for split_name, files in ((_VAL_DIR, val_files), (_TEST_DIR, test_files or {})):
            if files.get(name):
                rejected.append((terms.place(split_name, name),
                                 f"class '{name}' has no training images: its {split_name} images are left out"))
    if not classes:
        raise ScanError(terms.no_images(rejected), rejected)
    if len(classes) < 2:
        raise ScanError(terms.one_class(classes[0]), rejected)

    def samples(files: dict[str, list[str]]) -> list[tuple[str, int]]:
        return [(f, index) for index, name in enumerate(classes) for f in files.get(name, [])]

    return Splits(classes=classes, train=samples(train_files), val=samples(val_files),
                  test=None if test_files is None else samples(test_files), layout=layout, rejected=rejected)


def _nothing_to_train_on(root: str, rejected: list[tuple[str, str]]) -> str:
    """Why `root` gave no class: the layout expected, and where a dataset seems to be when images lie loose."""
    expected = f"expected class folders like {root}/cats/*.jpg, or {root}/train/<class>/ and {root}/val/<class>/"
    loose = sum(reason == "not in a class folder" for _, reason in rejected)
    if not loose:
        return (f"no images found under {root}: {expected}"
                + (f" ({len(rejected)} files or folders rejected: `data PATH --check` lists them)" if rejected else ""))
    parent = os.path.dirname(root)
    with os.scandir(parent) as entries:
        siblings = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith(".") and _has_images(e.path))
    hint = (f"; the parent folder looks like a dataset ({len(siblings)} class folders: {', '.join(siblings[:5])}"
            f"{', ...' if len(siblings) > 5 else ''}): `data {parent}`" if len(siblings) >= 2 else "")
    top = os.path.dirname(parent)  # .../train/ants: the dataset is the folder holding train/ and val/
    if os.path.basename(parent) in (_TRAIN_DIR, _VAL_DIR, _TEST_DIR) and \
            os.path.isdir(os.path.join(top, _TRAIN_DIR)) and os.path.isdir(os.path.join(top, _VAL_DIR)):
        hint = f"; {top} looks like a dataset (train/ and val/ folders of class folders): `data {top}`"
    return f"{root} holds {loose} images but no class folders: {expected}{hint}"


def _has_images(folder: str) -> bool:
    with os.scandir(folder) as entries:
        return any(e.is_file() and _is_image_name(e.name) for e in entries)


def _class_files(folder: str, rejected: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{class name: sorted image paths} for the class folders directly under `folder` (searched recursively).

    Images lying loose in `folder` (outside any class folder) are noted in `rejected`, not silently dropped.
    """
    classes: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            classes[entry.name] = images_under(entry.path)
        elif _is_image_name(entry.name):
            rejected.append((entry.path, "not in a class folder"))
    return classes


def images_under(folder: str) -> list[str]:
    """Every image file under `folder`, recursively, sorted; hidden files and folders skipped, symlink loops cut."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if not f.startswith(".") and _is_image_name(f))
    return sorted(found)


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def split_class(files: list[str], split: float, seed: int, name: str) -> tuple[list[str], list[str]]:
    """(train, val) of one class: round(len * split) to val, at least 1 when the class has 2 or more images."""
    n = len(files)
    n_val = math.floor(n * split + 0.5)  # round half up: Python's round() would send 2.5 to 2
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    shuffled = list(files)
    random.Random(f"{seed}/{name}").shuffle(shuffled)  # a str seed is hashed with sha512: stable everywhere
    held_out = set(shuffled[:n_val])
    # in the given order (a folder's: sorted paths; a dataset's: its rows), so each split lists samples as its source
    return [f for f in files if f not in held_out], [f for f in files if f in held_out]


def assemble_per_split(per_split: dict[str, dict[str, list[str]]], source: str, short: str, split: float, seed: int,
            check: bool, rejected: list[tuple[str, str]], order: list[str] | None = None,
            columns: str = "") -> Splits:
    """Train/val(/test) from the source's splits (a missing val split is split off train by the fraction), then
    `data.assemble`."""
    given = sorted(k for k in per_split if k != NO_SPLIT)
    if given and NO_SPLIT in per_split:
        raise PgError(f"{source} mixes rows with and without a split: give every row one")
    train, val, test = per_split.get("train" if given else NO_SPLIT, {}), per_split.get("val"), per_split.get("test")
    if not train:
        raise PgError(f"{source} has no training images" + (f" (its splits: {', '.join(given)})" if given else "")
                      + ": name some rows' split train")
    if val is None:
        if not 0 < split < 1:
            raise PgError(f"split must be between 0 and 1 (the fraction of each class held out for validation), "
                          f"got {split}: try 0.2")
        pairs = {name: split_class(files, split, seed, name) for name, files in train.items()}
        train, val = {n: t for n, (t, _) in pairs.items()}, {n: v for n, (_, v) in pairs.items()}
        layout = f"{short}: split {split:g} seed {seed}" + (" from train, test as given" if test else "")
    else:
        layout = f"{short}: {'/'.join(n for n in ('train', 'val', 'test') if n in per_split)} as given"
    terms = Terms(place=lambda split_name, name: f"{short} class '{name}'", empty="no training images",
                     no_images=lambda bad: f"no usable images in {source}" + (
                         f" ({len(bad)} rejected, e.g. {bad[0][0]}: {bad[0][1]})" if bad else ""),
                     one_class=lambda name: (f"{source} needs at least 2 classes to train a classifier, found only "
                                             f"'{name}'"))
    return assemble(train, val, test, layout + columns, rejected, check, terms, order)
