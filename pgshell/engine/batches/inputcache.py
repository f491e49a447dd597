"""The decoded-input cache: every image decoded once into a uint8 array, each batch augmented on the device.

Decoding and augmenting JPEGs with PIL runs at a few hundred images per second per core, far below what a GPU trains
at. So the images are decoded once into a memory-mapped uint8 file in a cache folder (`$PGSHELL_CACHE` or
`~/.cache/pgshell/inputs`), keyed by the file list, their mtimes and sizes and the layout, and every batch is
cropped, flipped, colour-jittered and normalised on the device, in one go:

- training with augmentation: each image is stored with its aspect ratio kept, its short side at the eval
  transform's resize size S (never enlarged; the long side at most 2S), portraits with their axes swapped so one
  padded array holds both orientations, with its extent (h, w) beside it (as FFCV stores them). A batch's
  RandomResizedCrop boxes are drawn over each image's real extent with timm's own scale/ratio semantics (`crop_box`
  follows timm's `get_params`; tests/test_inputcache.py compares the distributions) and cut with one `roi_align`;
  then the flip and the colour jitter (in a random order per image, as torchvision's ColorJitter), every draw from
  the image's sample seed — so data depends only on (seed, epoch, index) and resume stays exact. The parameters
  (scale, ratio, flip probability, jitter ranges, mean, std) are read from timm's training transform itself; a step
  the device cannot do makes the trainer use the DataLoader instead.
- training without augmentation, and evaluation: images are stored exactly as the eval transform crops them (PIL, the
  same decode), so the figures equal the DataLoader's bit for bit.

Whether it is used is decided in engine/batches (`set input_cache`); `budget()` is what the arrays may take.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align
from torchvision.transforms import functional as TF

from ..data.images import BadImage, draft_side, load_image, sample_file
from ..store.checkpoint import atomic_write_bytes
from .interface import BatchSource, DataSpec, Report, data_key, eval_keys, train_sampler

_FORMAT = "pgshell-inputcache-2"  # part of every key: files of another layout are never read


def cache_dir() -> Path:
    return Path(os.environ.get("PGSHELL_CACHE", Path.home() / ".cache" / "pgshell")) / "inputs"


def budget(folder: Path | None = None) -> int:
    """Bytes the decoded arrays may take: half the available memory and half the cache folder's free disk, or
    `$PGSHELL_INPUT_CACHE_MAX` (bytes) when set — how a test (or a user sharing the machine) sets a small limit."""
    if os.environ.get("PGSHELL_INPUT_CACHE_MAX"):
        return int(float(os.environ["PGSHELL_INPUT_CACHE_MAX"]))
    folder = folder or cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(folder).free
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = free_disk
    return min(free_disk, avail) // 2


# ---------------------------------------------------------------- timm's transforms as the device applies them
class Unsupported(Exception):
    """A transform step the device path cannot reproduce; str(exc) names it."""


@dataclass(frozen=True)
class EvalCrop:
    """The eval transform's deterministic PIL steps (resize, centre crop) and its normalisation, from timm."""

    resize: object  # torchvision Resize
    crop: object  # torchvision CenterCrop
    side: int  # the resize's short side S
    size: tuple[int, int]  # the crop (h, w)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def for_spec(spec: DataSpec) -> "EvalCrop":
        steps = {type(t).__name__: t for t in spec.transform(train=False).transforms}
        extra = sorted(set(steps) - {"Resize", "CenterCrop", "MaybeToTensor", "ToTensor", "Normalize"})
        if extra or "Resize" not in steps or "CenterCrop" not in steps:
            raise Unsupported(f"the eval transform has {', '.join(extra) or 'no resize and centre crop'}")
        resize, crop, norm = steps["Resize"], steps["CenterCrop"], steps["Normalize"]
        side = resize.size if isinstance(resize.size, int) else min(resize.size)
        return EvalCrop(resize, crop, int(side), tuple(crop.size), tuple(map(float, norm.mean)),
                        tuple(map(float, norm.std)))


