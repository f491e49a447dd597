"""The training loop: the only one in pgshell. Training, pause/resume, tuning trials and cached-feature training all
run through `Trainer.run`.

Data flow of one step: EpochSampler yields (index, sample_seed) from the current position -> ImageDataset decodes and
augments with randomness seeded by sample_seed -> collate (skipping bad images) -> Runtime moves the batch to the
device/layout -> forward under autocast -> loss -> backward (GradScaler for fp16) -> optimizer step -> per-step
scheduler step -> position advances -> a metrics row -> on_batch callback. At the last batch of an epoch: validation,
a val row, per-epoch scheduler step, on_epoch (the session writes the checkpoint there).

Between batches the loop calls `control()`: it applies queued changes (a new lr) and says whether to pause or stop,
so a pause takes effect within one batch. Position is counted in samples of the epoch's permutation, so a run
paused anywhere and resumed in a new process continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from . import distributed as DIST
from . import evaluate as E
from . import features as FC
from . import inputcache as IC
from . import models as M
from . import recipes as R
from .config import TrainConfig
from .device import Runtime, resolve_runtime
from .errors import PgError
from .events import Ctx, Events, Handler
from .metrics import MetricsLog, MetricsLogger
from .schedule import lr_factor


@dataclass
class Position:
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch
    sample: int = 0  # samples of the current epoch's permutation consumed
    step: int = 0  # optimizer steps since the start


@dataclass
class RunResult:
    outcome: str  # "done" | "paused" | "stopped"
    position: Position
    batches: int
    images: int
    seconds: float
    extra: dict = field(default_factory=dict)


def fresh_state(built, spec, splits, cfg: TrainConfig, size: int) -> dict:
    """The checkpoint state of a model that has not trained yet (what `save` writes before any training)."""
    module = built.module
    return {"model_spec": spec.to_dict(), "classes": list(splits.classes) if splits else [], "config": cfg.to_dict(),
            "size": size, "position": asdict(Position()),
            "frozen": [n for n, p in module.named_parameters() if not p.requires_grad],
            "model": dict(module.state_dict()), "optimizer": None, "scheduler": None, "scaler": None,
            "rng": {}, "handlers": {}, "last": {}, "run": 0}


def position_rng(seed: int, step: int) -> dict:
    """The global generators' states a checkpoint stores: each seeded from (seed, step) alone, so a checkpoint holds
    nothing that depends on the history that led to it. (Training never reads them: data and the model's own
    randomness are seeded per sample and per step; they are restored so code after a resume sees the same streams.)"""
    s = step_seed(seed, step)
    py = random.Random(s).getstate()
    npy = np.random.RandomState(s % 2**32).get_state()
    gen = torch.Generator().manual_seed(s)
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [npy[0], torch.from_numpy(npy[1].astype(np.int64)), *npy[2:]],
            "torch": gen.get_state()}


def restore_rng(rng: dict) -> None:
    """Set the global generators from a checkpoint's `rng` (a bad one raises: a hand-edited file)."""
    if "python" in rng:
        v, internal, gauss = rng["python"]
        random.setstate((v, tuple(internal), gauss))
    if "numpy" in rng:
        kind, keys, *rest = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])


def step_seed(seed: int, step: int) -> int:
    """Seed for the model's own randomness (dropout, drop-path) at a step: a function of (seed, step) only."""
    return D.sample_seed(seed, -1, step)


