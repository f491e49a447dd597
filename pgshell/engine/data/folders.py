"""Image folders (and label files, Hugging Face datasets: engine/_sources.py) in, reproducible batches out.

The contract this module keeps: which images a batch holds, and how each one is augmented, depend only on
(seed, epoch, sample index). Not on the number of loader workers, not on what the process did before. So a run
stopped at any batch and resumed in a fresh process sees bit-identical batches from there on.

How:
- `EpochSampler` draws the epoch's order from its own generator seeded by (seed, epoch), and hands each index to the
  dataset together with a per-sample seed (`sample_seed`).
- `ImageDataset` seeds every RNG the transform may touch (torch, python `random`, numpy) from that per-sample seed
  and restores them afterwards, so neither worker processes nor the training thread's RNG history leak in.
- Bad images never stop an epoch: the scan rejects what a header shows, and what only decoding shows (truncated
  data) travels through `collate` as a (path, reason) pair for the trainer to report.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import struct
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS as _TV_EXTENSIONS

from ..errors import PgError

# torchvision's list (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp) plus .gif, which PIL reads (first frame).
IMG_EXTENSIONS: tuple[str, ...] = tuple(_TV_EXTENSIONS) + (".gif",)

# We check every image's size against PIL.Image.MAX_IMAGE_PIXELS ourselves and report it as a rejected file or a
# BadImage, so PIL's own DecompressionBombWarning would only repeat that on stderr (and garble the shell's prompt).
# A process-wide filter is used because warnings.catch_warnings() swaps global state and is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_TRAIN_DIR, _VAL_DIR, _TEST_DIR = "train", "val", "test"
ARROW_PREFIX = "arrow:"  # a sample in a row of an Arrow table: arrow:FILE#COLUMN[ROW] (engine/_arrow.py)
_ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white: logos/icons are usually drawn for white pages


class BadImage(Exception):
    """An image that cannot be used; str(exc) is the reason shown to the user ("not an image", "empty file", ...)."""


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


def resolve_data(path: str, split: float = 0.2, seed: int = 0, root: str | None = None, check: bool = True,
                 allow_outside: bool = False) -> Splits:
    """Any data source pgshell reads -> Splits, each sample (path or Arrow row, class index):

    - a folder of class folders, or of train/ val/ [test/] class folders: `scan_folder`
    - a label file, .csv or .jsonl (.ndjson): one row per image with `path` and `label`, optionally `split`; paths
      relative to `root` (default: the file's folder)
    - a Hugging Face dataset: `hf:NAME[:CONFIG]` from the local datasets cache, or a folder `save_to_disk` wrote
    Without a validation split, `split` of each class's training images is held out, seeded as for folders.
    """
    from . import labelfiles as _sources

    kind = _sources.kind_of(path)
    if root is not None and kind != "labels":
        raise PgError(f"--root is for label files (.csv, .jsonl): it says where their relative paths start; "
                      f"{path} is not one")
    if kind == "labels":
        return _sources.scan_label_file(path, root, split, seed, check, allow_outside)
    if kind == "hf":
        return _sources.scan_hf(path, split, seed, check)
    return scan_folder(path, split, seed, check)


def data_location(path: str) -> str:
    """How a session file records a data source: `hf:` names as given, paths absolute."""
    return path if path.startswith("hf:") else os.path.abspath(os.path.expanduser(path))


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
    """{class: samples} per split -> Splits: the part every data source shares (engine/_sources.py uses it too).

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


def check_image(path: str) -> str | None:
    """The reason `path` is not a usable image, from its size and header alone (fast: no decode), else None."""
    try:
        with Image.open(_source(path)) as im:
            return _bomb_reason(im.size)
    except BadImage as exc:
        return str(exc)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning, under -W error
        return f"decompression bomb ({_pixels_in(exc)} pixels)"
    except UnidentifiedImageError:
        return "not an image"
    except PermissionError:
        return "unreadable (permission denied)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (SyntaxError, ValueError, EOFError) as exc:  # some PIL plugins signal a broken header this way
        return f"corrupt header ({exc})"


def _source(path: str):
    """What PIL opens for a sample: its file, or the bytes in a row of an Arrow table (a Hugging Face dataset's
    sample, `arrow:FILE#COLUMN[ROW]`). BadImage for what is empty or not there; OSError from the file system."""
    if not path.startswith(ARROW_PREFIX):
        if os.stat(path).st_size == 0:
            raise BadImage("empty file")
        return path
    from . import _arrow

    try:
        data, file = _arrow.image_cell(path)
    except FileNotFoundError:
        raise BadImage("file not found (moved or deleted since the scan?)") from None
    except (KeyError, IndexError, ValueError, OSError) as exc:  # pyarrow's errors are ValueErrors and OSErrors
        raise BadImage(f"unreadable row ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") \
            from None
    if data is None:  # a dataset that refers to image files instead of holding their bytes
        if not file:
            raise BadImage("no image in this row")
        return _source(file)
    if not data:
        raise BadImage("empty file")
    return io.BytesIO(data)


def sample_file(path: str) -> str:
    """The file holding a sample's bytes (an Arrow row's table file): what a cache key stats."""
    if path.startswith(ARROW_PREFIX):
        from . import _arrow

        return _arrow.parse(path)[0]
    return path


def find_undecodable(paths) -> list[tuple[str, str]]:
    """(path, reason) for every file that fails a full decode — what check_image's look at the header cannot see
    (truncated data). Slow: every image is decoded; `data --check` asks for it."""
    bad = []
    for path in paths:
        try:
            load_image(path)
        except BadImage as exc:
            bad.append((path, str(exc)))
    return bad


def _bomb_reason(size: tuple[int, int]) -> str | None:
    """PIL warns between MAX_IMAGE_PIXELS and twice that, and only raises beyond; we refuse from the first."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        return f"decompression bomb {width}x{height}"
    return None


def _pixels_in(exc: Exception) -> str:
    """The pixel count from PIL's DecompressionBombError message (PIL raises before it tells us width and height)."""
    words = str(exc).split()
    return next((w.strip("(") for w in words if w.strip("(").isdigit()), "too many")


# --------------------------------------------------------------------------------------------------------------
# Loading one image
# --------------------------------------------------------------------------------------------------------------

DRAFT_FACTOR = 4  # JPEGs are decoded with both sides at least this many times the target size


def draft_side(size: int) -> int:
    """The smallest side a JPEG is decoded at when the pipeline's target is `size` pixels: DRAFT_FACTOR x the target.

    A 3024 px phone photo trained at 64 px needs neither its full decode nor the resize of 9 megapixels: libjpeg
    decodes it at 1/2, 1/4 or 1/8 scale straight from the DCT (PIL's draft mode), several times faster. Keeping 4x the
    target means even timm's smallest random crop (8 % of the area, 0.28 of a side) still has more pixels than the
    output, so what the model sees is a downscale either way. Every image path (the DataLoader, the decoded-input
    cache, the feature pass) decodes with the same rule, so their figures stay identical.
    """
    return DRAFT_FACTOR * size if size > 0 else 0


def load_image(path: str, min_side: int = 0) -> Image.Image:
    """Decode `path` to an 8-bit RGB image, or raise BadImage(reason).

    min_side > 0: a JPEG much larger than that is decoded at a reduced scale (1/2 to 1/8) whose width and height both
    stay >= min_side (PIL's draft mode; see draft_side). Other formats are decoded in full.

    Odd modes are converted so that the picture survives, not just the type:
    - 16-bit ('I;16*') images are scaled 0..65535 -> 0..255: PIL's own convert("RGB") clips them, so most
      pixels would turn white. 32-bit 'I' and float 'F' images: see _to_uint8.
    - anything with transparency (RGBA, LA, 'P' or 'L'/'RGB' with a transparency key) is composited on white.
    - CMYK, YCbCr, 1-bit, grey, palette: PIL's conversion.
    """
    try:
        im = Image.open(_source(path))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning, under -W error
        raise BadImage(f"decompression bomb ({_pixels_in(exc)} pixels)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except PermissionError:
        raise BadImage("unreadable (permission denied)") from None
    except FileNotFoundError:
        raise BadImage("file not found (moved or deleted since the scan?)") from None
    except OSError as exc:
        raise BadImage(f"unreadable ({exc.strerror or exc})") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt header ({exc})") from None

    with im:
        reason = _bomb_reason(im.size)
        if reason:
            raise BadImage(reason)
        try:
            if min_side and im.format == "JPEG" and min(im.size) >= 2 * min_side:
                im.draft(im.mode, (min_side, min_side))
            im.load()
            return _to_rgb(im)
        except OSError as exc:  # "image file is truncated", broken compressed data
            raise BadImage(f"truncated or corrupt ({exc})") from None
        except (SyntaxError, ValueError, EOFError, IndexError) as exc:
            raise BadImage(f"corrupt ({exc})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """A loaded image of any mode -> a new 8-bit RGB image (see load_image for the rules)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Pixel values of a wide mode -> uint8, keeping their meaning where the range is known.

    uint16 ('I;16*'): full range 0..65535. 32-bit 'I' within 0..255: already 8-bit data stored wide; within
    0..65535: 16-bit data (PGM/TIFF often load so). Anything else (float 'F', negative or larger ints): stretched
    from its own min..max, as there is no range to honour.
    """
    low, high = float(values.min()), float(values.max())
    if values.dtype == np.uint16:
        scaled = values / 65535.0
    elif values.dtype.kind in "iu" and low >= 0 and high <= 255:
        scaled = values / 255.0
    elif values.dtype.kind in "iu" and low >= 0 and high <= 65535:
        scaled = values / 65535.0
    elif high > low:
        scaled = (values.astype(np.float64) - low) / (high - low)
    else:
        scaled = np.zeros(values.shape)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------

_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # an identity Normalize: the pipeline keeps its shape
_SMALL_IMAGES = 64  # px: at or below this, timm's ImageNet crops (down to 8% of the area) leave little to learn from
_IMBALANCE = 5.0  # the largest class this many times the smallest: say so at `data`
_TRAIN_POLICY = ("crop_scale", "crop_ratio", "hflip", "vflip", "color_jitter", "auto_augment", "random_erasing",
                 "interpolation")
# The policy settings engine/inputcache.py's device augmentation takes as parameters. None yet: it draws timm's
# default crop (0.08-1, 3/4-4/3), flip (0.5) and jitter (0.4). Its rewrite adds the ones it reads; auto_augment and
# random_erasing are PIL/per-image operations it is not expected to do.
DEVICE_AUGMENT_READS: tuple[str, ...] = ()


def policy_data_config(data_config: dict, policy=None) -> dict:
    """The model's data config (timm's resolve_model_data_config) with the settings' evaluation policy in force:
    `crop_pct`, `interpolation` and `normalize` replace the model's own values unless they say `model` (or 0).

    Evaluation, prediction, export and the decoded-input cache all start from this, so they agree with training."""
    out = dict(data_config)
    if policy is None:
        return out
    if policy.crop_pct > 0:
        out["crop_pct"] = policy.crop_pct
    if policy.interpolation != "model":
        out["interpolation"] = policy.interpolation
    if policy.normalize != "model":
        out["mean"], out["std"] = normalisation(policy.normalize)
    return out


def normalisation(value: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for a `normalize` setting other than `model`: imagenet, none, or MEAN/STD (1 or 3 numbers each)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if value == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if value == "none":
        return _NO_NORMALISATION
    mean, std = ([float(v) for v in part.split(",")] for part in value.split("/"))
    return tuple(mean * (3 // len(mean))), tuple(std * (3 // len(std)))


def train_policy(policy) -> dict:
    """The training augmentation of the settings, as timm's create_transform arguments."""
    return {"scale": (policy.crop_scale, 1.0), "ratio": (1.0 / policy.crop_ratio, policy.crop_ratio),
            "hflip": policy.hflip, "vflip": policy.vflip, "color_jitter": policy.color_jitter or None,
            "auto_augment": None if policy.auto_augment == "none" else policy.auto_augment,
            "re_prob": policy.random_erasing, "re_mode": "pixel"}  # timm train.py's --remode default


def build_transform(data_config: dict, train: bool, size: int = 0, augment: bool = True,
                    policy=None) -> Callable[[Image.Image], torch.Tensor]:
    """timm's transform for a model's data config (from timm.data.resolve_model_data_config) and the settings'
    augmentation policy (`policy`: a TrainConfig; None keeps timm's defaults).

    Training with augment: random resized crop, flips, colour jitter, auto-augment, random erasing as the policy says
    (timm's ImageNet policy by default). Evaluation, and training without augment: resize + centre crop by crop_pct.
    size > 0 replaces the model's input size (small, fast runs).
    """
    config = policy_data_config(data_config, policy)
    cfg = {key: config[key] for key in _CONFIG_KEYS if key in config}
    if size > 0:
        cfg["input_size"] = (3, size, size)
    training = train and augment
    if training and policy is not None:
        cfg.update(train_policy(policy))
    try:
        return create_transform(**cfg, is_training=training)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:  # timm checks auto_augment's sections here
        raise PgError(f"timm cannot build the augmentation (auto_augment {getattr(policy, 'auto_augment', '')!r}: "
                      f"{exc or type(exc).__name__}): try rand-m9-mstd0.5, original or augmix-m5-w4-d2") from None


def eval_transform(data_config: dict, size: int = 0, policy=None) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform: resize and centre crop by the data config with the settings' evaluation policy
    (`crop_pct`, `interpolation`, `normalize`; `policy`: a TrainConfig, None for a config that already has it in
    force). The one place it is built: the epoch-end validation (sources.DataSpec), `eval`, `errors`, `probe`,
    `predict` and `explain` all get it here, so they agree."""
    return build_transform(data_config, train=False, size=size, policy=policy)


def describe_policy(data_config: dict, policy, size: int = 0) -> dict[str, str]:
    """The augmentation in force, in words, for `show`."""
    config = policy_data_config(data_config, policy)
    side = size or config.get("input_size", (3, 224, 224))[-1]
    if not policy.augment:
        train = "none (augment off): resize and centre crop as for evaluation"
    else:
        p = train_policy(policy)
        train = (f"random resized crop to {side}px, area {p['scale'][0]:g}-1, ratio {p['ratio'][0]:.3g}-"
                 f"{p['ratio'][1]:.3g}; hflip {policy.hflip:g}, vflip {policy.vflip:g}")
        if p["auto_augment"] and "3a" not in p["auto_augment"]:
            train += f"; {p['auto_augment']} (timm turns colour jitter off with it)"
        else:
            train += f"; colour jitter {policy.color_jitter:g}"
            train += f"; {p['auto_augment']}" if p["auto_augment"] else ""
        if policy.random_erasing:
            train += f"; random erasing {policy.random_erasing:g}"
    crop_pct = config.get("crop_pct", 0.875)
    return {"training": train,
            "evaluation": f"resize to {math.floor(side / crop_pct)}px ({config.get('interpolation', 'bilinear')}), "
                          f"centre crop {side}px (crop_pct {crop_pct:g})",
            "normalisation": f"mean {_triple(config.get('mean'))} std {_triple(config.get('std'))}"
                             + (f" ({policy.normalize})" if policy.normalize != "model" else " (the model's)")}


def _triple(values) -> str:
    return ",".join(f"{v:.4g}" for v in values or ())


def input_cache_unsupported(policy, reads: tuple[str, ...] | None = None) -> list[str]:
    """The training-policy settings, away from their defaults, that the decoded-input cache's batched device
    augmentation (engine/inputcache.py) does not honour: those it does not take as parameters (`reads`, default
    DEVICE_AUGMENT_READS), and a resize filter other than bilinear (its crops are resampled by roi_align). Evaluation
    settings are honoured through `policy_data_config`. A trainer falls back to the DataLoader, saying so, when this
    is not empty."""
    from ..config import TrainConfig

    reads = DEVICE_AUGMENT_READS if reads is None else reads
    default = TrainConfig()
    out = []
    for name in _TRAIN_POLICY:
        value = getattr(policy, name)
        if name in reads or (name == "interpolation" and value in ("model", "bilinear")):
            continue
        if value != getattr(default, name):
            out.append(name)
    return out


def image_side(samples: list[tuple[str, int]], limit: int = 25) -> int | None:
    """The median shorter side of up to `limit` images spread over `samples`, from their headers (no decoding)."""
    if not samples:
        return None
    step = max(1, len(samples) // limit)
    sides = []
    for path, _ in samples[::step][:limit]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # a bad file is reported elsewhere; here it simply does not count
            continue
    return sorted(sides)[len(sides) // 2] if sides else None


def small_image_hint(splits: Splits, size: int, policy) -> str:
    """A line suggesting a milder policy when the images (or the training size) are at most 64 px and the policy
    still has timm's ImageNet strength; "" otherwise."""
    native = image_side(splits.train)
    side = min(s for s in (native, size or None) if s) if (native or size) else None
    if side is None or side > _SMALL_IMAGES or not policy.augment:
        return ""
    fixes = [f"`set {name} {value:g}`" for name, value, harsher in (
        ("crop_scale", 0.5, policy.crop_scale < 0.5), ("color_jitter", 0, policy.color_jitter > 0.1),
        ("crop_pct", 1.0, policy.crop_pct != 1.0)) if harsher]
    if not fixes:
        return ""
    return (f"the images are small ({side} px): timm's ImageNet policy (crops down to {policy.crop_scale:g} of the "
            f"area, colour jitter {policy.color_jitter:g}, a border cut at evaluation) leaves little to learn from — "
            f"a milder one usually does better here: {', '.join(fixes)}")


def class_counts(samples: list[tuple[str, int]], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for _, label in samples:
        counts[label] += 1
    return counts


def imbalance_warning(splits: Splits) -> str:
    """A line when the largest training class has at least 5x the images of the smallest; "" otherwise."""
    counts = class_counts(splits.train, len(splits.classes))
    if not counts or min(counts) * _IMBALANCE > max(counts):
        return ""
    big, small = counts.index(max(counts)), counts.index(min(counts))
    ratio = f"{max(counts) / min(counts):.1f}x" if min(counts) else "it has none"
    return (f"the classes are imbalanced: {splits.classes[big]!r} has {max(counts)} training images, "
            f"{splits.classes[small]!r} {min(counts)} ({ratio}) — `set class_weights balanced` or "
            f"`set sampler balanced`")


def balanced_sample_weights(samples: list[tuple[str, int]], num_classes: int) -> list[float]:
    """Each sample's weight for a class-balanced draw: 1 / (its class's count), so every class is drawn equally."""
    counts = class_counts(samples, num_classes)
    return [1.0 / counts[label] for _, label in samples]


# --------------------------------------------------------------------------------------------------------------
# Seeds, order and sampling
# --------------------------------------------------------------------------------------------------------------

def _mix(tag: bytes, *numbers: int) -> int:
    """A well-mixed 63-bit int from `numbers` (blake2b; `tag` keeps different uses apart)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(numbers)}q", *numbers), digest_size=8, person=tag).digest()
    return int.from_bytes(digest, "little") >> 1


def derived_seed(purpose: str, *numbers: int) -> int:
    """A seed for one use (`purpose`, at most 16 characters) from integers such as (seed, epoch, sample): the
    recipes' random draws (mixup) are functions of the position, like the data's, so a resumed run repeats them."""
    return _mix(purpose.encode()[:16], *numbers)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation. Hashed, not summed: seed+epoch+index would repeat across epochs."""
    return _mix(b"pgshell-sample", seed, epoch, index)


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The order of epoch `epoch`: a permutation of range(n) from its own generator, untouched by global RNG state."""
    generator = torch.Generator().manual_seed(_mix(b"pgshell-epoch", seed, epoch))
    return torch.randperm(n, generator=generator).tolist()


class EpochSampler(Sampler):
    """Yields (index, sample_seed) for one epoch's permutation from position `start` (in samples), so a resumed run
    continues exactly where it stopped. Sharded for DDP: rank r of world w takes every w-th item of the permutation
    (pad by wrapping so all ranks get the same count, as DistributedSampler does).

    `start` counts samples of the whole job (all ranks together), so a run resumed on a different number of GPUs
    picks up at the same place in the same order. It is rounded down to a multiple of `world` to keep the ranks in
    step (at most world-1 samples are seen twice). shuffle=False (val/test): sequential order, and the sample seed
    depends on the index alone (epoch 0), so every evaluation sees identical inputs. `weights` (one per sample, e.g.
    balanced_sample_weights): the epoch is n draws with replacement in proportion to them (`set sampler balanced`),
    still a function of (seed, epoch), so a resumed epoch continues the same draws.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1, weights: list[float] | None = None):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if n < 1:
            raise ValueError("EpochSampler needs at least one sample")
        if not 0 <= start <= n:
            raise ValueError(f"start {start} is outside the epoch's {n} samples")
        if weights is not None and len(weights) != n:
            raise ValueError(f"{len(weights)} sample weights for {n} samples")
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world = rank, world
        self.start = start - start % world
        self.weights = weights

    def _order(self) -> list[int]:
        if self.weights is not None:  # n draws with replacement, from their own generator seeded by (seed, epoch)
            generator = torch.Generator().manual_seed(derived_seed("pgshell-balance", self.seed, self.epoch))
            order = torch.multinomial(torch.tensor(self.weights, dtype=torch.float64), self.n, replacement=True,
                                      generator=generator).tolist()
        else:
            order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else list(range(self.n))
        total = math.ceil(self.n / self.world) * self.world
        while len(order) < total:  # wrap, as DistributedSampler does, so every rank gets the same count
            order += order[: total - len(order)]
        return order

    def __iter__(self):
        seed_epoch = self.epoch if self.shuffle else 0
        order = self._order()
        for at in range(self.start + self.rank, len(order), self.world):
            index = order[at]
            if self.weights is not None:  # an image drawn twice in an epoch gets two different augmentations
                yield index, derived_seed("pgshell-drawn", self.seed, self.epoch, at)
            else:
                yield index, sample_seed(self.seed, seed_epoch, index)

    def __len__(self) -> int:
        total = math.ceil(self.n / self.world) * self.world
        return (total - self.start) // self.world


# --------------------------------------------------------------------------------------------------------------
# Dataset, collate, loader
# --------------------------------------------------------------------------------------------------------------

@contextmanager
def seeded(seed: int):
    """Seed torch (CPU), python `random` and numpy from `seed`; restore all three on exit.

    Only the CPU generator is seeded (not torch.manual_seed, which would also reseed CUDA and so disturb the
    model's own dropout stream when loading runs in the training thread). Assumes no other thread draws from these
    global generators meanwhile: pgshell trains in one worker thread.
    """
    torch_state, python_state, numpy_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    try:
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


class ImageDataset(Dataset):
    """(path, label) samples -> (tensor, label, None), or (None, label, (path, reason)) for an image that won't load.

    A bad image is returned rather than raised so one broken file cannot end an epoch; `collate` drops it and
    passes the reason on. Keys are (index, sample_seed) pairs from EpochSampler; a plain int means sample seed 0.
    """

    def __init__(self, samples: list[tuple[str, int]], transform: Callable[[Image.Image], torch.Tensor],
                 min_side: int = 0):
        self.samples = samples
        self.transform = transform
        self.min_side = min_side  # JPEGs decoded at reduced scale down to this side (see draft_side)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[index]
        try:
            image = load_image(path, self.min_side)
        except BadImage as exc:
            return None, label, (path, str(exc))
        with seeded(seed):
            return self.transform(image), label, None


def collate(batch) -> tuple[torch.Tensor | None, torch.Tensor | None, list[tuple[str, str]]]:
    """Stack the good samples of a batch: (images, labels, bad), bad listing (path, reason) of those left out.

    When every sample is bad, images and labels are None (there is no shape to give an empty tensor): the trainer
    reports `bad` and skips the batch.
    """
    good = [(tensor, label) for tensor, label, problem in batch if problem is None]
    bad = [problem for _, _, problem in batch if problem is not None]
    if not good:
        return None, None, bad
    images = torch.stack([tensor for tensor, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, bad


def make_loader(dataset: Dataset, sampler: Sampler, batch_size: int, workers: int,
                pin_memory: bool = False) -> DataLoader:
    """A DataLoader over `sampler` with `collate`.

    Worker seeding is irrelevant here (every sample seeds itself), but DataLoader still draws a base seed for its
    workers; it gets a private generator so creating a loader never advances the training thread's global RNG.
    """
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=False, persistent_workers=False,
                      generator=torch.Generator().manual_seed(0))
