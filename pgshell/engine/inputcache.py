"""The decoded-image cache and batched GPU augmentation: the input pipeline that keeps a GPU busy.

Decoding and augmenting JPEGs with PIL runs at a few hundred images per second per core, far below what a GPU trains
at. So the images are decoded once into a uint8 array at training resolution — a memory-mapped file in a cache
folder (`$PGSHELL_CACHE` or `~/.cache/pgshell/inputs`), keyed by the file list, their mtimes and sizes and the
resolution — and every batch is cropped, flipped, colour-jittered and normalised on the device, in one go:

- augment on: images are stored at the eval transform's resize size S (e.g. 256 for 224) as S x S centre squares;
  a RandomResizedCrop (timm's scale and ratio ranges) is one `roi_align` over the batch, then a flip and a
  brightness/contrast/saturation jitter, each drawn per image from the image's sample seed — so data still depends
  only on (seed, epoch, index) and resume stays exact.
- augment off, and validation: images are stored exactly as the eval transform crops them (size x size), so the
  figures equal the PIL path's (tests/test_engine.py::test_input_cache_equals_pil_path).

`set input_cache auto` uses it on a GPU; `on` forces it (CPU too), `off` keeps the DataLoader. It falls back to the
DataLoader when the array would not fit (more than half the free memory or disk).
"""

from __future__ import annotations

import hashlib
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

from . import data as D
from .checkpoint import atomic_write_bytes


def cache_dir() -> Path:
    return Path(os.environ.get("PGSHELL_CACHE", Path.home() / ".cache" / "pgshell")) / "inputs"


@dataclass
class Stored:
    array: np.ndarray  # (N, 3, S, S) uint8, memory-mapped
    ok: torch.Tensor  # (N,) bool
    bad: list[tuple[str, str]]
    path: Path


class _Decode(torch.utils.data.Dataset):
    """Decode + resize + centre crop to uint8 CHW (the deterministic part of the eval transform)."""

    def __init__(self, samples, resize, crop):
        self.samples, self.resize, self.crop = samples, resize, crop

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path = self.samples[i][0]
        try:
            img = self.crop(self.resize(D.load_image(path)))
            return torch.from_numpy(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()), i, None
        except D.BadImage as e:
            return None, i, (path, str(e))


def _collate(batch):
    return batch


def _key(samples, side: int, resize_desc: str) -> str:
    h = hashlib.sha256(f"{side}|{resize_desc}".encode())
    for path, label in samples:
        try:
            st = os.stat(D.sample_file(path))  # a dataset's row: its table file (the row is in `path`)
            h.update(f"{path}|{st.st_mtime_ns}|{st.st_size}|{label}\n".encode())
        except OSError:
            h.update(f"{path}|missing\n".encode())
    return h.hexdigest()[:32]


def fits(n: int, side: int, folder: Path) -> bool:
    """The array must fit in half the free disk of the cache folder and half the available memory."""
    need = n * 3 * side * side
    folder.mkdir(parents=True, exist_ok=True)
    free_disk = shutil.disk_usage(folder).free
    try:
        avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        avail = free_disk
    return need < free_disk // 2 and need < avail // 2


def build(samples, side: int, resize, crop, resize_desc: str, workers: int, note=None) -> Stored | None:
    """Decode `samples` once into a memory-mapped uint8 array (or reuse the one on disk); None if it won't fit."""
    folder = cache_dir()
    key = _key(samples, side, resize_desc)
    data_path, meta_path = folder / f"{key}.u8", folder / f"{key}.json"
    n = len(samples)
    if meta_path.exists() and data_path.exists():
        meta = json.loads(meta_path.read_text())
        arr = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(n, 3, side, side))
        ok = torch.tensor(meta["ok"], dtype=torch.bool)
        return Stored(arr, ok, [tuple(b) for b in meta["bad"]], data_path)
    if not fits(n, side, folder):
        if note:
            note(f"input cache: {n} images at {side}px would not fit in memory/disk; using the DataLoader")
        return None
    tmp = data_path.with_name(f".{data_path.name}.{os.getpid()}.tmp")
    arr = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(n, 3, side, side))
    ok = [False] * n
    bad: list[tuple[str, str]] = []
    loader = torch.utils.data.DataLoader(_Decode(samples, resize, crop), batch_size=64, num_workers=workers,
                                         collate_fn=_collate)
    for batch in loader:
        for tensor, i, problem in batch:
            if problem is None:
                arr[i] = tensor.numpy()
                ok[i] = True
            else:
                bad.append(problem)
    arr.flush()
    del arr
    os.replace(tmp, data_path)
    atomic_write_bytes(meta_path, json.dumps({"n": n, "side": side, "ok": ok, "bad": bad}).encode())
    if note:
        note(f"input cache: decoded {n} images once into {data_path} ({n * 3 * side * side / 2**20:.0f} MiB)")
    arr = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(n, 3, side, side))
    return Stored(arr, torch.tensor(ok, dtype=torch.bool), bad, data_path)


