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
from . import models as M
from . import sources as SRC
from .config import TrainConfig
from .device import Runtime, resolve_runtime
from .errors import PgError
from .metrics import MetricsLog


@dataclass
class Position:
    epoch: int = 0  # completed epochs
    batch: int = 0  # batches done in the current epoch
    sample: int = 0  # samples of the current epoch's permutation consumed
    step: int = 0  # optimizer steps since the start


@dataclass
class Callbacks:
    on_batch: Callable[[dict], None] | None = None
    on_epoch: Callable[[dict], None] | None = None  # after validation; the session checkpoints here
    on_bad: Callable[[list], None] | None = None  # [(path, reason)] found while decoding
    control: Callable[[], str | None] | None = None  # between batches: apply changes; "pause" | "stop" | None
    on_note: Callable[[str], None] | None = None  # one-off information (e.g. "caching features ...")


@dataclass
class RunResult:
    outcome: str  # "done" | "paused" | "stopped"
    position: Position
    batches: int
    images: int
    seconds: float
    extra: dict = field(default_factory=dict)


def step_seed(seed: int, step: int) -> int:
    """Seed for the model's own randomness (dropout, drop-path) at a step: a function of (seed, step) only."""
    return D.sample_seed(seed, -1, step)


# ---------------------------------------------------------------- optimizer, schedule, loss
def build_optimizer(module: torch.nn.Module, head: set[str], cfg: TrainConfig) -> torch.optim.Optimizer | None:
    """Two parameter groups, head and backbone, so their learning rates can differ (discriminative fine-tuning)."""
    groups = []
    for role, scale in (("head", 1.0), ("backbone", cfg.backbone_lr_scale)):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad and ((n in head) == (role == "head"))]
        if named:
            groups.append({"params": [p for _, p in named], "names": [n for n, _ in named], "role": role,
                           "lr": cfg.lr * scale, "initial_lr": cfg.lr * scale, "lr_scale": scale})
    if not groups:
        return None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                               weight_decay=cfg.weight_decay)
    cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, steps_per_epoch: int) -> tuple[Callable[[int], float], str]:
    """The schedule as a closed-form factor of a counter, and what the counter counts ("epoch" or "step").

    Closed forms make the schedule a function of the position alone: resumable anywhere, rebuildable after a freeze
    change, and a live `set lr` simply rescales it.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    if cfg.scheduler == "step":  # torch's StepLR
        return (lambda e: cfg.gamma ** (e // cfg.step_size)), "epoch"
    if cfg.scheduler == "cosine":
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def cosine(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            t = min(1.0, (s - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * t))

        return cosine, "step"
    if cfg.scheduler == "onecycle":  # torch's OneCycleLR shape: pct_start 0.3, div 25, final div 1e4
        up = max(1, int(0.3 * total))

        def onecycle(s: int) -> float:
            lo, hi, end = 1 / 25, 1.0, 1 / 25e4
            if s < up:
                return hi + (lo - hi) * (1 + math.cos(math.pi * s / up)) / 2
            t = min(1.0, (s - up) / max(1, total - up))
            return end + (hi - end) * (1 + math.cos(math.pi * t)) / 2

        return onecycle, "step"
    return (lambda _: 1.0), "epoch"


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
def _ignore(*_args) -> None:
    return None


class Trainer:
    """Holds the model, optimizer, schedule and position of one training run, and runs its loop."""

    def __init__(self, built: M.BuiltModel, spec: M.ModelSpec, splits: D.Splits, cfg: TrainConfig,
                 log: MetricsLog | None = None, run_id: int = 1, trial: str = "", size: int = 0):
        self.built, self.spec, self.splits = built, spec, splits
        self.size = size  # image size override (0: the model's own input size)
        self.cfg = cfg
        self.log = log
        self.run_id, self.trial = run_id, trial
        self.pos = Position()
        self.last: dict[str, Any] = {}  # last train/val metrics, for `show`
        self._opt_state: dict | None = None  # optimizer state by parameter name, kept across rebuilds
        self.source: SRC.BatchSource | None = None  # where the run's batches come from (engine/sources.py::choose)
        self.scaler_state: dict | None = None
        for name, default in (("notify", _ignore), ("on_bad", _ignore), ("on_phase", _ignore)):
            if not hasattr(self, name):  # set by whoever runs the trainer: notes, bad files, progress of cache builds
                setattr(self, name, default)
        self.setup()

    # ---------------- (re)building from the config: called at the start of each run and after changes
    def setup(self) -> None:
        cfg = self.cfg
        self.world = DIST.world()
        device = cfg.device
        if self.world.active and torch.cuda.is_available():
            device = f"cuda:{self.world.local_rank}"  # DDP: one GPU per process
        self.runtime: Runtime = resolve_runtime(device, cfg.amp, cfg.channels_last, cfg.devices,
                                                self.built.is_convnet)
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
        self.loader = SRC.LoaderSource(self.data_spec())  # the reference path; `source` when no cache is chosen
        self.loss_fn = make_loss(cfg, len(self.splits.classes))
        self._rebuild_optimizer()
        self.scaler = torch.amp.GradScaler(self.runtime.device.type) if self.runtime.fp16 else None
        if self.scaler is not None and self.scaler_state:
            self.scaler.load_state_dict(self.scaler_state)

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
        fn, self._sched_unit = lr_factor(self.cfg, self.steps_per_epoch)
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
                g["lr_scale"] = 1.0 if g["role"] == "head" else self.cfg.backbone_lr_scale
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
    def run(self, epochs: int | None = None, steps: int | None = None, callbacks: Callbacks | None = None) -> RunResult:
        """Train `epochs` more epochs or `steps` more batches from the current position."""
        cb = callbacks or Callbacks()
        if self.optimizer is None:
            raise PgError("nothing to train: every parameter is frozen — `unfreeze all` or `freeze backbone`")
        if not self.splits.train:
            raise PgError("the training split is empty: attach a dataset with `data PATH`")
        start_pos = Position(**asdict(self.pos))
        target_step = self.pos.step + steps if steps is not None else None
        target_epoch = self.pos.epoch + epochs if epochs is not None else None
        if cb.on_bad:  # transitional, until run() is event-based: bad files found by a cache build go to on_bad
            self.on_bad = cb.on_bad
        self._prepare_batches(cb.on_note)
        t0, n_batches, n_images = time.perf_counter(), 0, 0
        outcome = "done"
        self._train_mode()
        while True:
            if target_step is not None and self.pos.step >= target_step:
                break
            if target_epoch is not None and self.pos.epoch >= target_epoch:
                break
            stop = False
            if self.pos.sample >= len(self.splits.train):  # every batch done, the epoch's end not (it raised)
                self._end_epoch(cb)
                continue
            for x, y, nkeys, bad in self._batches():
                request = DIST.agree(cb.control() if cb.control else None, self.runtime.device)
                if request in ("pause", "stop"):
                    outcome = "paused" if request == "pause" else "stopped"
                    stop = True
                    break
                if bad and cb.on_bad:
                    cb.on_bad(bad)
                tb = time.perf_counter()
                row = self._train_batch(x, y, nkeys)
                n_batches += 1
                n_images += row["images"]
                row["seconds"] = time.perf_counter() - tb
                if self.log is not None:
                    self.log.append(row)
                if cb.on_batch:
                    cb.on_batch(dict(row, batches=self.steps_per_epoch_now, elapsed=time.perf_counter() - t0,
                                     done=n_images))
                if self.pos.sample >= len(self.splits.train):
                    self._end_epoch(cb)
                    break
                if target_step is not None and self.pos.step >= target_step:
                    break
            if stop:
                break
        self._flush_log()
        return RunResult(outcome, Position(**asdict(self.pos)), n_batches, n_images, time.perf_counter() - t0,
                         {"start": start_pos})

    @property
    def steps_per_epoch_now(self) -> int:
        """Batches in the current epoch (the remainder at today's batch size, plus the ones already done)."""
        left = len(self.splits.train) - self.pos.sample
        return self.pos.batch + max(0, math.ceil(left / self.cfg.batch_size))

    def _batches(self):
        """(x, y, samples consumed, bad files) from the current position to the end of the epoch, read straight
        through the run's source (images, decoded images or stored features: the same order and position)."""
        w = self.world
        yield from self.source.train_batches(self.pos.epoch, self.pos.sample, w.rank, w.size, self.cfg.batch_size)

    def _train_mode(self) -> None:
        self.net.train()
        M.frozen_bn_to_eval(self.built.module)

    def _train_batch(self, x, y, nkeys: int) -> dict:
        lr = self.lr
        if x is None:  # every image of the batch was bad: nothing to learn from, position still advances
            loss_v, acc, n = float("nan"), float("nan"), 0
        else:
            torch.manual_seed(step_seed(self.cfg.seed, self.pos.step))
            x, y = self.runtime.to_input(x), y.to(self.runtime.device, non_blocking=True)
            with self.runtime.autocast():
                out = self._train_module()(x)
            loss = self.loss_fn(out.float(), y)
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            n = len(y)
            loss_v, correct = loss.item(), (out.argmax(1) == y).sum().item()
            if self.world.active:  # the global batch's figures, as one process would log them
                loss_sum, correct, n = DIST.all_sum([loss_v * n, correct, n], self.runtime.device)
                loss_v, n = loss_sum / n, int(n)
            acc = correct / n
        # the position advances only once the step is done: a batch that raised (out of memory) is trained again
        self.pos.sample += nkeys
        self.pos.batch += 1
        self.pos.step += 1
        if self._sched_unit == "step":
            self.scheduler.step()
        if n:  # the epoch's running means (kept in `last`, so they survive a resume mid-epoch)
            sums = [self.last.get("epoch_loss_sum", 0.0) + loss_v * n, self.last.get("epoch_correct", 0.0) + acc * n,
                    self.last.get("epoch_n", 0) + n]
            self.last.update(epoch_loss_sum=sums[0], epoch_correct=sums[1], epoch_n=sums[2],
                             train_loss=sums[0] / sums[2], train_accuracy=sums[1] / sums[2])
        return {"step": self.pos.step, "epoch": self.pos.epoch + 1, "batch": self.pos.batch, "split": "train",
                "loss": loss_v, "accuracy": acc, "lr": lr, "images": n, "run": self.run_id, "trial": self.trial}

    def _end_epoch(self, cb: Callbacks) -> None:
        epoch = self.pos.epoch + 1
        val = self.evaluate("val") if self.splits.val else None
        self.pos.epoch, self.pos.batch, self.pos.sample = epoch, 0, 0
        for k in ("epoch_loss_sum", "epoch_correct", "epoch_n"):
            self.last.pop(k, None)
        if self._sched_unit == "epoch":
            self.scheduler.step()
        if val is not None:
            self.last.update(val_loss=val["loss"], val_accuracy=val["accuracy"], val_epoch=epoch)
            if self.log is not None:
                self.log.append({"step": self.pos.step, "epoch": epoch, "batch": 0, "split": "val",
                                 "loss": val["loss"], "accuracy": val["accuracy"], "lr": self.lr,
                                 "images": val["n"], "run": self.run_id, "trial": self.trial})
        self._train_mode()
        if cb.on_epoch:
            cb.on_epoch({"epoch": epoch, "step": self.pos.step, "val": val, "train_loss": self.last.get("train_loss"),
                         "train_accuracy": self.last.get("train_accuracy")})

    def _flush_log(self) -> None:
        if self.log is not None:
            self.log.sync()

    # ---------------- batch sources (engine/sources.py)
    def data_spec(self) -> SRC.DataSpec:
        """What the batch sources depend on, as of now."""
        return SRC.DataSpec(self.splits, self.built.data_config, self.size, self.cfg, self.runtime, self.built.module,
                            list(self.built.head), self.world.active, isinstance(self.net, torch.nn.DataParallel))

    def _prepare_batches(self, note: Callable[[str], None] | None = None) -> None:
        """Choose this run's batch source (once, at the start of a run): reused while valid, else built — a feature
        pass or a decode can take a while, reported through on_phase."""
        report = SRC.Report(notify=note or self.notify, bad=self.on_bad, phase=self.on_phase)
        self.source = SRC.choose(self.data_spec(), self.source, self.loader, report)

    def _train_module(self) -> torch.nn.Module:
        """What training batches go through: the model, or only its head when the batches are stored features."""
        return self.source.module(self.net)

    def _eval_source(self, module: torch.nn.Module | None) -> SRC.BatchSource:
        """The run's source while it still matches the model and settings (else the DataLoader); images for a
        module given from outside (a feature cache holds the features of the trainer's own backbone only)."""
        spec = self.data_spec()
        src = (self.source if self.source is not None and self.source.valid_for(spec) else self.loader).bind(spec)
        return src if module is None else src.images

    # ---------------- evaluation
    def evaluate(self, split: str = "val", collect: bool = False, module: torch.nn.Module | None = None) -> dict:
        """Loss and accuracy over a split with the eval transform; `collect` also returns logits and labels.

        The batches come from the run's source (the feature cache: stored features through the head; the input
        cache: stored eval crops through the model; otherwise the DataLoader) in the batches the plain pass would
        use, and every path sums through engine.evaluate.accumulate, so the figures agree. Every submodule's
        train/eval mode is restored afterwards (`module`, when given, is evaluated instead of the trainer's own model
        and is left as it was)."""
        if split not in ("train", "val", "test") or not getattr(self.splits, split):
            raise PgError(f"there is no {split} split in this dataset")
        src = self._eval_source(module)
        # under DDP every process evaluates the whole split on its unwrapped model: no collectives, same figures
        net = module if module is not None else src.module(self.built.module if self.world.active else self.net)
        dev = self.runtime.device

        def outputs():
            for x, y, bad in src.eval_batches(split, self.eval_batch_size):
                yield (None, None, bad) if x is None else (self._forward_eval(net, x), y.to(dev), bad)

        with torch.no_grad(), E._EvalMode(net):
            res = E.accumulate(outputs(), self.loss_fn, collect, len(self.splits.classes))
        return {"split": split, **res}

    @property
    def eval_batch_size(self) -> int:
        return E.eval_batch_size(self.cfg.batch_size)

    def _forward_eval(self, net, x):
        with self.runtime.autocast():
            return net(self.runtime.to_input(x)).float()

    # ---------------- checkpoint state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: a plain structure for engine.checkpoint."""
        module = self.built.module
        py_state = random.getstate()
        np_state = np.random.get_state()
        rng = {"python": [py_state[0], list(py_state[1]), py_state[2]],
               "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
               "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            rng["cuda"] = torch.cuda.get_rng_state_all()
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
            "rng": rng,
            "last": {k: v for k, v in self.last.items() if isinstance(v, (int, float))},
            "run": self.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a state written by state_dict() (the model must already be built from state['model_spec'])."""
        module = self.built.module
        try:
            missing, unexpected = module.load_state_dict(state["model"], strict=False)
        except RuntimeError as e:
            raise PgError(f"the checkpoint's weights do not fit this model: {str(e).splitlines()[0]}") from None
        if missing or unexpected:
            raise PgError(f"the checkpoint's weights do not fit this model ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected tensors): was it saved from another model?")
        frozen = set(state.get("frozen", []))
        for n, p in module.named_parameters():
            p.requires_grad = n not in frozen
        self.pos = Position(**state["position"])
        self.last = dict(state.get("last", {}))
        self.run_id = int(state.get("run", 1))
        self.scaler_state = state.get("scaler")
        self._opt_state = state.get("optimizer") or None
        self.optimizer = None
        self.setup()
        rng = state.get("rng") or {}
        if "python" in rng:
            v, internal, gauss = rng["python"]
            random.setstate((v, tuple(internal), gauss))
        if "numpy" in rng:
            kind, keys, *rest = rng["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
