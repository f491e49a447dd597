"""The frozen-backbone feature cache: the seed's fixed feature extractor, computed once instead of every step.

When only the classifier head trains, every epoch pushes each image through the same frozen backbone again. The
cache runs the backbone once over the data (per stored view) and trains the head on the stored features: the same
loop, the same sampler and position, a forward of one Linear instead of the whole network.

Views: `feature_views` 1 stores one unaugmented view (the eval transform). K > 1 stores K augmented views made with
the training transform, view v of image i seeded exactly as the uncached loop seeds epoch v — so the first K epochs
see the very augmentations the uncached path would; epoch e uses view e mod K.

The features are what the head receives: a forward pre-hook on the head module captures its input, so this works for
any architecture whose head is the last module applied (timm, torchvision, most custom models). The backbone runs in
eval mode: for a frozen backbone that is what "fixed feature extractor" means (BatchNorm statistics frozen — as the
uncached loop keeps them — and no dropout).

All views and splits go through the backbone in one DataLoader pass (one start of its workers). The cache stays
valid while its key holds: the frozen tensors unchanged (their identity and autograd version counters, which every
in-place write — an optimizer step, load_state_dict — advances), the same transform, data, device and precision.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..data.sampling import sample_seed
from ..report import evaluate as E
from .interface import BatchSource, DataSpec, LoaderSource, Report, eval_keys, train_sampler


def head_module_name(head: list[str]) -> str:
    """The module owning the head parameters ("fc.weight", "fc.bias" -> "fc")."""
    prefixes = {n.rsplit(".", 1)[0] if "." in n else "" for n in head}
    if len(prefixes) != 1:
        # several modules (e.g. a Sequential head): their common parent
        parts = [p.split(".") for p in prefixes]
        common = []
        for level in zip(*parts):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        return ".".join(common)
    return prefixes.pop()


def frozen_state(module: torch.nn.Module) -> tuple:
    """What the frozen part's values depend on, without reading them: each frozen parameter's and buffer's name,
    storage and version counter. Cheap enough to check at every evaluation."""
    tensors = [(n, p) for n, p in module.named_parameters() if not p.requires_grad] + list(module.named_buffers())
    return tuple((n, t.data_ptr(), t._version) for n, t in tensors)


@dataclass
class CachedSplit:
    views: list[torch.Tensor]  # each (N, D) on the training device
    labels: torch.Tensor  # (N,)
    ok: torch.Tensor  # (N,) bool: False where the image was bad
    bad: list[tuple[str, str]]  # (path, reason)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        return idx if self.all_ok else idx[self.ok[idx]]

    @property
    def all_ok(self) -> bool:
        return not self.bad


class FeatureSource(BatchSource):
    """Batches of stored features (train: the epoch's view) for the head; images come from `images`."""

    kind = "feature cache"

    def __init__(self, spec: DataSpec, head: torch.nn.Module, splits: dict[str, CachedSplit], images: LoaderSource):
        self.spec, self.head, self.splits, self._images = spec, head, splits, images
        self.key = FeatureSource.key_of(spec)

    @property
    def images(self) -> BatchSource:
        return self._images

    def module(self, net):
        return self.head

    @property
    def train(self) -> CachedSplit:
        return self.splits["train"]

    @staticmethod
    def applies(spec: DataSpec) -> bool:
        """Only the head trains (and the model is not wrapped for several devices), and no recipe needs the images
        themselves (mixup mixes pixels, TTA mirrors them)."""
        from ..train.recipes import needs_images

        trainable = {n for n, p in spec.module.named_parameters() if p.requires_grad}
        return bool(spec.cfg.feature_cache and trainable and trainable <= set(spec.head) and not spec.wrapped
                    and not spec.distributed and not needs_images(spec.cfg))

    @staticmethod
    def views(spec: DataSpec) -> int:
        return spec.cfg.feature_views if spec.cfg.augment else 1

    @staticmethod
    def key_of(spec: DataSpec) -> tuple:
        """Everything the cached features depend on: the frozen set and its weights, the transform (size, augment,
        views), the data, the device and precision, the batching of the backbone pass."""
        return (frozen_state(spec.module), spec.size, spec.cfg.augment, FeatureSource.views(spec), spec.cfg.seed,
                id(spec.splits), str(spec.runtime.device), str(spec.runtime.amp_dtype),
                E.eval_batch_size(spec.cfg.batch_size))

    def valid_for(self, spec: DataSpec) -> bool:
        return FeatureSource.applies(spec) and FeatureSource.key_of(spec) == self.key

    @staticmethod
    def build(spec: DataSpec, images: LoaderSource, report: Report) -> "FeatureSource":
        t0 = time.perf_counter()
        views, seed = FeatureSource.views(spec), spec.cfg.seed
        n = len(spec.splits.train)
        jobs = []  # (split, view, dataset, keys)
        for v in range(views):
            if views == 1:  # one unaugmented view
                jobs.append(("train", v, images.eval_set("train"), [(i, sample_seed(seed, 0, i)) for i in range(n)]))
            else:  # view v seeded as the uncached loop seeds epoch v
                jobs.append(("train", v, images.train_set, [(i, sample_seed(seed, v, i)) for i in range(n)]))
        for split in ("val", "test"):
            if spec.samples(split):
                jobs.append((split, 0, images.eval_set(split), eval_keys(len(spec.samples(split)), seed)))
        name = head_module_name(spec.head)
        head = spec.module.get_submodule(name) if name else spec.module
        outs = compute_features(spec.module, head, [(ds, keys) for _, _, ds, keys in jobs], spec.runtime,
                                E.eval_batch_size(spec.cfg.batch_size), spec.cfg.workers, report)
        splits: dict[str, CachedSplit] = {}
        for (split, _, ds, _), (feats, ok, bad) in zip(jobs, outs):
            if split not in splits:
                labels = torch.tensor([lab for _, lab in ds.samples], device=feats.device)
                splits[split] = CachedSplit([], labels, ok, bad)
            splits[split].views.append(feats)
        if splits["train"].bad:
            report.bad(splits["train"].bad)
        report.notify(f"feature cache: {n} training images x {views} view(s), {splits['train'].views[0].shape[1]} "
                      f"features each, built in {time.perf_counter() - t0:.1f} s (the frozen backbone runs once, not "
                      "every epoch)")
        return FeatureSource(spec, head, splits, images)

    def train_batches(self, epoch, start, rank, world, batch_size):
        """The same order and position as the images would have, features instead of images."""
        cached = self.train
        view = cached.views[epoch % len(cached.views)]
        order = torch.tensor([i for i, _ in train_sampler(self.spec, epoch, start, rank, world)], device=view.device)
        share = batch_size // world
        with cpu_threads(view.device, 1):  # microseconds of work per op: threads would only wait for each other
            for b in range(0, len(order), share):
                chunk = order[b: b + share]
                idx = cached.rows(chunk)
                if len(idx):
                    yield view.index_select(0, idx), cached.labels.index_select(0, idx), len(chunk) * world, []
                else:
                    yield None, None, len(chunk) * world, []

    def eval_batches(self, split, batch_size):
        cached = self.splits[split]
        feats = cached.views[0]
        for b in range(0, len(cached.labels), batch_size):
            idx = cached.rows(torch.arange(b, min(b + batch_size, len(cached.labels)), device=feats.device))
            if len(idx):
                yield feats.index_select(0, idx), cached.labels.index_select(0, idx), []


@contextmanager
def cpu_threads(device: torch.device, n: int):
    """At most `n` intra-op threads on a CPU while the block runs (restored after; a generator's `finally` runs when
    the loop leaves it). OpenMP threads wait for each other at every op: when the cores are busy with something else
    each op can wait a whole scheduler slice. Measured on this project's shared 2-core box: a 4-image head step took
    0.36 ms on one thread against 4-12 ms on two; the feature pass with 4 loader workers 5.6-7.1 s on one thread
    against 21-37 s on two. The forward's results did not change with the thread count (checked bit for bit)."""
    if device.type != "cpu" or n >= torch.get_num_threads():
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cores_beside(workers: int) -> int:
    """The cores left to the main process while `workers` loader processes decode (all of them without workers)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores if workers == 0 else max(1, cores - workers)


class _Jobs(torch.utils.data.Dataset):
    """Several (dataset, keys) lists as one dataset, so one DataLoader (one start of its workers) runs them all."""

    def __init__(self, jobs):
        self.items = [(j, key) for j, (_, keys) in enumerate(jobs) for key in keys]
        self.datasets = [ds for ds, _ in jobs]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        j, key = self.items[k]
        return k, self.datasets[j][key]


def _collate(batch):
    """(images of the good samples, their positions, [(position, (path, reason))] of the bad ones)."""
    good = [(k, t) for k, (t, _, problem) in batch if problem is None]
    bad = [(k, problem) for k, (_, _, problem) in batch if problem is not None]
    x = torch.stack([t for _, t in good]) if good else None
    return x, [k for k, _ in good], bad


@torch.no_grad()
def compute_features(module: torch.nn.Module, head: torch.nn.Module, jobs: list[tuple], runtime, batch_size: int,
                     workers: int, report: Report | None = None) -> list[tuple[torch.Tensor, torch.Tensor, list]]:
    """Run the backbone over each job's (dataset, [(index, sample_seed)]) in one pass; the input of `head` is the
    feature. Returns per job (features (N, D), ok (N,), bad [(path, reason)])."""
    report = report or Report()
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _mod, args: captured.append(args[0].detach().float()))
    was_training = module.training
    module.eval()
    dataset = _Jobs(jobs)
    feats: list[torch.Tensor | None] = [None] * len(dataset)
    bad: dict[int, tuple[str, str]] = {}
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         pin_memory=runtime.device.type == "cuda",
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    done = 0
    try:
        with cpu_threads(runtime.device, cores_beside(workers)):  # the workers decode on the other cores
            for x, positions, batch_bad in loader:
                bad.update(batch_bad)
                done += len(positions) + len(batch_bad)
                if x is not None:
                    captured.clear()
                    with runtime.autocast():
                        module(runtime.to_input(x))
                    for k, f in zip(positions, captured[-1].flatten(1)):
                        feats[k] = f
                report.phase("caching features", done, len(dataset))
    finally:
        handle.remove()
        module.train(was_training)
    return _split_jobs(jobs, feats, bad, runtime.device)


def _split_jobs(jobs, feats, bad, device):
    dim = next((f.shape[0] for f in feats if f is not None), 0)
    out, start = [], 0
    for _, keys in jobs:
        part = feats[start: start + len(keys)]
        ok = torch.tensor([f is not None for f in part], dtype=torch.bool, device=device)
        stacked = torch.stack([f if f is not None else torch.zeros(dim, device=device) for f in part]) if part \
            else torch.empty(0, dim, device=device)
        out.append((stacked, ok, [bad[k] for k in range(start, start + len(keys)) if k in bad]))
        start += len(keys)
    return out