@dataclass(frozen=True)
class DeviceAugment:
    """timm's training transform (RandomResizedCrop, flips, colour jitter, normalise), read from the transform."""

    size: tuple[int, int]  # output (h, w)
    scale: tuple[float, float]
    ratio: tuple[float, float]
    interpolation: object  # torchvision InterpolationMode: the resize of each image to the stored side
    flip: tuple[float, float]  # probabilities of the horizontal and the vertical flip
    jitter: tuple  # (brightness, contrast, saturation): each a (low, high) factor range or None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    side: int  # the short side images are stored at (the eval transform's resize size)

    @staticmethod
    def for_spec(spec: DataSpec) -> "DeviceAugment | None":
        """The training augmentation, or None when augmentation is off (training then uses the eval crops)."""
        side = EvalCrop.for_spec(spec).side  # raises Unsupported for an eval transform we cannot store
        if not spec.cfg.augment:
            return None
        crop, flip, jitter, norm = None, [0.0, 0.0], (None, None, None), None
        for t in spec.transform(train=True).transforms:
            name = type(t).__name__
            if name in ("RandomResizedCropAndInterpolation", "RandomResizedCrop"):
                crop = t
            elif name in ("RandomHorizontalFlip", "RandomVerticalFlip"):
                flip[name == "RandomVerticalFlip"] = float(t.p)
            elif name == "ColorJitter":
                if t.hue not in (None, (0, 0), (0.0, 0.0)):
                    raise Unsupported("the training transform jitters hue")
                jitter = (t.brightness, t.contrast, t.saturation)
            elif name == "Normalize":
                norm = t
            elif name not in ("MaybeToTensor", "ToTensor"):
                raise Unsupported(f"the training transform has {name}")
        if crop is None or norm is None:
            raise Unsupported("the training transform has no RandomResizedCrop")
        size = tuple(crop.size) if isinstance(crop.size, (tuple, list)) else (crop.size, crop.size)
        # timm's "random" interpolation picks bilinear or bicubic per crop; the device crops with roi_align either way,
        # and the one resize to the stored side is bicubic
        interp = TF.InterpolationMode.BICUBIC if isinstance(crop.interpolation, (tuple, list)) else crop.interpolation
        return DeviceAugment(size, tuple(crop.scale), tuple(crop.ratio), interp, tuple(flip),
                             tuple(tuple(map(float, j)) if j is not None else None for j in jitter),
                             tuple(map(float, norm.mean)), tuple(map(float, norm.std)), side)

    def draw(self, seed: int, width: int, height: int):
        """One image's augmentation from its sample seed: crop box (x1, y1, x2, y2), flips (horizontal, vertical),
        jitter order, factors."""
        rng = random.Random(seed)
        i, j, h, w = crop_box(rng, width, height, self.scale, self.ratio)
        flips = tuple(rng.random() < p for p in self.flip)
        order = rng.sample(range(3), 3)
        factors = [rng.uniform(*r) if r is not None else 1.0 for r in self.jitter]
        return (j, i, j + w, i + h), flips, order, factors


