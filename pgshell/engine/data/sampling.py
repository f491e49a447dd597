"""Reproducible batches: which images a batch holds, and how each one is augmented, depend only on (seed, epoch,
sample index). Not on the number of loader workers, not on what the process did before. So a run stopped at any batch
and resumed in a fresh process sees bit-identical batches from there on.

How:
- `EpochSampler` draws the epoch's order from its own generator seeded by (seed, epoch), and hands each index to the
  dataset together with a per-sample seed (`sample_seed`).
- `ImageDataset` (loading.py) seeds every RNG the transform may touch (torch, python `random`, numpy) from that
  per-sample seed through `seeded`, and restores them afterwards, so neither worker processes nor the training
  thread's RNG history leak in.
Also class counts, the imbalance warning and class-balanced sample weights.
"""

from __future__ import annotations

import hashlib
import math
import random
import struct
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Sampler

from ..rng import preserved_rng
from .folders import Splits


_IMBALANCE = 5.0  # the largest class this many times the smallest: say so at `data`


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


@contextmanager
def seeded(seed: int):
    """Seed torch (CPU), python `random` and numpy from `seed`; restore all three on exit.

    Only the CPU generator is seeded (not torch.manual_seed, which would also reseed CUDA and so disturb the
    model's own dropout stream when loading runs in the training thread). Assumes no other thread draws from these
    global generators meanwhile: pgshell trains in one worker thread.
    """
    with preserved_rng(cuda=False):
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])
        yield
