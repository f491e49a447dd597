"""The training loop: the only one in pgshell. Training, pause/resume, lrfind, tuning trials and cached-feature
training all run through `Trainer.run`, which fires the events of events.py; every feature (the metrics log,
progress, checkpoints, EMA, mixup, accumulation, early stopping, the session's control) is a handler attached to them.

Data flow of one batch: the run's batch source (engine/batches: the DataLoader, the decoded-input cache or stored
features) yields batches from the current position -> `before_batch` (the session's Control applies queued changes
and turns a pause or stop into a request, honoured here) -> Runtime moves the batch to the device/layout -> forward
under autocast -> loss (`after_loss`) -> backward (GradScaler for fp16) -> `before_step` -> optimizer step
(`after_step`) -> per-step schedule -> the position advances -> `after_batch` (the metrics row). At an epoch's last
batch: `before_validate`, the evaluation pass, `after_validate`, the per-epoch schedule, `after_epoch` (the
CheckpointSaver writes the epoch checkpoint there).

The position counts samples of the epoch's permutation and optimizer steps (`step`: under `accumulate K` one step is
K batches), so a run paused anywhere and resumed in a new process continues with exactly the batches it would have
seen; handlers' state is in the checkpoint by key.
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

from ..data.folders import Splits
from ..data.loading import ImageDataset
from ..data.sampling import derived_seed, sample_seed
from . import distributed as DIST
from ..report import evaluate as E
from ..models.freezing import frozen_bn_to_eval
from ..models.spec import BuiltModel, ModelSpec
from ..models.weights import restore_weights
from . import recipes as R
from ..batches.choice import choose
from ..batches.interface import BatchSource, DataSpec, LoaderSource, Report
from ..config import TrainConfig
from .device import Runtime, resolve_runtime
from ..errors import PgError
from .events import Ctx, Events, Handler
from .metrics import MetricsLog, MetricsLogger
from .optim import build_optimizer, load_state_by_name, set_momentum, state_by_name
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
    return sample_seed(seed, -1, step)


# ---------------------------------------------------------------- loss (the optimizer: engine/train/optim.py)
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

    def __init__(self, built: BuiltModel, spec: ModelSpec, splits: Splits, cfg: TrainConfig,
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
        self.source: BatchSource | None = None  # where the run's batches come from (engine/batches/choice.py::choose)
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
        self.loader = LoaderSource(self.data_spec())  # the reference path; `source` when no cache is chosen
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
        """Batches in an epoch at today's batch size (optimizer steps too, unless `accumulate` > 1)."""
        return max(1, math.ceil(len(self.splits.train) / self.cfg.batch_size))

    # A step is an optimizer step everywhere: the position's `step`, `train --steps K`, checkpoints' step-N names,
    # metrics rows, the per-step schedule and seeds, `tune --steps`. Under `accumulate K` one step is K batches.
    @property
    def optimizer_steps_per_epoch(self) -> int:
        return R.optimizer_steps_per_epoch(self.steps_per_epoch, self.cfg.accumulate)

    def steps_to_epoch(self, epoch: int) -> int:
        """Optimizer steps from the position to the end of epoch `epoch` (completed epochs, as `pos.epoch` counts
        them), at today's batch size: what a `train N` run trains, what its ETA and the schedule notice count."""
        if self.pos.epoch >= epoch:
            return 0
        k = max(1, self.cfg.accumulate)
        this = R.optimizer_steps_per_epoch(self.steps_per_epoch_now, k) - self.pos.batch // k
        return this + (epoch - self.pos.epoch - 1) * self.optimizer_steps_per_epoch

    def _rebuild_optimizer(self) -> None:
        """New optimizer for the currently trainable parameters; state carried over by parameter name."""
        if getattr(self, "optimizer", None) is not None:
            self._opt_state = self._optimizer_state_by_name()
        self.optimizer = build_optimizer(self.built.module, set(self.built.head), self.cfg)
        if self.optimizer is None:
            self.scheduler = None
            return
        if self._opt_state and self._opt_state.get("type") == self.cfg.optimizer:
            load_state_by_name(self.optimizer, self._opt_state)
        fn, self._sched_unit = lr_factor(self.cfg, self.optimizer_steps_per_epoch)
        count = self.pos.epoch if self._sched_unit == "epoch" else self.pos.step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, fn, last_epoch=count - 1)

    def optimizer_state(self) -> dict:
        """The optimizer's state by parameter name (what checkpoints hold), also of parameters frozen now."""
        return self._optimizer_state_by_name()

    def load_optimizer_state(self, state: dict) -> None:
        """Take an optimizer state by parameter name (a copy's own: lrfind's twin of the session's trainer); it
        applies if it was made by the optimizer in force."""
        self._opt_state = state
        self._rebuild_optimizer()

    def _optimizer_state_by_name(self) -> dict:
        if self.optimizer is None:
            return self._opt_state or {}
        kept = self._opt_state if (self._opt_state or {}).get("type") == self.cfg.optimizer else None
        return state_by_name(self.optimizer, self.cfg.optimizer, kept)

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
                set_momentum(g, value)
            elif name == "weight_decay":
                g["weight_decay"] = 0.0 if g.get("decay") is False else value
        if name == "weight_decay" and value > 0 and any(g.get("decay") is None for g in self.optimizer.param_groups):
            self._rebuild_optimizer()  # built without decay: norm and bias parameters need groups of their own now
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

    def remove_handler(self, handler: Handler, keep_state: bool = False) -> None:
        self.events.remove(handler, keep_state)

    def run(self, epochs: int | None = None, steps: int | None = None, handlers: list | tuple = ()) -> RunResult:
        """Train `epochs` more epochs or `steps` more optimizer steps (batches, unless `accumulate` > 1) from the
        current position; `handlers` attach for this run only. Returns with outcome "done", "paused" or "stopped" (a request), or raises (on_exception first)."""
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
                self.remove_handler(h, keep_state=True)
        tally.position, tally.seconds = Position(**asdict(self.pos)), time.perf_counter() - t0
        ctx.outcome = tally.outcome
        for h in handlers:  # their after_fit still sees the run's end
            self.add_handler(h)
        try:
            self.events.fire("after_fit", self, ctx)
        finally:  # a keyed one's state stays for the checkpoint the caller writes next (a pause), and its next run
            for h in handlers:
                self.remove_handler(h, keep_state=True)
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
        """(x, y, samples consumed, bad files) from the current position to the end of the epoch, read straight
        through the run's source (images, decoded images or stored features: the same order and position)."""
        w = self.world
        yield from self.source.train_batches(self.pos.epoch, self.pos.sample, w.rank, w.size, self.cfg.batch_size)

    def _train_mode(self) -> None:
        self.net.train()
        keep = self.cfg.bn_stats == "frozen" or (self.cfg.bn_stats == "auto" and self.built.loaded)
        frozen_bn_to_eval(self.built.module, every=keep)

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
        seed = step_seed(self.cfg.seed, self.pos.step) if self.cfg.accumulate == 1 else \
            derived_seed("pgshell-micro", self.cfg.seed, self.pos.epoch, self.pos.sample)
        if self.runtime.device.type == "cpu":  # the same stream as torch.manual_seed, at 1 µs instead of ~100:
            torch.default_generator.manual_seed(seed)  # manual_seed also (lazily) seeds every accelerator
        else:
            torch.manual_seed(seed)
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

    # ---------------- batch sources (engine/batches)
    def data_spec(self) -> DataSpec:
        """What the batch sources depend on, as of now."""
        return DataSpec(self.splits, self.built.data_config, self.size, self.cfg, self.runtime, self.built.module,
                        list(self.built.head), self.world.active, isinstance(self.net, torch.nn.DataParallel))

    def _prepare_batches(self, note: Callable[[str], None] | None = None) -> None:
        """Choose this run's batch source (once, at the start of a run): reused while valid, else built — a feature
        pass or a decode can take a while, reported through on_phase."""
        report = Report(notify=note or self.notify, bad=self.on_bad, phase=self.on_phase)
        self.source = choose(self.data_spec(), self.source, self.loader, report)

    def _train_module(self) -> torch.nn.Module:
        """What training batches go through: the model, or only its head when the batches are stored features."""
        return self.source.module(self.net)

    def _eval_source(self, module: torch.nn.Module | None) -> BatchSource:
        """The run's source while it still matches the model and settings (else the DataLoader); images for a
        module given from outside (a feature cache holds the features of the trainer's own backbone only)."""
        spec = self.data_spec()
        src = (self.source if self.source is not None and self.source.valid_for(spec) else self.loader).bind(spec)
        return src if module is None else src.images

    # ---------------- evaluation
    def evaluate(self, split: str = "val", collect: bool = False, module: torch.nn.Module | None = None,
                 tta: str | None = None) -> dict:
        """Loss and accuracy over a split with the eval transform; `collect` also returns logits and labels.

        The batches come from the run's source (the feature cache: stored features through the head; the input
        cache: stored eval crops through the model; otherwise the DataLoader) in the batches the plain pass would
        use, and every path sums through engine.report.evaluate.accumulate, so the figures agree. Every submodule's
        train/eval mode is restored afterwards (`module`, when given, is evaluated instead of the trainer's own model
        and is left as it was). `tta` overrides the `tta` setting for this pass; asking for flips where the run's
        batches are stored features evaluates on the images instead (a feature cannot be mirrored)."""
        tta = self.cfg.tta if tta is None else tta
        if split not in ("train", "val", "test") or not getattr(self.splits, split):
            raise PgError(f"there is no {split} split in this dataset")
        src = self._eval_source(module)
        if tta != "none" and src is not src.images:
            src, module = src.images, module if module is not None else self.built.module
        # under DDP every process evaluates the whole split on its unwrapped model: no collectives, same figures
        net = module if module is not None else src.module(self.built.module if self.world.active else self.net)
        dev = self.runtime.device

        def outputs():
            for x, y, bad in src.eval_batches(split, self.eval_batch_size):
                yield (None, None, bad) if x is None else (self._forward_eval(net, x, tta), y.to(dev), bad)

        with torch.no_grad(), E.EvalMode(net):
            res = E.accumulate(outputs(), self.loss_fn, collect, len(self.splits.classes))
        return {"split": split, **res}

    def eval_dataset(self, split: str) -> ImageDataset:
        """A split's images through the evaluation transform (the settings' evaluation policy in force), as the
        epoch-end validation reads them: for passes outside the loop (`errors`, `probe`)."""
        return self.data_spec().dataset(split, train=False)

    @property
    def eval_batch_size(self) -> int:
        return E.eval_batch_size(self.cfg.batch_size)

    def _forward_eval(self, net, x, tta: str | None = None):
        tta = (self.cfg.tta if tta is None else tta) if x.dim() == 4 else "none"  # features: nothing to mirror
        return E.forward_tta(net, self.runtime.to_input(x), self.runtime, tta)

    # ---------------- checkpoint state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: a plain structure for store/checkpoint.py. Nothing in it depends on
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
        restore_weights(self.built.module, state["model"], state.get("frozen", []))
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