def crop_box(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop of a width x height image: timm's
    RandomResizedCropAndInterpolation.get_params, step for step, drawing from `rng` instead of the global stream."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target_area * aspect))), int(round(math.sqrt(target_area / aspect)))
        if w <= width and h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: the central crop of the nearest allowed aspect
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_batch(x: torch.Tensor, extents, transposed, seeds: list[int], aug: DeviceAugment) -> torch.Tensor:
    """Random resized crop + flip + colour jitter + normalisation of a batch, on its device.

    x: (B, 3, H, W), uint8 or float in [0, 1]; image b fills [:h_b, :w_b] (extents[b] = (h_b, w_b)), edge-padded
    beyond; transposed[b]: a portrait stored with its axes swapped (its box is drawn in its own orientation)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    b = x.shape[0]
    rows, flips, orders, factors = [], [], [], []
    for k in range(b):
        (h, w), t = (int(v) for v in extents[k]), bool(transposed[k])
        (x1, y1, x2, y2), flip, order, f = aug.draw(seeds[k], h if t else w, w if t else h)
        rows.append([k, y1, x1, y2, x2] if t else [k, x1, y1, x2, y2])
        flips.append(flip)
        orders.append(order)
        factors.append(f)
    boxes = torch.tensor(rows, dtype=x.dtype, device=x.device)
    out = x.new_empty(b, 3, *aug.size)
    for flag in (False, True):
        sel = [k for k in range(b) if bool(transposed[k]) == flag]
        if sel:  # sampling_ratio 0: as many samples per output pixel as the box needs (an area average downscaling)
            size = aug.size[::-1] if flag else aug.size
            r = roi_align(x, boxes[sel], output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
            out[sel] = r.transpose(-1, -2) if flag else r
    flips = torch.tensor(flips, device=x.device)[:, :, None, None, None]
    out = torch.where(flips[:, 0], out.flip(-1), out)
    out = torch.where(flips[:, 1], out.flip(-2), out)
    out = jitter(out, torch.tensor(orders, device=x.device), torch.tensor(factors, dtype=x.dtype, device=x.device))
    return normalise(out, aug.mean, aug.std)


def jitter(x: torch.Tensor, order: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter on tensors (brightness, contrast, saturation), each image in its own order."""
    def blend(a, b, f):
        return (f * a + (1 - f) * b).clamp_(0, 1)

    def grey(a):
        return (0.2989 * a[:, 0] + 0.587 * a[:, 1] + 0.114 * a[:, 2]).unsqueeze(1)

    for k in range(3):
        op = order[:, k].view(-1, 1, 1, 1)
        f = factors.gather(1, order[:, k:k + 1]).view(-1, 1, 1, 1)
        g = grey(x)
        x = torch.where(op == 0, blend(x, torch.zeros_like(x), f),
                        torch.where(op == 1, blend(x, g.mean((1, 2, 3), keepdim=True), f), blend(x, g, f)))
    return x


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """ToTensor's scaling done, Normalize's (x - mean) / std: the same operations as the PIL path."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s)


def plain_batch(u8: torch.Tensor, mean, std) -> torch.Tensor:
    """Stored eval crops: ToTensor + Normalize, bit for bit."""
    return normalise(u8.float().div(255), mean, std)


# ---------------------------------------------------------------- storing
def stored_size(width: int, height: int, side: int, cap: int) -> tuple[int, int]:
    """(short, long) an image is stored at: short side `side` (never enlarged), long side at most `cap`."""
    short, long = min(width, height), max(width, height)
    s = min(1.0, side / short, cap / long)
    return max(1, round(short * s)), max(1, round(long * s))


@dataclass(frozen=True)
class Layout:
    """How one split is stored: eval crops (kind "crop") or aspect kept (kind "aspect", short side `side`)."""

    kind: str
    side: int
    cap: int
    min_side: int  # JPEG draft decoding (data.draft_side): the same decode as the DataLoader
    steps: object  # EvalCrop (crop) or DeviceAugment (aspect)

    def desc(self) -> str:
        s = self.steps
        what = f"{s.resize!r}|{s.crop!r}" if self.kind == "crop" else f"{s.interpolation}"
        return f"{_FORMAT}|{self.kind}|{self.side}|{self.cap}|{self.min_side}|{what}"


class _Decode(torch.utils.data.Dataset):
    """Decode one image for storing: (index, HWC uint8 array, None) or (index, None, (path, reason))."""

    def __init__(self, samples, layout: Layout, sizes):
        self.samples, self.layout, self.sizes = samples, layout, sizes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path = self.samples[i][0]
        try:
            img = load_image(path, self.layout.min_side)
        except BadImage as e:
            return i, None, (path, str(e))
        lay = self.layout
        if lay.kind == "crop":
            img = lay.steps.crop(lay.steps.resize(img))
        else:
            w, h = self.sizes[i]  # the header's size (before draft decoding): what the array was planned for
            short, long = stored_size(w, h, lay.side, lay.cap)
            size = (short, long) if h <= w else (long, short)  # (h, w)
            if (img.height, img.width) != size:
                img = TF.resize(img, list(size), lay.steps.interpolation, antialias=True)
        return i, np.asarray(img, dtype=np.uint8), None


def _first(batch):
    return batch


@dataclass
class Stored:
    array: np.ndarray  # (N, 3, H, W) uint8, memory-mapped
    extents: np.ndarray  # (N, 2) int: (h, w) of each image in the array (landscape orientation)
    transposed: np.ndarray  # (N,) bool: a portrait stored with its axes swapped
    ok: np.ndarray  # (N,) bool: False where the image was bad
    bad: list[tuple[str, str]]
    path: Path


def _key(samples, layout: Layout) -> str:
    h = hashlib.sha256(layout.desc().encode())
    for path, label in samples:
        try:
            st = os.stat(sample_file(path))  # a dataset's row: its table file (the row is in `path`)
            h.update(f"{path}|{st.st_mtime_ns}|{st.st_size}|{label}\n".encode())
        except OSError:
            h.update(f"{path}|missing\n".encode())
    return h.hexdigest()[:32]


@dataclass
class _Plan:
    """One split to store: where, in which layout, and the array's shape (N, 3, H, W) unless it is on disk."""

    samples: list
    layout: Layout
    key: str
    folder: Path
    shape: tuple | None = None
    sizes: list | None = None

    @property
    def files(self) -> tuple[Path, Path]:
        return self.folder / f"{self.key}.u8", self.folder / f"{self.key}.npz"

    def on_disk(self) -> bool:
        return all(f.exists() for f in self.files)

    def estimate(self) -> int:
        """A lower bound of the bytes (squares of the short side), known before reading any header."""
        if self.on_disk():
            return self.measure()
        return len(self.samples) * 3 * _square(self.layout)

    def measure(self) -> int:
        """The exact bytes: the aspect layout reads every file's header for its size (an array on disk: its own)."""
        n, lay = len(self.samples), self.layout
        if self.on_disk():
            return int(np.prod(np.load(self.files[1])["shape"]))
        if lay.kind == "crop":
            self.shape = (n, 3, *lay.steps.size)
        else:
            self.sizes = [_header_size(p) for p, _ in self.samples]
            dims = [stored_size(w, h, lay.side, lay.cap) for w, h in self.sizes if w and h] or [(1, 1)]
            self.shape = (n, 3, max(s for s, _ in dims), max(g for _, g in dims))
        return int(np.prod(self.shape))


def _square(layout: Layout) -> int:
    return int(np.prod(layout.steps.size)) if layout.kind == "crop" else layout.side ** 2


def _header_size(path: str) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # a bad file: decoding reports it
        return 0, 0


def _load(plan: _Plan) -> Stored:
    data_path, meta_path = plan.files
    meta = np.load(meta_path)
    arr = np.memmap(data_path, dtype=np.uint8, mode="r", shape=tuple(meta["shape"]))
    return Stored(arr, meta["extents"], meta["transposed"], meta["ok"],
                  [tuple(b) for b in json.loads(str(meta["bad"]))], data_path)


def _write(plan: _Plan, workers: int, report: Report) -> Stored:
    """Decode the split once into the memory-mapped array (written to a temporary name, then renamed)."""
    data_path, meta_path = plan.files
    n = len(plan.samples)
    tmp = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
    arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=plan.shape)
    extents, transposed = np.zeros((n, 2), np.int32), np.zeros(n, bool)
    ok, bad = np.zeros(n, bool), []
    loader = torch.utils.data.DataLoader(_Decode(plan.samples, plan.layout, plan.sizes), batch_size=32,
                                         num_workers=workers, collate_fn=_first,
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    done = 0
    for batch in loader:
        for i, hwc, problem in batch:
            if problem is not None:
                bad.append(problem)
                continue
            extents[i], transposed[i] = _put(arr, i, hwc, plan.layout.kind == "aspect")
            ok[i] = True
        done += len(batch)
        report.phase("decoding images", done, n)
    arr.flush()
    del arr
    os.replace(tmp, data_path)
    buf = io.BytesIO()
    np.savez(buf, shape=np.array(plan.shape), extents=extents, transposed=transposed, ok=ok,
             bad=np.array(json.dumps(bad)))
    atomic_write_bytes(meta_path, buf.getvalue())
    return _load(plan)


def _put(arr: np.ndarray, i: int, hwc: np.ndarray, turn: bool) -> tuple[tuple[int, int], bool]:
    """Store one image at row i: CHW, a portrait with its axes swapped (when `turn`), edge-padded so a crop's
    bilinear samples at the border never blend in zeros. Returns its extent (h, w) and whether it was transposed."""
    chw = hwc.transpose(2, 0, 1)
    flip = turn and chw.shape[1] > chw.shape[2]
    if flip:
        chw = chw.transpose(0, 2, 1)
    _, h, w = chw.shape
    arr[i, :, :h, :w] = chw
    arr[i, :, :h, w:] = chw[:, :, -1:]
    arr[i, :, h:, :] = arr[i, :, h - 1:h, :]
    return (h, w), flip


# ---------------------------------------------------------------- the source
class CacheSource(BatchSource):
    """Batches from the decoded arrays: the training split (aspect kept, or eval crops) and the eval splits."""

    kind = "input cache"

    def __init__(self, spec: DataSpec, aug: DeviceAugment | None, stores: dict[str, Stored]):
        self.spec, self.aug, self.stores = spec, aug, stores
        self.key = CacheSource.key_of(spec)
        self.eval = EvalCrop.for_spec(spec)

    @staticmethod
    def key_of(spec: DataSpec) -> tuple:
        return data_key(spec) + (str(spec.runtime.device),)

    def valid_for(self, spec: DataSpec) -> bool:
        return CacheSource.key_of(spec) == self.key

    @staticmethod
    def layouts(spec: DataSpec, aug: DeviceAugment | None) -> dict[str, Layout]:
        crop, min_side = EvalCrop.for_spec(spec), draft_side(spec.crop)
        eval_layout = Layout("crop", crop.side, crop.side, min_side, crop)
        out = {"train": Layout("aspect", aug.side, 2 * aug.side, min_side, aug) if aug else eval_layout}
        out.update({s: eval_layout for s in ("val", "test") if spec.samples(s)})
        return out

    @staticmethod
    def build(spec: DataSpec, aug: DeviceAugment | None, limit: int, report: Report) -> "CacheSource | None":
        """Load the splits' arrays from disk or decode them once; None (with a note) if they would not fit `limit`."""
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        plans = {s: _Plan(spec.samples(s), lay, _key(spec.samples(s), lay), folder)
                 for s, lay in CacheSource.layouts(spec, aug).items()}
        n = len(spec.splits.train)
        need = sum(p.estimate() for p in plans.values())
        if need <= limit:
            need = sum(p.measure() for p in plans.values())
        if need > limit:
            report.notify(f"input cache: {n} training images would take {need / 2**20:.1f} MiB, over the "
                          f"{limit / 2**20:.1f} MiB allowed (half the free memory and disk, or "
                          "$PGSHELL_INPUT_CACHE_MAX)")
            return None
        stores = {}
        for split, plan in plans.items():
            if plan.on_disk():
                stores[split] = _load(plan)
                continue
            stores[split] = _write(plan, spec.cfg.workers, report)
            report.notify(f"input cache: decoded {len(plan.samples)} images once into {plan.files[0]} "
                          f"({int(np.prod(plan.shape)) / 2**20:.1f} MiB)")
        if stores["train"].bad:
            report.bad(stores["train"].bad)
        return CacheSource(spec, aug, stores)

    def train_batches(self, epoch, start, rank, world, batch_size):
        keys = list(train_sampler(self.spec, epoch, start, rank, world))
        yield from self._batches("train", keys, batch_size // world, self.aug, world)

    def eval_batches(self, split, batch_size):
        keys = eval_keys(len(self.spec.samples(split)), self.spec.cfg.seed)
        for x, y, _, bad in self._batches(split, keys, batch_size, None, 1):
            yield x, y, bad

    def _batches(self, split: str, keys: list, share: int, aug: DeviceAugment | None, world: int):
        """(x on the device, y, samples consumed, bad): images read from the array, augmented or just normalised.
        Bad images were reported when the array was built; they are skipped (the position still advances).

        The rows are gathered from the memory-mapped array by the DataLoader's workers (into pinned memory on a
        GPU), so the next batches are read while the device trains on this one."""
        stored, samples, dev = self.stores[split], self.spec.samples(split), self.spec.runtime.device
        chunks = [keys[b: b + share] for b in range(0, len(keys), share)]
        loader = torch.utils.data.DataLoader(_Rows(stored), sampler=chunks, batch_size=None,
                                             num_workers=self.spec.cfg.workers, pin_memory=dev.type == "cuda",
                                             generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        for chunk, (u8, rows) in zip(chunks, loader):
            if not rows:
                yield None, None, len(chunk) * world, []
                continue
            idx = [i for i, _ in rows]
            u8 = u8.to(dev, non_blocking=True)
            if aug is None:
                x = plain_batch(u8, self.eval.mean, self.eval.std)
            else:
                x = augment_batch(u8, stored.extents[idx], stored.transposed[idx], [s for _, s in rows], aug)
            yield x, torch.tensor([samples[i][1] for i in idx], device=dev), len(chunk) * world, []


class _Rows(torch.utils.data.Dataset):
    """A chunk of (index, seed) keys -> (the good rows of the array as one uint8 tensor, their keys)."""

    def __init__(self, stored: Stored):
        self.stored = stored

    def __getitem__(self, chunk):
        rows = [(i, s) for i, s in chunk if self.stored.ok[i]]
        if not rows:
            return torch.empty(0, dtype=torch.uint8), rows
        return torch.from_numpy(self.stored.array[[i for i, _ in rows]]), rows


def to_image(arr: np.ndarray) -> Image.Image:  # for debugging and tests
    return Image.fromarray(arr.transpose(1, 2, 0))