# ---------------------------------------------------------------- optimizer, schedule, loss
def build_optimizer(module: torch.nn.Module, head: set[str], cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """Parameter groups by role, head and backbone, so their learning rates can differ (discriminative fine-tuning),
    and with `layer_decay` < 1 by layer too (timm's layer-wise decay grouping, engine.recipes.layer_scales). A group's
    lr is lr x lr_scale, lr_scale = layer_scale x (1 for the head, backbone_lr_scale for the backbone). The head's
    group comes first: its lr is the one logged."""
    scales = R.layer_scales(module, head, cfg.layer_decay) if cfg.layer_decay < 1 else {}
    found: dict[tuple[bool, float], dict] = {}
    for n, p in module.named_parameters():
        if p.requires_grad:
            key = (n not in head, scales.get(n, 1.0))
            g = found.setdefault(key, {"params": [], "names": [], "role": "backbone" if key[0] else "head",
                                       "layer_scale": key[1]})
            g["params"].append(p)
            g["names"].append(n)
    groups = [found[k] for k in sorted(found, key=lambda k: (k[0], -k[1]))]
    if not groups:
        return None
    for g in groups:
        scale = g["layer_scale"] * (1.0 if g["role"] == "head" else cfg.backbone_lr_scale)
        g.update(lr=cfg.lr * scale, initial_lr=cfg.lr * scale, lr_scale=scale)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def make_loss(cfg: TrainConfig, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if cfg.criterion == "cross_entropy":
        return torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    ls = cfg.label_smoothing
    dist = F.l1_loss if cfg.criterion == "l1" else F.mse_loss

    def regression_on_probabilities(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = F.one_hot(y, num_classes).to(out.dtype)
        if ls:
            target = target * (1 - ls) + ls / num_classes
        return dist(out.softmax(dim=1), target)

    return regression_on_probabilities


# ---------------------------------------------------------------- the trainer
class Trainer:
    """Holds the model, optimizer, schedule and position of one training run, and runs its loop."""

    def __init__(self, built: M.BuiltModel, spec: M.ModelSpec, splits: D.Splits, cfg: TrainConfig,
                 log: MetricsLog | None = None, run_id: int = 1, trial: str = "", size: int = 0,
                 device_fallback: bool = False):
        self.built, self.spec, self.splits = built, spec, splits
        self.device_fallback = device_fallback  # a device that is not here: run on what is (Runtime.note says so)
        self.size = size  # image size override (0: the model's own input size)
        self.cfg = cfg
        self.run_id, self.trial = run_id, trial
        self.pos = Position()
        # how the loop reports to whoever drives it (the session sets these; a bare Trainer stays silent)
        self.notify: Callable[[str], None] = lambda msg: None  # one-off information ("feature cache: ...")
        self.on_bad: Callable[[list], None] = lambda bad: None  # [(path, reason)] found while decoding
        self.on_phase: Callable[[str, int, int], None] = lambda name, done, total: None  # cache builds
        self.on_handler_error: Callable[[str], None] = lambda msg: None
        self.events = Events(on_error=self._handler_failed)
        self._request: str | None = None
        self.request_reason = ""
        self._metrics = self.events.add(MetricsLogger(log))
        self._recipe_handlers: list[Handler] = []
        self.last: dict[str, Any] = {}  # last train/val metrics, for `show`
        self._opt_state: dict | None = None  # optimizer state by parameter name, kept across rebuilds
        self._fcache: dict | None = None  # the frozen-backbone feature cache (engine/features.py), when built
        self._use_cache = False
        self._icache: dict | None = None  # the decoded-image cache (engine/inputcache.py), when in use
        self.scaler_state: dict | None = None
        self.setup()

    # ---------------- (re)building from the config: called at the start of each run and after changes
    def setup(self) -> None:
        cfg = self.cfg
        self.world = DIST.world()
        device = cfg.device
        if self.world.active and torch.cuda.is_available():
            device = f"cuda:{self.world.local_rank}"  # DDP: one GPU per process
        self.runtime: Runtime = resolve_runtime(device, cfg.amp, cfg.channels_last, cfg.devices,
                                                self.built.is_convnet, fallback=self.device_fallback)
        if cfg.batch_size % self.world.size:
            raise PgError(f"batch_size {cfg.batch_size} must be a multiple of the {self.world.size} processes "
                          "(it is the global batch; each process takes an equal share)")
        self.net = self.runtime.prepare_model(self.built.module)
        if self.world.active:
            from torch.nn.parallel import DistributedDataParallel

            if self.runtime.device.type == "cuda":  # BatchNorm statistics over the global batch
                self.built.module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.built.module)
            cuda = self.runtime.device.type == "cuda"
            self.net = DistributedDataParallel(self.built.module, device_ids=[self.runtime.device.index] if cuda else None)
        if cfg.compile:  # compiled lazily at the first batch; checkpoints keep using the plain module
            self.net = torch.compile(self.net)
        self.train_set = D.ImageDataset(self.splits.train, D.build_transform(
            self.built.data_config, train=True, size=self.size, augment=cfg.augment, policy=cfg))
        eval_tf = D.build_transform(self.built.data_config, train=False, size=self.size, policy=cfg)
        self.eval_sets = {"val": D.ImageDataset(self.splits.val, eval_tf), "train": D.ImageDataset(self.splits.train, eval_tf)}
        if self.splits.test:
            self.eval_sets["test"] = D.ImageDataset(self.splits.test, eval_tf)
        self.loss_fn = make_loss(cfg, len(self.splits.classes))
        self._rebuild_optimizer()
        self.scaler = torch.amp.GradScaler(self.runtime.device.type) if self.runtime.fp16 else None
        if self.scaler is not None and self.scaler_state:
            self.scaler.load_state_dict(self.scaler_state)
        self._attach_recipes()

    def _attach_recipes(self) -> None:
        """The handlers the settings ask for (EMA, mixup, early stopping, ...), rebuilt with the settings."""
        from .recipes import config_handlers

        for h in self._recipe_handlers:
            self.events.remove(h, keep_state=True)
        self._recipe_handlers = [self.events.add(h) for h in config_handlers(self)]

    @property
    def log(self) -> MetricsLog | None:
        return self._metrics.log

    @log.setter
    def log(self, log: MetricsLog | None) -> None:
        self._metrics.log = log

    def _handler_failed(self, handler: Handler, event: str, error: BaseException) -> None:
        self.on_handler_error(f"{handler!r} failed in {event} ({type(error).__name__}: {str(error)[:160]}); "
                              "it is switched off for the rest of this run, training goes on")

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.splits.train) / self.cfg.batch_size))

    def _rebuild_optimizer(self) -> None:
        """New optimizer for the currently trainable parameters; state carried over by parameter name."""
        if getattr(self, "optimizer", None) is not None:
            self._opt_state = self._optimizer_state_by_name()
        self.optimizer = build_optimizer(self.built.module, set(self.built.head), self.cfg)
        if self.optimizer is None:
            self.scheduler = None
            return
        if self._opt_state and self._opt_state.get("type") == self.cfg.optimizer:
            sd = self.optimizer.state_dict()
            index = {n: i for g in sd["param_groups"] for i, n in zip(g["params"], g["names"])}
            sd["state"] = {index[n]: s for n, s in self._opt_state["state"].items() if n in index}
            self.optimizer.load_state_dict(sd)
        fn, self._sched_unit = lr_factor(self.cfg, R.optimizer_steps_per_epoch(self.steps_per_epoch, self.cfg.accumulate))
        count = self.pos.epoch if self._sched_unit == "epoch" else self.pos.step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, fn, last_epoch=count - 1)

    def _optimizer_state_by_name(self) -> dict:
        if self.optimizer is None:
            return self._opt_state or {}
        sd = self.optimizer.state_dict()
        names = {i: n for g in sd["param_groups"] for i, n in zip(g["params"], g["names"])}
        state = dict((self._opt_state or {}).get("state", {})) if (self._opt_state or {}).get("type") == self.cfg.optimizer else {}
        state.update({names[i]: s for i, s in sd["state"].items()})
        return {"type": self.cfg.optimizer, "state": state}

    def apply_live(self, name: str, value: Any) -> None:
        """A live setting changed mid-run (lr, momentum, ...): takes effect at the next batch."""
        self.cfg = self.cfg.replace(**{name: value})
        if name == "label_smoothing":
            self.loss_fn = make_loss(self.cfg, len(self.splits.classes))
        if self.optimizer is None:
            return
        for g in self.optimizer.param_groups:
            if name in ("lr", "backbone_lr_scale"):
                g["lr_scale"] = g.get("layer_scale", 1.0) * (1.0 if g["role"] == "head" else self.cfg.backbone_lr_scale)
                g["initial_lr"] = self.cfg.lr * g["lr_scale"]
            elif name == "momentum":
                if "betas" in g:
                    g["betas"] = (value, g["betas"][1])
                else:
                    g["momentum"] = value
            elif name == "weight_decay":
                g["weight_decay"] = value
        if name in ("lr", "backbone_lr_scale") and self.scheduler is not None:
            self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
            f = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
            for g in self.optimizer.param_groups:
                g["lr"] = g["initial_lr"] * f

    def reconfigure(self, cfg: TrainConfig) -> None:
        """Settings that need a pause (optimizer, scheduler, batch size, device...) take effect here."""
        if self.optimizer is not None:  # before the new cfg: the state is tagged with the optimizer that made it
            self._opt_state = self._optimizer_state_by_name()
            self.optimizer = None
        self.cfg = cfg
        self.setup()

    def params_changed(self) -> None:
        """After freeze/unfreeze: rebuild the optimizer groups, keeping each parameter's state."""
        self._rebuild_optimizer()

    @property
    def lr(self) -> float:
        if self.optimizer is None:
            return 0.0
        return self.optimizer.param_groups[0]["lr"]

    # ---------------- the loop
    def request(self, what: str, reason: str = "") -> None:
        """A handler (or the session) asks the loop to pause or stop at the next batch boundary; stop wins."""
        if what not in ("pause", "stop"):
            raise ValueError(f"request 'pause' or 'stop', not {what!r}")
        if self._request != "stop":
            self._request, self.request_reason = what, reason

    @property
    def requested(self) -> str | None:
        return self._request

    def add_handler(self, handler: Handler) -> Handler:
        return self.events.add(handler)

    def remove_handler(self, handler: Handler) -> None:
        self.events.remove(handler)

    def run(self, epochs: int | None = None, steps: int | None = None, handlers: list | tuple = ()) -> RunResult:
        """Train `epochs` more epochs or `steps` more batches from the current position; `handlers` attach for this
        run only. Returns with outcome "done", "paused" or "stopped" (a request), or raises (on_exception first)."""
        if self.optimizer is None:
            raise PgError("nothing to train: every parameter is frozen — `unfreeze all` or `freeze backbone`")
        if not self.splits.train:
            raise PgError("the training split is empty: attach a dataset with `data PATH`")
        for h in handlers:
            self.add_handler(h)
        target = (self.pos.step + steps, None) if steps is not None else (None, self.pos.epoch + (epochs or 0))
        self._request, self.request_reason = None, ""
        ctx = Ctx()
        tally = RunResult("done", self.pos, 0, 0, 0.0, {"start": Position(**asdict(self.pos))})
        t0 = time.perf_counter()
        try:
            self.optimizer.zero_grad(set_to_none=True)  # nothing left over from a batch that raised
            self.events.fire("before_fit", self, ctx)
            self._prepare_batches(self.notify)
            tally.outcome = self._fit(target, tally, t0)
        except BaseException as e:
            ctx.error, ctx.outcome = e, "failed"
            self.events.fire("on_exception", self, ctx)
            self.events.fire("after_fit", self, ctx)
            raise
        finally:
            for h in handlers:
                self.remove_handler(h)
        tally.position, tally.seconds = Position(**asdict(self.pos)), time.perf_counter() - t0
        ctx.outcome = tally.outcome
        for h in handlers:  # their after_fit still sees the run's end
            self.add_handler(h)
        try:
            self.events.fire("after_fit", self, ctx)
        finally:
            for h in handlers:
                self.remove_handler(h)
        return tally

    def _fit(self, target: tuple, tally: RunResult, t0: float) -> str:
        target_step, target_epoch = target
        self._train_mode()
        while not (target_step is not None and self.pos.step >= target_step
                   or target_epoch is not None and self.pos.epoch >= target_epoch):
            if self.pos.sample >= len(self.splits.train):  # every batch done, the epoch's end not (it raised)
                self._end_epoch()
                continue
            if self.pos.batch == 0:
                self.events.fire("before_epoch", self, Ctx())
            for x, y, nkeys, bad in self._batches():
                ctx = Ctx(x=x, y=y)
                self.events.fire("before_batch", self, ctx)
                request = DIST.agree(self._request, self.runtime.device)
                if request is not None:
                    return "paused" if request == "pause" else "stopped"
                if bad:
                    self.on_bad(bad)
                tb = time.perf_counter()
                row = self._train_batch(ctx, nkeys)
                tally.batches += 1
                tally.images += row["images"]
                ctx.row = dict(row, seconds=time.perf_counter() - tb, batches=self.steps_per_epoch_now,
                               elapsed=time.perf_counter() - t0, done=tally.images)
                self.events.fire("after_batch", self, ctx)
                if self.pos.sample >= len(self.splits.train):
                    self._end_epoch()
                    break
                if target_step is not None and self.pos.step >= target_step:
                    break
        return "done"

    @property
    def steps_per_epoch_now(self) -> int:
        """Batches in the current epoch (the remainder at today's batch size, plus the ones already done)."""
        left = len(self.splits.train) - self.pos.sample
        return self.pos.batch + max(0, math.ceil(left / self.cfg.batch_size))

    def _batches(self):
        """(images, labels, samples consumed, bad files) from the current position to the end of the epoch."""
        w = self.world
        sampler = D.EpochSampler(len(self.splits.train), self.cfg.seed, self.pos.epoch, start=self.pos.sample,
                                 rank=w.rank, world=w.size, weights=R.sample_weights(self.cfg, self.splits))
        if self._use_cache:  # the same order and position, features instead of images
            cached: FC.CachedSplit = self._fcache["train"]
            view = cached.views[self.pos.epoch % len(cached.views)]
            keys = [i for i, _ in sampler]
            for b in range(0, len(keys), self.cfg.batch_size):
                idx = torch.tensor(keys[b: b + self.cfg.batch_size], device=view.device)
                good = idx[cached.ok[idx]]
                x = view[good] if len(good) else None
                yield x, (cached.labels[good] if len(good) else None), len(idx), []
            return
        if self._icache_on():
            yield from self._icache_batches("train", list(sampler), self.cfg.batch_size, w.size)
            return
        loader = D.make_loader(self.train_set, sampler, self.cfg.batch_size // w.size, self.cfg.workers,
                               pin_memory=self.runtime.device.type == "cuda")
        for x, y, bad in loader:
            # every process yields equal shares (the sampler pads by wrapping): the global count is share x world
            yield x, y, ((0 if y is None else len(y)) + len(bad)) * w.size, bad

    def _train_mode(self) -> None:
        self.net.train()
        M.frozen_bn_to_eval(self.built.module)

    def _train_batch(self, ctx: Ctx, nkeys: int) -> dict:
        lr = self.lr
        if ctx.x is None:  # every image of the batch was bad: nothing to learn from, position still advances
            loss_v, acc, n = float("nan"), float("nan"), 0
        else:
            loss_v, acc, n = self._step(ctx)
        # the position advances only once the step is done: a batch that raised (out of memory) is trained again
        self.pos.sample += nkeys
        self.pos.batch += 1
        self.pos.step += 0 if ctx.skip_step else 1  # steps count optimizer steps (accumulation skips some)
        if self._sched_unit == "step" and not ctx.skip_step:
            self.scheduler.step()
        if n:  # the epoch's running means (kept in `last`, so they survive a resume mid-epoch)
            sums = [self.last.get("epoch_loss_sum", 0.0) + loss_v * n, self.last.get("epoch_correct", 0.0) + acc * n,
                    self.last.get("epoch_n", 0) + n]
            self.last.update(epoch_loss_sum=sums[0], epoch_correct=sums[1], epoch_n=sums[2],
                             train_loss=sums[0] / sums[2], train_accuracy=sums[1] / sums[2])
        return {"step": self.pos.step, "epoch": self.pos.epoch + 1, "batch": self.pos.batch, "split": "train",
                "loss": loss_v, "accuracy": acc, "lr": lr, "images": n, "run": self.run_id, "trial": self.trial}

    def _step(self, ctx: Ctx) -> tuple[float, float, int]:
        """Forward, loss, backward and (unless a handler skips it) the optimizer step of one batch."""
        # the model's own randomness (dropout): per step, or per batch inside an accumulation group
        torch.manual_seed(step_seed(self.cfg.seed, self.pos.step) if self.cfg.accumulate == 1 else
                          D.derived_seed("pgshell-micro", self.cfg.seed, self.pos.epoch, self.pos.sample))
        ctx.x, ctx.y = self.runtime.to_input(ctx.x), ctx.y.to(self.runtime.device, non_blocking=True)
        with self.runtime.autocast():
            ctx.out = self._train_module()(ctx.x)
        ctx.loss = self.loss_fn(ctx.out.float(), ctx.y)
        self.events.fire("after_loss", self, ctx)
        (self.scaler.scale(ctx.loss) if self.scaler is not None else ctx.loss).backward()
        self.events.fire("before_step", self, ctx)
        if not ctx.skip_step:
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.events.fire("after_step", self, ctx)
        n = len(ctx.y)
        loss_v, correct = ctx.loss.item(), (ctx.out.argmax(1) == ctx.y).sum().item()
        if self.world.active:  # the global batch's figures, as one process would log them
            loss_sum, correct, n = DIST.all_sum([loss_v * n, correct, n], self.runtime.device)
            loss_v, n = loss_sum / n, int(n)
        return loss_v, correct / n, n

    def unscale_gradients(self) -> None:
        """For handlers that read gradients (clipping) under fp16: make them true gradients first (once a step)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)

    def _end_epoch(self) -> None:
        epoch = self.pos.epoch + 1
        ctx = Ctx()
        val = None
        if self.splits.val:
            self.events.fire("before_validate", self, ctx)
            val = self.evaluate("val", module=ctx.eval_module)
            ctx.val = val
            self.events.fire("after_validate", self, ctx)
        self.pos.epoch, self.pos.batch, self.pos.sample = epoch, 0, 0
        for k in ("epoch_loss_sum", "epoch_correct", "epoch_n"):
            self.last.pop(k, None)
        if self._sched_unit == "epoch":
            self.scheduler.step()
        if val is not None:
            self.last.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_epoch=epoch)
        self._train_mode()
        ctx.info = {"epoch": epoch, "step": self.pos.step, "val": val, "train_loss": self.last.get("train_loss"),
                    "train_accuracy": self.last.get("train_accuracy")}
        self.events.fire("after_epoch", self, ctx)

    # ---------------- evaluation
    def evaluate(self, split: str = "val", collect: bool = False, module: torch.nn.Module | None = None) -> dict:
        """Loss and accuracy over a split with the eval transform; `collect` also returns logits and labels.

        With the feature cache or the decoded-image cache active, the split's stored features or images go through
        the model in the batches the plain pass would use, and every path sums through engine.evaluate.accumulate,
        so the figures agree. The plain pass is engine.evaluate.evaluate_dataset, shared with the evaluation of saved
        checkpoints; it restores every submodule's train/eval mode afterwards (`module`, when given, is evaluated
        instead of the trainer's own model and is left as it was)."""
        ds = self.eval_sets.get(split)
        if ds is None or len(ds) == 0:
            raise PgError(f"there is no {split} split in this dataset")
        # under DDP every process evaluates the whole split on its unwrapped model: no collectives, same figures
        net = module if module is not None else (self.built.module if self.world.active else self.net)
        classes = len(self.splits.classes)
        cached = self._fcache.get(split) if (module is None and self._cache_valid()) else None
        if cached is not None:
            with E._EvalMode(net):
                res = E.accumulate(self._cached_eval_batches(cached), self.loss_fn, collect, classes)
        elif self._icache_on() and split in self._icache:
            keys = list(D.EpochSampler(len(ds), self.cfg.seed, 0, shuffle=False))
            with E._EvalMode(net):
                res = E.accumulate(((None, None, bad) if x is None else (self._forward_eval(net, x), y.to(x.device), bad)
                                    for x, y, _, bad in self._icache_batches(split, keys, self.eval_batch_size, 1)),
                                   self.loss_fn, collect, classes)
        else:
            res = E.evaluate_dataset(net, ds, self.loss_fn, self.runtime, self.cfg.batch_size, self.cfg.workers,
                                     self.cfg.seed, collect=collect, num_classes=classes, tta=self.cfg.tta)
        return {"split": split, **res}

    @property
    def eval_batch_size(self) -> int:
        return E.eval_batch_size(self.cfg.batch_size)

    def _forward_eval(self, net, x):
        return E.forward_tta(net, self.runtime.to_input(x), self.runtime, self.cfg.tta)

    # ---------------- the decoded-image cache
    def _icache_on(self) -> bool:
        return self._icache is not None and self._icache["key"] == self._icache_key()

    def _icache_key(self) -> tuple:
        return (self.size, self.cfg.augment, len(self.splits.train), tuple(self.splits.train[:1]),
                len(self.splits.val), str(self.runtime.device), repr(self.eval_sets["val"].transform))

    def _prepare_batches(self, note=None) -> None:
        """Choose the run's data path: the frozen-feature cache, the decoded-input cache, or the image loader."""
        self._use_cache = self._prepare_feature_cache()
        self._prepare_input_cache()

    def _train_module(self):
        """What a training batch goes through: the head alone on cached features, else the whole network."""
        return self._fcache["head"] if self._use_cache else self.net

    def _prepare_input_cache(self) -> None:
        mode = self.cfg.input_cache
        wanted = (mode == "on" or (mode == "auto" and self.runtime.device.type == "cuda")) and not self._use_cache \
            and not self.world.active
        unsupported = D.input_cache_unsupported(self.cfg) if wanted and self.cfg.augment else []
        if unsupported:
            self.notify(f"input cache off: its device augmentation cannot do {', '.join(unsupported)}; "
                        "the DataLoader applies the policy")
        if not wanted or unsupported:
            self._icache = None
            return
        if self._icache_on():
            return
        from torchvision.transforms import CenterCrop

        note = self.notify
        resize, crop, side, mean, std = IC.eval_steps(D.policy_data_config(self.built.data_config, self.cfg), self.size)
        size = crop.size[0] if isinstance(crop.size, (tuple, list)) else int(crop.size)
        desc = f"{resize!r}|{crop!r}"
        cache = {"key": self._icache_key(), "size": size, "mean": mean.to(self.runtime.device),
                 "std": std.to(self.runtime.device)}
        if self.cfg.augment:
            stored = IC.build(self.splits.train, side, resize, CenterCrop(side), desc, self.cfg.workers, note)
        else:
            stored = IC.build(self.splits.train, size, resize, crop, desc, self.cfg.workers, note)
        if stored is None:
            self._icache = None
            return
        cache["train"] = stored
        for split in ("val", "test"):
            samples = getattr(self.splits, split)
            if samples:
                st = IC.build(samples, size, resize, crop, desc, self.cfg.workers, note)
                if st is None:
                    self._icache = None
                    return
                cache[split] = st
        if stored.bad:
            self.on_bad(stored.bad)
        self._icache = cache

    def _icache_batches(self, split: str, keys: list, batch_size: int, world: int):
        """Batches from the decoded cache: (images on the device, labels, samples consumed, bad)."""
        c, stored = self._icache, self._icache[split]
        samples = getattr(self.splits, split)
        augment = split == "train" and self.cfg.augment
        dev = self.runtime.device
        for b in range(0, len(keys), batch_size):
            chunk = keys[b: b + batch_size]
            idx = [i for i, _ in chunk if stored.ok[i]]
            if not idx:
                yield None, None, len(chunk) * world, []
                continue
            u8 = torch.from_numpy(stored.array[idx])
            if dev.type == "cuda":
                u8 = u8.pin_memory()
            u8 = u8.to(dev, non_blocking=True)
            if augment:
                seeds = [s for i, s in chunk if stored.ok[i]]
                x = IC.augment_batch(u8, seeds, c["size"], c["mean"], c["std"])
            else:
                x = IC.plain_batch(u8, c["mean"], c["std"])
            y = torch.tensor([samples[i][1] for i in idx])
            yield x, y, len(chunk) * world, []

    def _cached_eval_batches(self, cached: FC.CachedSplit):
        head, feats = self._fcache["head"], cached.views[0]
        for b in range(0, len(cached.labels), self.eval_batch_size):
            idx = torch.arange(b, min(b + self.eval_batch_size, len(cached.labels)), device=feats.device)
            good = idx[cached.ok[idx]]
            if not len(good):
                continue
            with self.runtime.autocast():
                out = head(feats[good])
            yield out.float(), cached.labels[good], []

    # ---------------- the frozen-backbone feature cache
    def _cache_applicable(self) -> bool:
        trainable = {n for n, p in self.built.module.named_parameters() if p.requires_grad}
        return bool(self.cfg.feature_cache and trainable and trainable <= set(self.built.head)
                    and not isinstance(self.net, torch.nn.DataParallel) and not self.world.active
                    and not R.needs_images(self.cfg))

    def _cache_key(self) -> tuple:
        """Everything the cached features depend on: the frozen set and its weights, the transform (size, augment,
        views), the data, the device and precision, the batching of the backbone pass."""
        module = self.built.module
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        buffers = [n for n, _ in module.named_buffers()]
        return (FC.fingerprint(module, frozen + buffers), tuple(frozen), self.size, self.cfg.augment, self._views,
                self.cfg.seed, tuple(self.splits.train[:1] + self.splits.train[-1:]), len(self.splits.train),
                len(self.splits.val), str(self.runtime.device), str(self.runtime.amp_dtype), self.eval_batch_size,
                repr(self.train_set.transform), repr(self.eval_sets["val"].transform))

    @property
    def _views(self) -> int:
        return self.cfg.feature_views if self.cfg.augment else 1

    def _cache_valid(self) -> bool:
        return self._fcache is not None and self._cache_applicable() and self._fcache["key"] == self._cache_key()

    def _prepare_feature_cache(self) -> bool:
        """Build (or reuse) the cache when only the head trains; rebuilt whenever its key changes (unfreeze, new
        weights, another size or augmentation, other data)."""
        if not self._cache_applicable():
            return False
        module = self.built.module
        head_name = FC.head_module_name(self.built.head)
        views = self._views
        key = self._cache_key()
        if self._fcache is not None and self._fcache["key"] == key:
            return True
        t0 = time.perf_counter()
        n = len(self.splits.train)
        train_views, ok, bad = [], None, {}
        for v in range(views):
            if views == 1:  # one unaugmented view
                ds, keys = self.eval_sets["train"], [(i, D.sample_seed(self.cfg.seed, 0, i)) for i in range(n)]
            else:  # view v seeded as the uncached loop seeds epoch v
                ds, keys = self.train_set, [(i, D.sample_seed(self.cfg.seed, v, i)) for i in range(n)]
            f, ok, bad = FC.compute_features(module, head_name, ds, keys, self.runtime, self.eval_batch_size,
                                             self.cfg.workers)
            train_views.append(f)
        dev = train_views[0].device
        labels = torch.tensor([lab for _, lab in self.splits.train], device=dev)
        cache = {"key": key, "head": module.get_submodule(head_name) if head_name else module,
                 "train": FC.CachedSplit(train_views, labels, ok, bad)}
        for split in ("val", "test"):
            ds = self.eval_sets.get(split)
            if ds is not None and len(ds):
                keys = [(i, D.sample_seed(self.cfg.seed, 0, i)) for i in range(len(ds))]
                f, vok, vbad = FC.compute_features(module, head_name, ds, keys, self.runtime, self.eval_batch_size,
                                                   self.cfg.workers)
                cache[split] = FC.CachedSplit([f], torch.tensor([lab for _, lab in ds.samples], device=dev), vok, vbad)
        self._fcache = cache
        if bad:
            self.on_bad(list(bad.values()))
        self.notify(f"feature cache: {n} training images x {views} view(s), {train_views[0].shape[1]} features each, "
                    f"built in {time.perf_counter() - t0:.1f} s (the frozen backbone runs once, not every epoch)")
        return True

    # ---------------- checkpoint state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: a plain structure for engine.checkpoint. Nothing in it depends on
        the history that led to it: the global RNG states stored are functions of (seed, position) too."""
        module = self.built.module
        return {
            "model_spec": self.spec.to_dict(),
            "classes": list(self.splits.classes),
            "config": self.cfg.to_dict(),
            "size": self.size,
            "position": asdict(self.pos),
            "frozen": [n for n, p in module.named_parameters() if not p.requires_grad],
            "model": {k: v for k, v in module.state_dict().items()},
            "optimizer": self._optimizer_state_by_name(),
            "scheduler": {k: v for k, v in self.scheduler.state_dict().items() if k != "lr_lambdas"}
            if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": position_rng(self.cfg.seed, self.pos.step),
            "handlers": self.events.state_dict(),
            "last": {k: v for k, v in self.last.items() if isinstance(v, (int, float))},
            "run": self.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by state_dict() (the model must already be built from state['model_spec'])."""
        M.restore_weights(self.built.module, state["model"], state.get("frozen", []))
        self.pos = Position(**state["position"])
        self.last = dict(state.get("last", {}))
        self.run_id = int(state.get("run", 1))
        self.scaler_state = state.get("scaler")
        self._opt_state = state.get("optimizer") or None
        self.optimizer = None
        for h in self._recipe_handlers:  # their state comes from the checkpoint, not from before it
            self.events.remove(h)
        self._recipe_handlers = []
        self.events.load_state_dict(state.get("handlers") or {})
        self.setup()
        restore_rng(state.get("rng") or {})
