"""Image folders in, reproducible batches out.

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
import math
import os
import random
import struct
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets.folder import IMG_EXTENSIONS as _TV_EXTENSIONS

from .errors import PgError

# torchvision's list (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp) plus .gif, which PIL reads (first frame).
IMG_EXTENSIONS: tuple[str, ...] = tuple(_TV_EXTENSIONS) + (".gif",)

# We check every image's size against PIL.Image.MAX_IMAGE_PIXELS ourselves and report it as a rejected file or a
# BadImage, so PIL's own DecompressionBombWarning would only repeat that on stderr (and garble the shell's prompt).
# A process-wide filter is used because warnings.catch_warnings() swaps global state and is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_TRAIN_DIR, _VAL_DIR, _TEST_DIR = "train", "val", "test"
_ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white: logos/icons are usually drawn for white pages


class BadImage(Exception):
    """An image that cannot be used; str(exc) is the reason shown to the user ("not an image", "empty file", ...)."""


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
            train_files[name], val_files[name] = _split_class(files, split, seed, name)

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

    # A class needs training images; a class folder without any is noted and left out rather than failing the scan.
    classes = []
    for name in sorted(train_files):
        if train_files[name]:
            classes.append(name)
            continue
        where = os.path.join(root, _TRAIN_DIR, name) if has_train else os.path.join(root, name)
        rejected.append((where, "empty class folder"))
        for split_name, files in ((_VAL_DIR, val_files), (_TEST_DIR, test_files or {})):
            if files.get(name):
                rejected.append((os.path.join(root, split_name, name),
                                 f"class '{name}' has no training images: its {split_name} images are left out"))

    if not classes:
        raise PgError(f"no images found under {root}: expected class folders like {root}/cats/*.jpg, "
                      f"or {root}/train/<class>/ and {root}/val/<class>/"
                      + (f" ({len(rejected)} files or folders rejected: see the scan's rejected list)" if rejected else ""))
    if len(classes) < 2:
        raise PgError(f"{root} needs at least 2 classes to train a classifier, found only '{classes[0]}': "
                      f"add another class folder next to it")

    def samples(files: dict[str, list[str]]) -> list[tuple[str, int]]:
        return [(f, index) for index, name in enumerate(classes) for f in files.get(name, [])]

    return Splits(classes=classes, train=samples(train_files), val=samples(val_files),
                  test=None if test_files is None else samples(test_files), layout=layout, rejected=rejected)


def _class_files(folder: str, rejected: list[tuple[str, str]]) -> dict[str, list[str]]:
    """{class name: sorted image paths} for the class folders directly under `folder` (searched recursively).

    Images lying loose in `folder` (outside any class folder) are noted in `rejected`, not silently dropped.
    """
    classes: dict[str, list[str]] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            classes[entry.name] = _image_files(entry.path)
        elif _is_image_name(entry.name):
            rejected.append((entry.path, "not in a class folder"))
    return classes


def _image_files(folder: str) -> list[str]:
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


def _split_class(files: list[str], split: float, seed: int, name: str) -> tuple[list[str], list[str]]:
    """(train, val) of one class: round(len * split) to val, at least 1 when the class has 2 or more images."""
    n = len(files)
    n_val = math.floor(n * split + 0.5)  # round half up: Python's round() would send 2.5 to 2
    if n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    shuffled = list(files)
    random.Random(f"{seed}/{name}").shuffle(shuffled)  # a str seed is hashed with sha512: stable everywhere
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def check_image(path: str) -> str | None:
    """The reason `path` is not a usable image, from its size and header alone (fast: no decode), else None."""
    try:
        if os.stat(path).st_size == 0:
            return "empty file"
        with Image.open(path) as im:
            return _bomb_reason(im.size)
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
        if os.stat(path).st_size == 0:
            raise BadImage("empty file")
        im = Image.open(path)
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


def build_transform(data_config: dict, train: bool, size: int = 0,
                    augment: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """timm's transform for a model's data config (from timm.data.resolve_model_data_config).

    Training with augment: timm's defaults (random resized crop, horizontal flip, colour jitter 0.4). Evaluation, and
    training without augment: resize + centre crop by crop_pct. size > 0 replaces the model's input size (small, fast
    runs); mean and std always come from the config.
    """
    cfg = {key: data_config[key] for key in _CONFIG_KEYS if key in data_config}
    if size > 0:
        cfg["input_size"] = (3, size, size)
    return create_transform(**cfg, is_training=train and augment)


# --------------------------------------------------------------------------------------------------------------
# Seeds, order and sampling
# --------------------------------------------------------------------------------------------------------------

def _mix(tag: bytes, *numbers: int) -> int:
    """A well-mixed 63-bit int from `numbers` (blake2b; `tag` keeps different uses apart)."""
    digest = hashlib.blake2b(struct.pack(f"<{len(numbers)}q", *numbers), digest_size=8, person=tag).digest()
    return int.from_bytes(digest, "little") >> 1


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
    depends on the index alone (epoch 0), so every evaluation sees identical inputs.
    """

    def __init__(self, n: int, seed: int, epoch: int, start: int = 0, shuffle: bool = True,
                 rank: int = 0, world: int = 1):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in a world of {world}")
        if n < 1:
            raise ValueError("EpochSampler needs at least one sample")
        if not 0 <= start <= n:
            raise ValueError(f"start {start} is outside the epoch's {n} samples")
        self.n, self.seed, self.epoch, self.shuffle = n, seed, epoch, shuffle
        self.rank, self.world = rank, world
        self.start = start - start % world

    def _order(self) -> list[int]:
        order = epoch_permutation(self.n, self.seed, self.epoch) if self.shuffle else list(range(self.n))
        total = math.ceil(self.n / self.world) * self.world
        while len(order) < total:  # wrap, as DistributedSampler does, so every rank gets the same count
            order += order[: total - len(order)]
        return order

    def __iter__(self):
        seed_epoch = self.epoch if self.shuffle else 0
        for index in self._order()[self.start + self.rank:: self.world]:
            yield index, sample_seed(self.seed, seed_epoch, index)

    def __len__(self) -> int:
        total = math.ceil(self.n / self.world) * self.world
        return (total - self.start) // self.world


# --------------------------------------------------------------------------------------------------------------
# Dataset, collate, loader
# --------------------------------------------------------------------------------------------------------------

@contextmanager
def _seeded(seed: int):
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
        with _seeded(seed):
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
