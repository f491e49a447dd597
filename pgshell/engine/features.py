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
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from . import data as D


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


def fingerprint(module: torch.nn.Module, names: list[str]) -> str:
    """A cheap fingerprint of the named tensors (sums, not bytes): detects weights that changed since caching."""
    h = hashlib.sha256()
    state = module.state_dict()
    with torch.no_grad():
        for n in names:
            t = state[n].detach()
            if t.is_floating_point():
                h.update(f"{n}:{t.double().sum().item():.12e}:{t.double().abs().sum().item():.12e}".encode())
            else:
                h.update(f"{n}:{t.sum().item()}".encode())
    return h.hexdigest()


@dataclass
class CachedSplit:
    views: list[torch.Tensor]  # each (N, D) on the training device
    labels: torch.Tensor  # (N,)
    ok: torch.Tensor  # (N,) bool: False where the image was bad
    bad: dict[int, tuple[str, str]]  # index -> (path, reason)


@torch.no_grad()
def compute_features(module: torch.nn.Module, head_name: str, dataset: D.ImageDataset, keys: list[tuple[int, int]],
                     runtime, batch_size: int, workers: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Run the backbone over `dataset` at the given (index, sample_seed) keys; returns (features, ok, bad)."""
    head = module.get_submodule(head_name) if head_name else module
    captured: list[torch.Tensor] = []

    def grab(_mod, args):
        captured.append(args[0].detach().float())

    handle = head.register_forward_pre_hook(grab)
    was_training = module.training
    module.eval()
    feats: list[torch.Tensor | None] = [None] * len(keys)
    ok = torch.zeros(len(keys), dtype=torch.bool)
    bad: dict[int, tuple[str, str]] = {}
    try:
        loader = D.make_loader(dataset, _KeyList(keys), batch_size, workers,
                               pin_memory=runtime.device.type == "cuda")
        pos = 0
        for x, y, batch_bad in loader:
            n_keys = (0 if y is None else len(y)) + len(batch_bad)
            chunk = keys[pos: pos + n_keys]
            bad_paths = {p for p, _ in batch_bad}
            good_rows = [i for i, (idx, _) in enumerate(chunk) if dataset.samples[idx][0] not in bad_paths]
            for p, reason in batch_bad:
                for i, (idx, _) in enumerate(chunk):
                    if dataset.samples[idx][0] == p:
                        bad[pos + i] = (p, reason)
            if x is not None:
                captured.clear()
                with runtime.autocast():
                    module(runtime.to_input(x))
                f = captured[-1].flatten(1)
                for j, i in enumerate(good_rows):
                    feats[pos + i] = f[j]
                    ok[pos + i] = True
            pos += n_keys
    finally:
        handle.remove()
        module.train(was_training)
    dim = next((f.shape[0] for f in feats if f is not None), 0)
    out = torch.stack([f if f is not None else torch.zeros(dim, device=runtime.device) for f in feats]) \
        if feats else torch.empty(0, dim)
    return out, ok.to(out.device), bad


class _KeyList(torch.utils.data.Sampler):
    """A fixed list of (index, sample_seed) keys, in order."""

    def __init__(self, keys):
        self.keys = keys

    def __iter__(self):
        return iter(self.keys)

    def __len__(self):
        return len(self.keys)
