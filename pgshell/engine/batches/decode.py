"""Device decode: the input path for data whose decoded array would not fit (ImageNet-scale on one machine).

The DataLoader's workers only read file bytes; the JPEGs of a batch are decoded together on the training device
(`torchvision.io.decode_jpeg` with a list: nvJPEG on a GPU, libjpeg-turbo on a CPU — the same code either way), each
image is resized to the input cache's stored side (aspect kept, antialiased) and the batch goes through the same
augmentation as the cache (`inputcache.augment_batch`: timm's crop boxes over the real extent, flip, jitter, all drawn
from the sample seeds), so the batches are a function of (seed, epoch, index) and resume stays exact. Files that are
not plain JPEGs (PNG, CMYK, 16-bit, ...) and JPEGs whose data ends early are decoded by PIL in the worker, with the
DataLoader's own `load_image`: a truncated file is reported as bad exactly as there.

Evaluation stays on the DataLoader (PIL): its figures are the reference path's, bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from ..data.images import BadImage, check_image, draft_side, load_image
from . import inputcache as IC
from .interface import BatchSource, DataSpec, LoaderSource, train_sampler


class _FileBytes(torch.utils.data.Dataset):
    """(index, seed) -> (index, seed, path, kind, payload): kind "jpeg" with the file's bytes, for an RGB or grey JPEG
    that ends with its end-of-image marker; "pixels" with CHW uint8 decoded by PIL for anything else; "bad" with the
    reason."""

    def __init__(self, samples, min_side: int):
        self.samples, self.min_side = samples, min_side

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key
        path = self.samples[index][0]
        reason = check_image(path)  # the scan's own header checks (empty, not an image, bomb, ...)
        if reason is None:
            with open(path, "rb") as f:
                data = f.read()
            if _plain_jpeg(data):
                return index, seed, path, "jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)
            try:
                img = load_image(path, self.min_side)
                return index, seed, path, "pixels", torch.from_numpy(np.asarray(img).transpose(2, 0, 1).copy())
            except BadImage as e:
                reason = str(e)
        return index, seed, path, "bad", reason


def _plain_jpeg(data: bytes) -> bool:
    if not data.startswith(b"\xff\xd8") or not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        return False
    with Image.open(io.BytesIO(data)) as im:
        return im.format == "JPEG" and im.mode in ("RGB", "L")


def _items(batch):
    return batch


def decode_batch(items: list, device: torch.device) -> tuple[list, list]:
    """([CHW uint8 image on `device` or None], [(path, reason)]) for a batch of _FileBytes items: the JPEGs decoded
    in one call; if that call fails, one by one, so a single corrupt file costs only itself."""
    images: list = [None] * len(items)
    bad = [(path, reason) for _, _, path, kind, reason in items if kind == "bad"]
    jpegs = [k for k, item in enumerate(items) if item[3] == "jpeg"]
    try:
        decoded = decode_jpeg([items[k][4] for k in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
    except RuntimeError:
        decoded = []
        for k in jpegs:
            try:
                decoded.append(decode_jpeg(items[k][4], mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                decoded.append(None)
                bad.append((items[k][2], f"truncated or corrupt ({str(e).splitlines()[0]})"))
    for k, img in zip(jpegs, decoded):
        images[k] = img
    for k, (_, _, _, kind, payload) in enumerate(items):
        if kind == "pixels":
            images[k] = payload.to(device)
    return images, bad


def stage(images: list[torch.Tensor], aug: IC.DeviceAugment) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Images as the input cache stores them, as one padded batch: short side `aug.side` (never enlarged, long side
    at most 2x), portraits with their axes swapped, edge-padded; with their extents and transposed flags."""
    resized, extents, turned = [], [], []
    for img in images:
        h, w = img.shape[-2:]
        short, long = IC.stored_size(w, h, aug.side, 2 * aug.side)
        size = [short, long] if h <= w else [long, short]
        if [h, w] != size:
            img = TF.resize(img, size, aug.interpolation, antialias=True)
        turned.append(h > w)
        resized.append(img.transpose(-1, -2) if h > w else img)
        extents.append(resized[-1].shape[-2:])
    height, width = max(e[0] for e in extents), max(e[1] for e in extents)
    x = resized[0].new_empty(len(resized), 3, height, width)
    for k, img in enumerate(resized):
        h, w = extents[k]
        x[k, :, :h, :w] = img
        x[k, :, :h, w:] = img[:, :, -1:]
        x[k, :, h:, :] = x[k, :, h - 1:h, :]
    return x, np.array([[int(h), int(w)] for h, w in extents]), np.array(turned)


def eval_crops(images: list[torch.Tensor], crop: IC.EvalCrop) -> torch.Tensor:
    """The eval transform's resize and centre crop on the device (training without augmentation)."""
    return torch.stack([TF.center_crop(TF.resize(img, [crop.side], crop.resize.interpolation, antialias=True),
                                       list(crop.size)) for img in images])


class DecodeSource(BatchSource):
    kind = "device decode"

    def __init__(self, spec: DataSpec, aug: IC.DeviceAugment | None, loader: LoaderSource):
        self.spec, self.aug, self.loader = spec, aug, loader
        self.key = IC.CacheSource.key_of(spec)
        self.crop = IC.EvalCrop.for_spec(spec)

    def valid_for(self, spec: DataSpec) -> bool:
        return IC.CacheSource.key_of(spec) == self.key

    def train_batches(self, epoch, start, rank, world, batch_size):
        spec, dev = self.spec, self.spec.runtime.device
        samples = spec.splits.train
        batches = torch.utils.data.BatchSampler(train_sampler(spec, epoch, start, rank, world), batch_size // world,
                                                drop_last=False)
        loader = torch.utils.data.DataLoader(_FileBytes(samples, draft_side(spec.crop)), batch_sampler=batches,
                                             num_workers=spec.cfg.workers, collate_fn=_items,
                                             generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        for items in loader:
            images, bad = decode_batch(items, dev)
            good = [(img, item) for img, item in zip(images, items) if img is not None]
            if not good:
                yield None, None, len(items) * world, bad
                continue
            imgs = [img for img, _ in good]
            if self.aug is None:
                x = IC.plain_batch(eval_crops(imgs, self.crop), self.crop.mean, self.crop.std)
            else:
                x = IC.augment_batch(*stage(imgs, self.aug), [it[1] for _, it in good], self.aug)
            y = torch.tensor([samples[it[0]][1] for _, it in good], device=dev)
            yield x, y, len(items) * world, bad

    def eval_batches(self, split, batch_size):
        yield from self.loader.eval_batches(split, batch_size)
