"""Evaluation: the one sum over a pass's outputs (`accumulate`), the plain pass over a dataset (`evaluate_dataset`), the
classification report computed from the logits and labels, and top-K predictions for loose image files.

`Trainer.evaluate` (epoch ends, `eval`, `eval --checkpoint N` on a Trainer of the checkpoint's own) feeds the batches
of the run's source through `accumulate`, with the evaluation transform of data.transforms.eval_transform, the same
batch composition and loss reduction, so the validation row written at an epoch end and a later `eval` agree to the
bit; `errors` and `probe` read the split through the same transform (`Trainer.eval_dataset`).
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from ..data.folders import images_under
from ..data.images import BadImage, load_image
from ..data.loading import ImageDataset, make_loader
from ..data.sampling import EpochSampler
from ..train.device import Runtime


def eval_batch_size(batch_size: int) -> int:
    """Evaluation batches are at least 64 images (no gradients to hold); part of what fixes the loss's summation order."""
    return max(batch_size, 64)


class EvalMode:
    """Put a module in eval mode and afterwards restore every submodule's own mode (frozen BatchNorm layers of a
    training model stay in eval mode; a module given by a caller gets back exactly what it had)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __enter__(self):
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc):
        for m, training in self.modes:
            m.training = training


def forward_tta(net: torch.nn.Module, x: torch.Tensor, runtime: Runtime, tta: str = "none") -> torch.Tensor:
    """The model's float logits for an input batch already on the device; tta "flip": the mean of the logits of the
    images and of their mirror images (test-time augmentation)."""
    with runtime.autocast():
        out = net(x).float()
        if tta == "flip":
            out = (out + net(x.flip(-1)).float()) / 2
    return out


@torch.no_grad()
def evaluate_dataset(net: torch.nn.Module, dataset: ImageDataset, loss_fn: Callable, runtime: Runtime,
                     batch_size: int, workers: int = 0, seed: int = 0, collect: bool = False,
                     num_classes: int = 0, tta: str = "none") -> dict:
    """Mean loss and accuracy of `net` over `dataset` in its fixed order (with `tta`, see forward_tta).

    The loss is the batch-mean loss times the batch's size, summed and divided by the image count: a batch of 64 and a
    remainder of 12 weigh 64 and 12. `collect` also returns the logits and labels (on the CPU).
    """
    sampler = EpochSampler(len(dataset), seed, 0, shuffle=False)
    loader = make_loader(dataset, sampler, eval_batch_size(batch_size), workers)

    def outputs():
        for x, y, bad in loader:
            if x is None:
                yield None, None, bad
                continue
            x, y = runtime.to_input(x), y.to(runtime.device)
            yield forward_tta(net, x, runtime, tta), y, bad

    with EvalMode(net):
        return accumulate(outputs(), loss_fn, collect, num_classes)


@torch.no_grad()
def accumulate(outputs, loss_fn: Callable, collect: bool = False, num_classes: int = 0) -> dict:
    """Sum (logits, labels, bad) batches into mean loss and accuracy — the one reduction every evaluation path uses
    (images through the model, or cached features / decoded images through it), so they agree to the bit."""
    total_loss, correct, n, logits, labels, bad_all = 0.0, 0, 0, [], [], []
    for out, y, bad in outputs:
        bad_all += bad
        if out is None:
            continue
        total_loss += loss_fn(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
        if collect:
            logits.append(out.cpu())
            labels.append(y.cpu())
    res = {"loss": total_loss / max(n, 1), "accuracy": correct / max(n, 1), "n": n, "bad": bad_all}
    if collect:
        res["logits"] = torch.cat(logits) if logits else torch.empty(0, num_classes)
        res["labels"] = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    return res


def classification_report(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], top: int = 5,
                          pairs: int = 5) -> dict:
    """Per-class precision, recall, F1 and support, the confusion matrix (rows: true class, columns: predicted), the
    most confused (true, predicted) pairs, and top-`top` accuracy when there are more than `top` classes."""
    c = len(classes)
    labels = labels.long()
    pred = logits.argmax(1) if len(labels) else torch.empty(0, dtype=torch.long)
    cm = torch.zeros(c, c, dtype=torch.long)
    cm.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    tp, support, predicted = cm.diag(), cm.sum(1), cm.sum(0)
    rows = []
    for i, name in enumerate(classes):
        p = tp[i].item() / predicted[i].item() if predicted[i] else 0.0
        r = tp[i].item() / support[i].item() if support[i] else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        rows.append({"class": name, "precision": p, "recall": r, "f1": f1, "support": int(support[i])})
    present = [r for r in rows if r["support"]]
    macro = {k: sum(r[k] for r in present) / len(present) if present else 0.0 for k in ("precision", "recall", "f1")}
    off = cm.clone()
    off.fill_diagonal_(0)
    confused = []
    if off.sum():
        counts, flat = off.flatten().sort(descending=True, stable=True)
        for count, idx in zip(counts.tolist(), flat.tolist()):
            if count == 0 or len(confused) == pairs:
                break
            confused.append({"true": classes[idx // c], "predicted": classes[idx % c], "count": count})
    n = len(labels)
    out = {"n": n, "accuracy": tp.sum().item() / max(n, 1), "per_class": rows, "macro": macro,
           "confusion": cm.tolist(), "confused": confused, f"top{top}": None}
    if c > top and n:
        hits = (logits.topk(top, dim=1).indices == labels[:, None]).any(1)
        out[f"top{top}"] = hits.sum().item() / n
    return out


# ---------------------------------------------------------------- predictions for image files
def image_files(path: str | os.PathLike) -> list[str]:
    """`path` itself when it is an image file, else every image under the folder (recursively, sorted)."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return images_under(path)
    return []


@torch.no_grad()
def predict_files(net: torch.nn.Module, files: list[str], transform: Callable, top: int,
                  batch_size: int = 32) -> list[dict]:
    """For each file: {"path", "top": [(class index, probability), ...]} or {"path", "error"} for one that won't load.

    Runs on the device `net`'s parameters are on, in fp32. The eval transform is deterministic, so nothing here draws
    from or reseeds a global random generator.
    """
    device = next(net.parameters()).device
    results: list[dict] = []
    top = max(1, top)
    with EvalMode(net):
        for start in range(0, len(files), batch_size):
            chunk, tensors = [], []
            for f in files[start:start + batch_size]:
                try:
                    tensors.append(transform(load_image(f)))
                    chunk.append(f)
                except BadImage as e:
                    results.append({"path": f, "error": str(e)})
            if not tensors:
                continue
            probs = net(torch.stack(tensors).to(device)).float().softmax(1).cpu()
            values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
            for f, v, i in zip(chunk, values.tolist(), indices.tolist()):
                results.append({"path": f, "top": list(zip(i, v))})
    order = {f: k for k, f in enumerate(files)}
    return sorted(results, key=lambda r: order[r["path"]])