def crop_box(seed: int, side: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[float, float, float, float]:
    """RandomResizedCrop's box (x1, y1, x2, y2) for one image, drawn from its sample seed (torchvision's method)."""
    rng = random.Random(seed)
    area = side * side
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        r = math.exp(rng.uniform(*log_r))
        w, h = round(math.sqrt(target * r)), round(math.sqrt(target / r))
        if 0 < w <= side and 0 < h <= side:
            x, y = rng.randint(0, side - w), rng.randint(0, side - h)
            return x, y, x + w, y + h
    return 0.0, 0.0, float(side), float(side)


def jitter_factors(seed: int, strength: float = 0.4) -> tuple[float, float, float, bool]:
    """Per-image brightness, contrast, saturation factors and the flip coin."""
    rng = random.Random(seed ^ 0x5DEECE66D)
    lo, hi = 1 - strength, 1 + strength
    return rng.uniform(lo, hi), rng.uniform(lo, hi), rng.uniform(lo, hi), rng.random() < 0.5


def augment_batch(u8: torch.Tensor, seeds: list[int], size: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Random resized crop + flip + colour jitter + normalisation of a uint8 batch, on its device."""
    from torchvision.ops import roi_align

    b, _, side, _ = u8.shape
    x = u8.float().div(255)
    boxes = torch.tensor([[i, *crop_box(s, side)] for i, s in enumerate(seeds)], dtype=x.dtype, device=x.device)
    x = roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    f = torch.tensor([jitter_factors(s)[:3] for s in seeds], dtype=x.dtype, device=x.device)
    flip = torch.tensor([jitter_factors(s)[3] for s in seeds], device=x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    x = (x * f[:, 0, None, None, None]).clamp_(0, 1)  # brightness
    grey = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    x = ((x - grey.mean((2, 3), keepdim=True)) * f[:, 1, None, None, None] + grey.mean((2, 3), keepdim=True)).clamp_(0, 1)
    x = ((x - grey) * f[:, 2, None, None, None] + grey).clamp_(0, 1)  # saturation
    return x.sub_(mean).div_(std)


def plain_batch(u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Stored eval crops: just ToTensor + Normalize, the same operations as the PIL path."""
    return u8.float().div(255).sub_(mean).div_(std)


def eval_steps(data_config: dict, size: int):
    """The eval transform's deterministic PIL steps (resize, centre crop) and its resize size, from timm."""
    tf = D.build_transform(data_config, train=False, size=size)
    steps = list(getattr(tf, "transforms", []))
    resize = next(t for t in steps if t.__class__.__name__.startswith("Resize"))
    crop = next(t for t in steps if t.__class__.__name__ == "CenterCrop")
    rs = resize.size if isinstance(resize.size, int) else max(resize.size)
    norm = next(t for t in steps if t.__class__.__name__ == "Normalize")
    mean, std = (torch.as_tensor(v, dtype=torch.float32).clone().view(1, 3, 1, 1) for v in (norm.mean, norm.std))
    return resize, crop, int(rs), mean, std


def to_image(arr: np.ndarray) -> Image.Image:  # for debugging and tests
    return Image.fromarray(arr.transpose(1, 2, 0))
