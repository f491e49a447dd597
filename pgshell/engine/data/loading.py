"""Samples to batches: `ImageDataset` decodes an image and applies the transform under its sample's seed; `collate`
drops bad images and hands them on as (path, reason) pairs for the trainer to report, so a bad image never stops an
epoch; `make_loader`, the DataLoader with pgshell's workers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from .images import BadImage, load_image
from .sampling import seeded


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
