"""One session: the model, the data, the settings, the trainer, and the one worker thread that trains.

The shell calls these methods from its own thread. Training runs in the worker thread; the shell never waits for it
unless asked (`wait`, or a script). Pause and stop are Events the loop checks between batches; every other change
made while training goes through a queue the loop drains between batches, so there is no moment where two threads
touch the model. The worker never prints: it reports through `notify` (alerts) and `status` (the toolbar).

Files: `sessions/NAME.session` (JSON, versioned) points to the folder `sessions/NAME/` holding `checkpoints/`,
`metrics.csv`, `quarantine.txt` and `errors.log`. The session file is rewritten at every checkpoint, so the pair
always agrees; on reopen the newest checkpoint that verifies is loaded.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import re
import threading
import traceback
from concurrent.futures import Future
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .engine.config import TrainConfig, is_live, parse_value
from .engine.errors import PgError

SESSION_FORMAT = "pgshell-session"
SESSION_VERSION = 1


def _disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def _disk_full_message(folder: Path | None) -> str:
    return (f"the disk is full (saving to {folder}): free some space, then `save` (or `continue`) — the last "
            "checkpoint is intact")


def _checked(value: Any, what: str, fields: dict[str, type | tuple], required: bool = True) -> dict | None:
    """A dict from a session file with only `fields`, each of its type (all of them if `required`, else at least
    one); anything else is a hand edit, reported as a TypeError naming it."""
    if value is None:
        return None
    present = value.keys() & fields.keys() if isinstance(value, dict) else set()
    if (not present or set(value) - present
            or not all(isinstance(value.get(k), fields[k]) and not isinstance(value.get(k), bool)
                       for k in (fields if required else present))):
        raise TypeError(f"'{what}' should be {{{', '.join(fields)}}}, not {value!r}"[:200])
    return value


def _check_optimizer_state(state: dict, module) -> None:
    """The optimizer state's tensors have their parameters' shapes: a hand-edited one would only fail at the next
    training step, far from its cause."""
    opt = state.get("optimizer")
    if opt is None:
        return
    shapes = {n: p.shape for n, p in module.named_parameters()}
    for name, entries in opt["state"].items():
        for key, value in entries.items():
            if name in shapes and getattr(value, "ndim", 0) and value.shape != shapes[name]:  # "step" is 0-dim
                raise ValueError(f"optimizer state {key} of {name} has shape {tuple(value.shape)}, "
                                 f"the parameter {tuple(shapes[name])}")


class _LazyCheckpoint:
    """engine.checkpoint imports torch: load it on first use so the shell starts fast."""

    def __getattr__(self, name):
        from .engine import checkpoint

        return getattr(checkpoint, name)


C = _LazyCheckpoint()


class Session:
    def __init__(self, root: str | os.PathLike = "sessions", notify: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.config = TrainConfig()
        self.notify = notify or (lambda msg: None)
        self.spec = None  # engine.models.ModelSpec
        self.built = None  # engine.models.BuiltModel
        self.data: dict | None = None  # {"path", "split", "size"}
        self.splits = None  # engine.data.Splits
        self.trainer = None  # engine.train.Trainer
        self.name: str | None = None
        self.file: Path | None = None
        self.latest_checkpoint: Path | None = None
        self.best: dict | None = None  # {"path", "value", "epoch"}
        self.status: dict[str, Any] = {"state": "idle"}
        self.batch_listeners: list[Callable[[dict], None]] = []  # called by the worker after each batch
        self.epoch_listeners: list[Callable[[dict], None]] = []  # called by the worker after each epoch's checkpoint
        self.end_listeners: list[Callable[[str], None]] = []  # called by the worker when a job ends: its outcome
        self.dirty = False
        self._saving = False
        self._quarantined: set[str] | None = None  # the paths in quarantine.txt (read at first use)
        self._unfiled: list[tuple[str, str]] = []  # bad files found before the session had a folder
        self.run_counter = 0
        self._target: dict | None = None  # what the paused/active training run is training towards
        self._job: tuple[str, Callable] | None = None  # the running or paused background job: (label, fn)
        self._pending_state: dict | None = None  # a checkpoint loaded before data was attached
        self._quarantined: set[str] | None = None  # the paths in quarantine.txt (read at first use)
        self._unfiled: list[tuple[str, str]] = []  # bad files found before the session had a folder
        self._log = None
        self._lock = threading.Lock()
        self._changes: queue.Queue = queue.Queue()
        self._pause = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._jobs: queue.Queue = queue.Queue()
        self._running = False
        self._worker = threading.Thread(target=self._work, name="pgshell-worker", daemon=True)
        self._worker.start()

    # ================================================================ state queries
    @property
    def running(self) -> bool:
        return self._running

    @property
    def paused(self) -> bool:
        return (self._job is not None or self._target is not None) and not self._running

    @property
    def folder(self) -> Path | None:
        return self.root / self.name if self.name else None

    # ================================================================ model and data
    @staticmethod
    def list_models(pattern: str = "") -> list[dict]:
        from .engine.models import list_models

        return list_models(pattern)

    def load_model(self, name: str, pretrained: bool = False, weights: str = "", classes: int | None = None) -> str:
        """Build a model and give it a fresh head for the data's classes (or `classes`)."""
        from .engine import models as M
        import torch

        self._refuse_while_training("load a model")
        if self.splits is not None:
            n = len(self.splits.classes)
            if classes is not None and classes != n:
                raise PgError(f"the attached data has {n} classes; drop --classes or attach other data")
        elif classes is None:
            raise PgError("how many classes? attach data first (`data PATH`) or give `--classes N`")
        else:
            n = classes
        if n < 2:
            raise PgError("--classes must be at least 2")
        spec = M.ModelSpec(name=name, num_classes=n, pretrained=pretrained, weights=weights)
        torch.manual_seed(self.config.seed)  # the new head's initialisation follows the seed
        built = M.build_model(spec)
        self.spec, self.built = spec, built
        self.trainer, self._target, self._job, self._pending_state = None, None, None, None
        self.dirty = True
        trainable, total = M.count_params(built.module)
        notes = "".join(f"\n{note}" for note in built.notes)
        return f"{built.full_name}: {total:,} parameters ({trainable:,} trainable), head -> {n} classes{notes}"

    def attach_data(self, path: str, split: float = 0.2, size: int = 0, check: bool = False) -> Any:
        """Scan an image folder into splits. `check` also decodes every image, adding those that fail to
        `splits.rejected` (they stay in their split, skipped when loaded, so the split is the same either way)."""
        from .engine import data as D

        self._refuse_while_training("change the data")
        if not (0.0 < split < 1.0):
            raise PgError(f"--split must be between 0 and 1 (the validation fraction), not {split}")
        if size < 0 or size > 4096:
            raise PgError(f"--size must be between 1 and 4096 pixels (0: the model's own), not {size}")
        splits = D.scan_folder(path, split=split, seed=self.config.seed)
        if check:
            splits.rejected += D.find_undecodable(p for p, _ in splits.train + splits.val + (splits.test or []))
        self.splits = splits
        self.data = {"path": str(Path(path).resolve()), "split": split, "size": size}
        self.trainer, self._target, self._job = None, None, None
        self.dirty = True
        self._quarantine(splits.rejected)
        if self.spec is not None and self.spec.num_classes != len(splits.classes):
            from .engine import models as M
            import torch

            self.spec = M.ModelSpec(**{**self.spec.to_dict(), "num_classes": len(splits.classes)})
            torch.manual_seed(self.config.seed)
            self.built = M.build_model(self.spec)
            self.notify(f"model rebuilt with a {len(splits.classes)}-class head for this data")
        return splits

    def freeze(self, what: list[str], unfreeze: bool = False) -> tuple[int, int]:
        from .engine import models as M

        if self.built is None:
            raise PgError("no model yet: `load MODEL` first")

        def change():
            (M.unfreeze if unfreeze else M.freeze)(self.built, what)
            if self.trainer is not None:
                self.trainer.params_changed()

        self._apply(change)
        self.dirty = True
        return M.count_params(self.built.module)

    def random_backbone_warning(self) -> str:
        """`freeze` on a backbone that was never pretrained nor trained: a line saying so (engine.models), or ""."""
        from .engine import models as M

        steps = self.trainer.pos.step if self.trainer is not None else \
            int(((self._pending_state or {}).get("position") or {}).get("step", 0))
        return M.random_backbone_warning(self.built, self.spec, steps) if self.built is not None else ""

    def data_hints(self) -> list[str]:
        """What `data` should point out about the attached images: a milder augmentation for small images, and
        class imbalance (engine.data)."""
        from .engine import data as D

        if self.splits is None:
            return []
        size = (self.data or {}).get("size", 0)
        hints = (D.small_image_hint(self.splits, size, self.config), D.imbalance_warning(self.splits))
        return [h for h in hints if h]

    def set(self, name: str, value: Any) -> str:
        """Change a setting. Live ones apply at the next batch; the others when training next starts."""
        value = parse_value(name, value)
        if name == "tensorboard" and value:
            from .engine import tensorboard as TB

            if not TB.available():
                raise PgError(TB.INSTALL)
        old = getattr(self.config, name)
        self.config = self.config.replace(**{name: value})
        self.dirty = True
        if self.trainer is None or old == value:
            return ""
        if is_live(name):
            self._apply(lambda: self.trainer.apply_live(name, value))
            return "applies at the next batch" if self.running else ""
        if self.running:
            return f"{name} applies when training next starts: `pause` then `continue` to use it now"
        return ""

    # ================================================================ training
    def train(self, epochs: int | None = None, steps: int | None = None) -> str:
        if self.running:
            raise PgError("training is already running: `pause`, `stop` or `wait` first")
        if epochs is not None and epochs < 1 or steps is not None and steps < 1:
            raise PgError("train takes a positive number of epochs (train 5) or steps (train --steps 100)")
        if self.built is not None and not any(p.requires_grad for p in self.built.module.parameters()):
            # the trainer says so too, but only once the session is named and the run started
            raise PgError("nothing to train: every parameter is frozen — `unfreeze all` or `freeze backbone`")
        trainer = self._ensure_trainer()
        if epochs is None and steps is None:
            epochs = self.config.epochs - trainer.pos.epoch
            if epochs < 1:
                raise PgError(f"already trained {trainer.pos.epoch} epochs (epochs = {self.config.epochs}): "
                              "`train N` for N more")
        if steps is not None:
            self._target = {"step": trainer.pos.step + steps}
        else:
            self._target = {"epoch": trainer.pos.epoch + epochs}
        self._start()
        return self._describe_target()

    def resume(self) -> str:
        if self.running:
            raise PgError("training is already running")
        if self._job is not None and self._job[0] != "train":
            self.start_job(*self._job)  # a paused job of another kind (a tuning study, ...)
            return f"continuing {self._job[0]}"
        if self._target is None:
            raise PgError("nothing to continue: no run is paused — `train N` starts one")
        tr = self._ensure_trainer()
        if tr.pos.step >= self._target.get("step", float("inf")) or tr.pos.epoch >= self._target.get("epoch", float("inf")):
            self._target = None
            raise PgError("nothing to continue: the last run reached its end — `train N` for more")
        self._start()
        return self._describe_target()

    def pause(self, timeout: float = 120.0) -> bool:
        """Ask the run to pause after the current batch; returns True once it has (checkpoint written)."""
        if not self.running:
            return True
        self._pause.set()
        return self._idle.wait(timeout)

    def request_pause(self) -> None:
        """Non-blocking pause (Ctrl-C)."""
        if self.running:
            self._pause.set()

    def stop(self, timeout: float = 120.0) -> bool:
        if not self.running:
            had = self._target is not None or self._job is not None
            self._target, self._job = None, None
            return had
        self._stop.set()
        ok = self._idle.wait(timeout)
        return ok

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current run finishes or pauses; True if it did within `timeout`."""
        return self._idle.wait(timeout)

    def _describe_target(self) -> str:
        t, pos = self._target, self.trainer.pos
        if "step" in t:
            return f"training {t['step'] - pos.step} steps (to step {t['step']})"
        left = t["epoch"] - pos.epoch
        return f"training {left} epoch{'s' * (left != 1)} (epoch {pos.epoch + 1} to {t['epoch']})"

    def ensure_trainer(self):
        """The session's trainer, built on first use (model and data checked, the session named, a reopened
        checkpoint loaded), as `train` would: for session-level extensions such as pgshell.tuning."""
        return self._ensure_trainer()

    def _ensure_trainer(self):
        from .engine.metrics import MetricsLog
        from .engine.train import Trainer

        if self.built is None:
            raise PgError("no model yet: `load MODEL` first (e.g. `load resnet18 --pretrained`)")
        if self.splits is None:
            raise PgError("no data yet: `data PATH` attaches an image folder")
        if self.trainer is None:  # before naming the session: a refusal leaves nothing behind
            from .engine.models import check_input_size

            check_input_size(self.built, self.data.get("size", 0))
        if self.name is None:
            self._choose_name()
        if self._log is None and self._writes:
            self._log = MetricsLog(self.folder / "metrics.csv")
        if self.trainer is None:
            self.trainer = Trainer(self.built, self.spec, self.splits, self.config, log=self._log,
                                   size=self.data.get("size", 0))
            if self._pending_state is not None:
                self.trainer.load_state_dict(self._pending_state)
                self._pending_state = None
        elif self.trainer.cfg != self.config:
            self.trainer.reconfigure(self.config)
        return self.trainer

    def _start(self) -> None:
        if self.config.tensorboard:
            from .analysis import attach_tensorboard

            attach_tensorboard(self)  # event files for this run; closed by an end listener when it ends
        self.trainer.run_id = max(self.trainer.run_id, 0) + 1
        self.start_job("train", self._train_job)

    # ================================================================ the worker thread
    def start_job(self, label: str, fn: Callable[[Callable[[], str | None]], str]) -> None:
        """Run `fn(control)` in the worker thread and return at once. Every background job (training, a tuning
        study, an LR range test) goes through here, so `pause`, `continue`, `stop`, `wait` and the toolbar work
        the same for all. `fn` calls `control()` between batches ("pause" | "stop" | None; it also applies queued
        changes) and returns "done", "paused" or "stopped"; a paused job is run again by `continue`."""
        if self.running:
            raise PgError("something is already running: `pause`, `stop` or `wait` first")
        with self._lock:
            self._pause.clear()
            self._stop.clear()
            self._idle.clear()
            self._running = True
            self._job = (label, fn)
            self.run_counter += 1
            self.status = {"state": "training", "job": label}
        self._jobs.put(("job", fn))
        self.dirty = True

    def control(self) -> str | None:
        """Called by a job between batches: applies queued changes; says whether to pause or stop."""
        self._drain_changes()
        if self._stop.is_set():
            return "stop"
        if self._pause.is_set():
            return "pause"
        return None

    def _work(self) -> None:
        while True:
            kind, fn = self._jobs.get()
            if kind == "quit":
                return
            outcome = "paused"
            try:
                outcome = fn(self.control)
            except BaseException as e:  # the worker must survive anything: report, pause, keep the shell alive
                self._report_error(e)
            finally:
                for listener in list(self.end_listeners):  # before _idle is set: a waiter sees their files closed
                    try:
                        listener(outcome)
                    except Exception as e:
                        self.notify(f"warning: {type(e).__name__}: {e}")
                with self._lock:
                    self._drain_changes()
                    if outcome != "paused":
                        self._job = None
                    self._running = False
                    self.status["state"] = "paused" if self._job else "idle"
                    self._idle.set()

    def _train_job(self, control: Callable[[], str | None]) -> str:
        from .engine.train import Callbacks

        tr, t = self.trainer, self._target
        seen = [0]

        def on_batch(info):
            seen[0] = info["done"]
            el = max(info["elapsed"], 1e-9)
            rate = seen[0] / el
            if "step" in t:
                left_b = t["step"] - tr.pos.step
            else:
                left_b = (t["epoch"] - tr.pos.epoch - 1) * tr.steps_per_epoch + (info["batches"] - info["batch"])
            eta = left_b * el / max(1, tr.pos.step - start_step)
            self.status = {"state": "training", "epoch": info["epoch"], "batch": info["batch"],
                           "batches": info["batches"], "step": info["step"], "loss": info["loss"],
                           "accuracy": info["accuracy"], "lr": info["lr"], "rate": rate, "eta": eta}
            for listener in self.batch_listeners:
                listener(info)
            if self.config.log_every and info["batch"] % self.config.log_every == 0:
                self.notify(f"epoch {info['epoch']} batch {info['batch']}/{info['batches']} "
                            f"loss {info['loss']:.4f} acc {info['accuracy']:.3f} {rate:.0f} img/s")

        def on_epoch(info):
            path = self._write_checkpoint("epoch", info)
            val = info["val"]
            if val and val.get("bad"):
                self._on_bad(val["bad"])
            msg = (f"epoch {info['epoch']} done: train loss {info['train_loss']:.4f} "
                   f"acc {info['train_accuracy']:.3f}")
            if val:
                msg += f" | val loss {val['loss']:.4f} acc {val['accuracy']:.3f}"
            self.notify(msg + f" | checkpoint {path.name}")
            for listener in self.epoch_listeners:
                listener(info)

        start_step = tr.pos.step
        cbs = Callbacks(on_batch=on_batch, on_epoch=on_epoch, on_bad=self._on_bad, control=control,
                        on_note=self.notify)
        self.status = {"state": "training", "job": "train", "epoch": tr.pos.epoch + 1}
        if "step" in t:
            res = tr.run(steps=t["step"] - tr.pos.step, callbacks=cbs)
        else:
            res = tr.run(epochs=t["epoch"] - tr.pos.epoch, callbacks=cbs)
        if res.outcome == "done":
            self._target = None
            if tr.pos.batch:  # stopped mid-epoch by a step count: a checkpoint of exactly here
                self._write_checkpoint("step")
            else:
                self._write_session_file()
            self.notify(f"done: {res.batches} batches, {res.images} images in {res.seconds:.1f} s "
                        f"({res.images / max(res.seconds, 1e-9):.0f} img/s) — at epoch {tr.pos.epoch}, "
                        f"step {tr.pos.step}")
        elif res.outcome == "paused":
            path = self._write_checkpoint("pause")
            if not self._saving:
                self.notify(f"paused at epoch {tr.pos.epoch + 1} batch {tr.pos.batch} (step {tr.pos.step}); "
                            f"checkpoint {path.name} — `continue` resumes")
        else:
            self._target = None
            path = self._write_checkpoint("pause")
            self.notify(f"stopped at step {tr.pos.step}; checkpoint {path.name}")
        return res.outcome

    def _report_error(self, e: BaseException) -> None:
        import torch

        log = (self.folder or self.root) / "errors.log"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                f.write(f"--- {datetime.now().isoformat(timespec='seconds')}\n{traceback.format_exc()}\n")
        except OSError:
            pass
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower():
            bs = (self.trainer.cfg if self.trainer is not None else self.config).batch_size  # the size that failed
            if self.trainer is not None and self.trainer.optimizer is not None:
                self.trainer.optimizer.zero_grad(set_to_none=True)  # give the half-done step's memory back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            msg = (f"out of memory at batch_size {bs}: `set batch_size {max(1, bs // 2)}` (or a smaller --size), "
                   "then `continue`")
        elif _disk_full(e):
            msg = _disk_full_message(self.folder)
        elif isinstance(e, PgError):
            msg = str(e)
        else:
            msg = f"training stopped by an error: {type(e).__name__}: {str(e)[:200]} (full trace in {log})"
        self.status = {"state": "paused", "error": msg}
        self.notify(f"error: {msg}")
        if self.trainer is not None and self._target is not None:
            self.notify("the run is paused; the last checkpoint is intact")

    def _apply(self, change: Callable[[], Any]) -> Any:
        """Run `change` now if idle, or queue it for the worker's next batch boundary; returns its result."""
        with self._lock:
            if not self._running:
                return change()
            fut: Future = Future()
            self._changes.put((change, fut))
        return fut.result(timeout=600)

    def _drain_changes(self) -> None:
        while True:
            try:
                change, fut = self._changes.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(change())
            except BaseException as e:
                fut.set_exception(e)

    # ================================================================ evaluation
    def evaluate(self, split: str = "val") -> dict:
        # while training, the running trainer as it is: _ensure_trainer would apply pending settings (reconfigure:
        # a new optimizer) from this thread, under the worker's feet
        tr = self.trainer if self.running else self._ensure_trainer()
        return self._apply(lambda: tr.evaluate(split))

    # ================================================================ files
    def _choose_name(self) -> None:
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", (self.spec.name if self.spec else "session").split("/")[-1]).strip("-.")
        base = f"{base or 'session'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        name, i = base, 1
        while (self.root / f"{name}.session").exists() or (self.root / name).exists():
            i += 1
            name = f"{base}-{i}"
        self.use_name(name)

    def use_name(self, name: str, root: Path | None = None) -> None:
        if root is not None:
            self.root = root
        if self._log is not None and self.name != name:
            self._log.close()
            self._log = None
        self.name = name
        self.file = self.root / f"{name}.session"
        if self._writes:
            self.folder.mkdir(parents=True, exist_ok=True)
        self._quarantined = None  # another folder: its own quarantine.txt
        self._quarantine([])  # what `data` found before there was a folder

    def _state(self) -> dict:
        if self.trainer is not None:
            return self.trainer.state_dict()
        if self._pending_state is not None:
            return self._pending_state
        from dataclasses import asdict as _asdict
        from .engine.train import Position

        module = self.built.module
        return {"model_spec": self.spec.to_dict(), "classes": list(self.splits.classes) if self.splits else [],
                "config": self.config.to_dict(), "size": (self.data or {}).get("size", 0),
                "position": _asdict(Position()), "frozen": [n for n, p in module.named_parameters() if not p.requires_grad],
                "model": dict(module.state_dict()), "optimizer": None, "scheduler": None, "scaler": None, "rng": {},
                "last": {}, "run": 0}

    @property
    def _writes(self) -> bool:
        """Under torchrun (DDP) only rank 0 writes files; every other process keeps its state in memory."""
        from .engine.distributed import world

        return world().main

    def _write_checkpoint(self, kind: str, info: dict | None = None) -> Path:
        """Called by the worker at epoch ends and pauses, and by save() when idle."""
        if self.name is None:
            self._choose_name()
        state = self._state()
        pos = state["position"]
        ckdir = self.folder / "checkpoints"
        fname = f"epoch-{pos['epoch']:04d}.safetensors" if kind == "epoch" else f"step-{pos['step']:07d}.safetensors"
        if not self._writes:
            return ckdir / fname
        val = (info or {}).get("val") or {}
        summary = {"kind": kind, "step": pos["step"], "epoch": pos["epoch"], "batch": pos["batch"],
                   "time": datetime.now().isoformat(timespec="seconds")}
        if val:
            summary.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
        if self._log is not None:
            self._log.sync()
        path = ckdir / fname
        C.save_checkpoint(path, state, summary)
        self.latest_checkpoint = path
        if kind == "epoch" and val:
            self._track_best(path, val, pos["epoch"])
        self._write_session_file()  # first: the session file never names a checkpoint that retention removed
        self._apply_retention(ckdir)
        return path

    def _track_best(self, path: Path, val: dict, epoch: int) -> None:
        metric = self.config.best_metric
        value = val["accuracy"] if metric == "val_accuracy" else val["loss"]
        if self.best is not None and self.best.get("metric") != metric:
            # `set best_metric` changed what "best" means: judge the epoch checkpoints kept so far by it (their
            # headers hold both metrics), rather than crowning whichever epoch comes next
            self.best = None
            for p in C.list_checkpoint_files(path.parent):
                if not p.name.startswith("epoch-") or p == path:
                    continue
                try:
                    meta = C.read_metadata(p)
                except C.CheckpointError:
                    continue
                if metric in meta:
                    self._consider_best(p, float(meta[metric]), int(meta.get("epoch", 0)), metric)
        self._consider_best(path, value, epoch, metric)

    def _consider_best(self, path: Path, value: float, epoch: int, metric: str) -> None:
        better = (self.best is None
                  or (value > self.best["value"] if metric == "val_accuracy" else value < self.best["value"]))
        if better:  # ties keep the earlier checkpoint
            self.best = {"path": str(path.relative_to(self.root)), "value": value, "epoch": epoch, "metric": metric}

    def _apply_retention(self, ckdir: Path) -> None:
        k = self.config.keep_last
        if not k:
            return
        keep = {self.latest_checkpoint.resolve()}
        if self.best:
            keep.add((self.root / self.best["path"]).resolve())
        epochs = [p for p in C.list_checkpoint_files(ckdir) if p.name.startswith("epoch-")]
        keep.update(p.resolve() for p in epochs[-k:])
        for p in C.list_checkpoint_files(ckdir):
            if p.resolve() not in keep and p.name.startswith(("epoch-", "step-")):
                # pause checkpoints older than the newest epoch checkpoint are superseded too
                try:
                    p.unlink()
                except OSError:
                    pass

    def _write_session_file(self) -> None:
        if not self._writes:
            return
        doc = {
            "format": SESSION_FORMAT, "version": SESSION_VERSION, "name": self.name, "folder": self.name,
            "model": self.spec.to_dict() if self.spec else None,
            "data": self.data, "config": self.config.to_dict(),
            "checkpoint": str(self.latest_checkpoint.relative_to(self.root)) if self.latest_checkpoint else None,
            "best": self.best, "target": self._target, "saved": datetime.now().isoformat(timespec="seconds"),
        }
        C.atomic_write_bytes(self.file, (json.dumps(doc, indent=2) + "\n").encode())

    def save(self, path: str | None = None) -> Path:
        """Write the session file and a checkpoint of exactly now; mid-run it pauses, saves and resumes."""
        if self.built is None:
            raise PgError("nothing to save yet: `load MODEL` first")
        if path:
            p = Path(path)
            if p.suffix != ".session":
                raise PgError(f"session files end in .session: `save {p.with_suffix('.session')}`")
        was_running = self.running
        self._saving = was_running  # the worker's pause is part of the save: no "paused" notice
        try:
            if was_running and not self.pause():  # before a move too: the worker must not write while the folder moves
                raise PgError("could not pause the run to save (a batch is taking very long); try again")
        finally:
            self._saving = False
        try:
            if path:
                new_name, new_root = p.stem, p.parent if str(p.parent) else Path(".")
                if (new_name, new_root.resolve()) != (self.name, self.root.resolve()):
                    self._move_to(new_name, new_root)
            if self.name is None:
                self._choose_name()
            if (was_running and self.status.get("error") is None and self._job is not None
                    and self._job[0] == "train"):
                self._write_session_file()  # the training pause wrote a checkpoint of this exact position
            else:  # idle, or another job (lrfind, tune) paused: it wrote nothing of the session's own state
                self._write_checkpoint("save")
        except OSError as e:  # the run stays paused: `continue` once there is space again
            if _disk_full(e):
                raise PgError(_disk_full_message(self.folder)) from None
            raise PgError(f"cannot save to {e.filename or self.folder}: {e.strerror or e}") from None
        self.dirty = False
        if was_running and self.paused and "error" not in self.status:  # not if it ended or failed meanwhile
            self.resume()
        return self.file

    def _move_to(self, name: str, root: Path) -> None:
        """`save other.session`: the session continues under the new name; its folder is copied across."""
        import shutil

        old_folder = self.folder
        (root / name).mkdir(parents=True, exist_ok=True)  # fails (unwritable place) before anything changed
        if self._log is not None:
            self._log.close()
            self._log = None
        self.use_name(name, root)
        if old_folder is not None and old_folder.exists() and old_folder.resolve() != self.folder.resolve():
            shutil.copytree(old_folder, self.folder, dirs_exist_ok=True)
            if self.latest_checkpoint is not None:
                self.latest_checkpoint = self.folder / "checkpoints" / self.latest_checkpoint.name
            if self.best:
                self.best["path"] = str(Path(name) / Path(self.best["path"]).relative_to(old_folder.name))
        if self.trainer is not None:
            from .engine.metrics import MetricsLog

            self._log = MetricsLog(self.folder / "metrics.csv")
            self.trainer.log = self._log

    @classmethod
    def open(cls, file: str | os.PathLike, notify: Callable[[str], None] | None = None) -> "Session":
        """Reopen a session exactly where it stopped: model, optimizer, schedule, position, RNG."""
        from .engine import models as M
        from .engine.metrics import MetricsLog

        file = Path(file)
        try:
            doc = json.loads(file.read_text())
        except FileNotFoundError:
            raise PgError(f"no session file {file}: check the path (sessions live in sessions/NAME.session)") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PgError(f"{file} is not a readable session file ({type(e).__name__})") from None
        if not isinstance(doc, dict) or doc.get("format") != SESSION_FORMAT:
            raise PgError(f"{file} is not a pgshell session file")
        if doc.get("version") != SESSION_VERSION:
            raise PgError(f"{file} has session version {doc.get('version')!r}; this pgshell reads {SESSION_VERSION}")
        s = cls(root=file.parent, notify=notify)
        try:
            name = str(doc.get("folder") or file.stem)
            if "/" in name or "\\" in name or name.startswith("."):
                raise PgError(f"{file}: bad folder name {name!r}")
            s.use_name(name, file.parent)
            s.file = file
            s.config = TrainConfig.from_dict(doc.get("config") or {})
            s.best = _checked(doc.get("best"), "best", {"path": str, "value": (int, float), "epoch": int,
                                                         "metric": str})
            # a kill can interrupt any atomic write: a checkpoint, metrics.csv's truncation, the session file itself
            removed = (C.clean_partial_writes(s.folder / "checkpoints") + C.clean_partial_writes(s.folder)
                       + C.clean_partial_writes(file.parent, file.name))
            if removed:
                s.notify(f"removed {len(removed)} partial file(s) left by an interrupted write")
            skipped: list[str] = []
            found = C.load_latest(s.folder / "checkpoints", warn=lambda m: (skipped.append(m), s.notify(m)))
            if found is None and doc.get("checkpoint"):  # never start over silently from fresh weights
                raise PgError(f"{file}: no usable checkpoint in {s.folder / 'checkpoints'}"
                              + (f" ({skipped[-1]})" if skipped else " (the folder has none)"))
            if doc.get("model"):
                spec = M.ModelSpec.from_dict(doc["model"])
                if found:
                    spec = M.ModelSpec.from_dict(found[1]["model_spec"])
                # weights come from the checkpoint: never touch the network or the original weights file again
                build_spec = M.ModelSpec(spec.name, spec.num_classes) if found else spec
                s.built = M.build_model(build_spec)
                s.spec = spec
            if found:
                path, state = found
                s.latest_checkpoint = path
                s.config = TrainConfig.from_dict(state["config"])
                s._log = MetricsLog(s.folder / "metrics.csv")
                dropped = s._log.truncate_after(int(state["position"]["step"]))
                if dropped:
                    s.notify(f"dropped {dropped} metrics rows written after the checkpoint")
                s._pending_state = state
                s._load_weights_now(state)
                _check_optimizer_state(state, s.built.module)
            data = doc.get("data")
            if data:
                s.data = data
                try:
                    from .engine import data as D

                    s.splits = D.scan_folder(data["path"], split=data["split"], seed=s.config.seed)
                    s._quarantine(s.splits.rejected)  # files gone bad since
                except PgError as e:
                    s.notify(f"data not attached: {e} — `data PATH` to attach it again")
                    s.splits = None
            if s.splits is not None and s.built is not None and found:
                s._ensure_trainer()
            target = _checked(doc.get("target"), "target", {"epoch": int, "step": int}, required=False)
            s._target = target if found else None
            s.dirty = False
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:  # RuntimeError: torch
            s.close(save=False)
            detail = " ".join(str(e).split())[:300]  # one line, whatever the exception held
            raise PgError(f"{file} is damaged or was edited by hand ({type(e).__name__}: {detail})") from None
        except BaseException:
            s.close(save=False)
            raise
        return s

    def _load_weights_now(self, state: dict) -> None:
        """Put the checkpoint's weights into the model at once (so `eval`/`predict` work before data is attached)."""
        try:
            missing, unexpected = self.built.module.load_state_dict(state["model"], strict=False)
        except RuntimeError as e:  # torch's first line is only "Error(s) in loading state_dict for ResNet:"
            detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [str(e)]
            raise PgError(f"the checkpoint's weights do not fit the model: {detail[0]}") from None
        if missing or unexpected:
            raise PgError(f"the checkpoint's weights do not fit the model ({len(missing)} missing, "
                          f"{len(unexpected)} unexpected)")
        frozen = set(state.get("frozen", []))
        for n, p in self.built.module.named_parameters():
            p.requires_grad = n not in frozen

    # ================================================================ description (for `show`)
    def summary_line(self) -> str:
        parts = [self.spec.name if self.spec else "no model"]
        if self.trainer is not None:
            p = self.trainer.pos
            parts.append(f"epoch {p.epoch}" + (f" + {p.batch} batches" if p.batch else "") + f", step {p.step}")
        elif self.splits is None and self.data:
            parts.append("data missing")
        if self.paused:
            parts.append("paused: `continue` resumes")
        return ", ".join(parts)

    def describe(self) -> dict[str, dict]:
        from .engine import models as M

        out: dict[str, dict] = {}
        if self.built is not None:
            trainable, total = M.count_params(self.built.module)
            out["model"] = {"name": self.spec.name, "resolved": self.built.full_name, "source": self.built.source,
                            "pretrained": self.spec.pretrained or bool(self.spec.weights),
                            "classes": self.spec.num_classes, "parameters": total, "trainable": trainable,
                            "input": "x".join(map(str, self.built.data_config.get("input_size", ())[1:]))}
        if self.splits is not None:
            out["data"] = {"path": self.data["path"], "layout": self.splits.layout,
                           "classes": ", ".join(self.splits.classes[:12]) + (" ..." if len(self.splits.classes) > 12 else ""),
                           "train": len(self.splits.train), "val": len(self.splits.val),
                           "test": len(self.splits.test or []), "size": self.data.get("size") or "model default"}
        out["settings"] = self.config.to_dict()
        if self.built is not None:
            from .engine.data import describe_policy

            out["augmentation"] = describe_policy(self.built.data_config, self.config, (self.data or {}).get("size", 0))
        if self.trainer is not None:
            from .engine.recipes import describe_groups

            out["lr groups"] = describe_groups(self.trainer.optimizer)
        pos: dict[str, Any] = {"state": self.status.get("state", "idle")}
        if self.trainer is not None:
            p = self.trainer.pos
            pos.update(epoch=p.epoch, batch=p.batch, step=p.step, batches_per_epoch=self.trainer.steps_per_epoch,
                       device=self.trainer.runtime.describe())
        if self._target:
            pos["target"] = ", ".join(f"{k} {v}" for k, v in self._target.items())
        out["position"] = pos
        if self.trainer is not None and self.trainer.last:
            last = dict(self.trainer.last)  # one step (the worker adds and drops keys): iterating it could fail
            out["metrics"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()
                              if not k.startswith("epoch_")}
        files: dict[str, Any] = {}
        if self.file:
            files["session file"] = str(self.file)
        if self.latest_checkpoint:
            files["latest checkpoint"] = str(self.latest_checkpoint)
        if self.best:
            files["best"] = f"{self.best['path']} ({self.best['metric']} {self.best['value']:.4f})"
        out["files"] = files
        return out

    # ================================================================ housekeeping
    def _refuse_while_training(self, what: str) -> None:
        if self.running:
            raise PgError(f"cannot {what} while training: `pause` or `stop` first")

    def _on_bad(self, bad: list) -> None:
        for path, reason in self._quarantine(bad):  # said once, not at every epoch that meets the file again
            self.notify(f"skipped bad image {path}: {reason}")

    def _quarantine(self, bad: list) -> list:
        """List bad files in quarantine.txt, each once; found before the session has a folder (at `data` time),
        they wait until it has one. Returns the ones new to the list. Called by one thread at a time: the shell
        while idle, the worker while training. Under DDP only rank 0 writes."""
        self._unfiled.extend(bad)
        if self.folder is None or not self._unfiled or not self._writes:
            return list(bad)
        file = self.folder / "quarantine.txt"
        if self._quarantined is None:
            self._quarantined = {ln.split("\t")[0] for ln in file.read_text().splitlines()} if file.exists() else set()
        fresh = []
        for path, reason in self._unfiled:
            if path not in self._quarantined:
                self._quarantined.add(path)
                fresh.append((path, reason))
        self._unfiled = []
        if fresh:
            with open(file, "a") as f:
                f.writelines(f"{path}\t{reason}\n" for path, reason in fresh)
        return fresh

    def close(self, save: bool = True) -> Path | None:
        """Pause and save if anything is unsaved (a named session is always brought up to date), then end the worker."""
        saved = None
        was_running = self.running
        try:
            if was_running:
                self.pause()
            if save and self.built is not None and (self.dirty or was_running):
                saved = self.save()
        finally:  # a failed save (a full disk) still ends the worker
            self._jobs.put(("quit", None))
            self._worker.join(timeout=30)
            if self._log is not None:
                self._log.close()
        return saved
