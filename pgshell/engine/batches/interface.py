"""Batch sources: where a trainer's batches come from, behind one interface, chosen in one place (choice.py).

    LoaderSource   interface.py   PIL decode + timm's transform in a DataLoader: the reference path
    CacheSource    inputcache.py  images decoded once into a uint8 array, augmented on the device
    DecodeSource   decode.py      file bytes read by workers, decoded and augmented on the device
    FeatureSource  features.py    the frozen backbone run once; the head trains on stored features

Every source keeps the data contract of data/sampling.py: which samples a batch holds, and how each is augmented,
depend only on (seed, epoch, sample index), so a run resumed anywhere, on any source, continues exactly. A source
gives

- `train_batches(epoch, start, rank, world, batch_size)`: (x, y, samples consumed, bad files) from sample `start` of
  the epoch's permutation to its end (this rank's share of each global batch; `samples consumed` counts all ranks);
- `eval_batches(split, batch_size)`: (x, y, bad) over a split in its fixed order, with the eval transform;
- `module(net)`: what its x go through (the whole model, or only the head for features);
- `images`: the source to use for a whole model (itself, except for features: a foreign module, e.g. a checkpoint's
  copy or EMA weights, needs images);
- `valid_for(spec)`: whether what it holds still matches the data, settings and frozen weights in `spec`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..config import TrainConfig
from ..data.folders import Splits
from ..data.images import draft_side
from ..data.loading import ImageDataset, make_loader
from ..data.sampling import EpochSampler
from ..data.transforms import build_transform, eval_transform
from ..train import recipes as R
from ..train.device import Runtime


def _no_op(*_args) -> None:
    return None


@dataclass
class Report:
    """Where a source's builder reports: notes, bad files ([(path, reason)]), progress of long builds."""

    notify: Callable[[str], None] = _no_op
    bad: Callable[[list], None] = _no_op
    phase: Callable[[str, int, int], None] = _no_op  # (name, done, total): "caching features", "decoding images"


@dataclass
class DataSpec:
    """Everything a batch source depends on: the data, the transform settings, the model and the device."""

    splits: Splits
    data_config: dict
    size: int  # image size override (0: the model's own input size)
    cfg: TrainConfig
    runtime: Runtime
    module: torch.nn.Module  # the unwrapped model (the feature pass runs its frozen part)
    head: list[str] = field(default_factory=list)  # the head's parameter names
    distributed: bool = False  # under DDP only the DataLoader shards the data (the caches are per process)
    wrapped: bool = False  # DataParallel: the feature cache would bypass it

    def samples(self, split: str) -> list[tuple[str, int]]:
        return getattr(self.splits, split) or []

    @property
    def crop(self) -> int:
        """The side of the images the model gets (the eval transform's crop)."""
        return self.size if self.size > 0 else int(self.data_config["input_size"][-1])

    def transform(self, train: bool):
        if not train:
            return eval_transform(self.data_config, self.size, self.cfg)
        return build_transform(self.data_config, train=True, size=self.size, augment=self.cfg.augment,
                               policy=self.cfg)

    def dataset(self, split: str, train: bool = False) -> ImageDataset:
        return ImageDataset(self.samples(split), self.transform(train), draft_side(self.crop))


class BatchSource:
    """The interface (see the module's docstring); the base behaves as an always-valid image source."""

    kind = "?"

    @property
    def images(self) -> "BatchSource":
        return self

    def module(self, net: torch.nn.Module) -> torch.nn.Module:
        return net

    def valid_for(self, spec: DataSpec) -> bool:
        return True

    def bind(self, spec: DataSpec) -> "BatchSource":
        """Reused for `spec` (valid_for it): the settings its key does not cover (seed, workers) come from there."""
        self.spec = spec
        return self

    def train_batches(self, epoch: int, start: int, rank: int, world: int, batch_size: int) -> Iterator[tuple]:
        raise NotImplementedError

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple]:
        raise NotImplementedError


def data_key(spec: DataSpec) -> tuple:
    """What images a split's samples turn into: the scan (by identity: a new `data` is a new scan), the image size,
    augmentation and the model's data config."""
    config = tuple(sorted((k, str(v)) for k, v in spec.data_config.items()))
    policy = repr(spec.transform(True)), repr(spec.transform(False))  # the augmentation policy in force
    return id(spec.splits), spec.size, spec.cfg.augment, config, policy


def train_sampler(spec: DataSpec, epoch: int, start: int, rank: int, world: int) -> EpochSampler:
    return EpochSampler(len(spec.splits.train), spec.cfg.seed, epoch, start=start, rank=rank, world=world,
                        weights=R.sample_weights(spec.cfg, spec.splits))  # balanced: a seeded weighted draw


def eval_keys(n: int, seed: int) -> list[tuple[int, int]]:
    """A split's fixed order and sample seeds, as EpochSampler(shuffle=False) gives them."""
    return list(EpochSampler(n, seed, 0, shuffle=False)) if n else []


class LoaderSource(BatchSource):
    """The reference path: each image decoded by PIL and transformed by timm in DataLoader workers, every epoch."""

    kind = "DataLoader"

    def __init__(self, spec: DataSpec):
        self.spec, self.key = spec, data_key(spec)
        self.train_set = spec.dataset("train", train=True)
        self._eval_sets: dict[str, ImageDataset] = {}

    def valid_for(self, spec: DataSpec) -> bool:
        return data_key(spec) == self.key

    def eval_set(self, split: str) -> ImageDataset:
        if split not in self._eval_sets:
            self._eval_sets[split] = self.spec.dataset(split)
        return self._eval_sets[split]

    def train_batches(self, epoch, start, rank, world, batch_size):
        cfg = self.spec.cfg
        loader = make_loader(self.train_set, train_sampler(self.spec, epoch, start, rank, world), batch_size // world,
                             cfg.workers, pin_memory=self.spec.runtime.device.type == "cuda")
        for x, y, bad in loader:
            # every process yields equal shares (the sampler pads by wrapping): the global count is share x world
            yield x, y, ((0 if y is None else len(y)) + len(bad)) * world, bad

    def eval_batches(self, split, batch_size):
        ds = self.eval_set(split)
        sampler = EpochSampler(len(ds), self.spec.cfg.seed, 0, shuffle=False)
        yield from make_loader(ds, sampler, batch_size, self.spec.cfg.workers)
