"""The Session facade: model + data + settings + trainer, run by the one worker thread (session/worker.py), saved as
a session file and its folder (session/files.py). The shell calls these methods from its own thread; training runs
in the worker (session/jobs.py); `session/review.py` and `session/study.py` use only the public names here.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

from ..engine.config import TrainConfig, is_live, parse_value
from ..engine.errors import PgError
from ..engine.store.saver import CheckpointSaver
from . import files as F
from . import fingerprint as FP
from .changelog import ChangeLog, value_text
from .document import DataBinding, SessionDoc, read_document, write_document
from .jobs import RESTART, TrainJob
from .lock import SessionLock
from .run import Run, live_position, select_run
from .worker import Worker


# How out-of-memory reads: CUDA's OutOfMemoryError says "out of memory"; on CPU torch's allocator raises a plain
# RuntimeError ("DefaultCPUAllocator: not enough memory: you tried to allocate ...", older: "can't allocate memory").
_OUT_OF_MEMORY = ("out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory")


# What a hand-edited or damaged session file or checkpoint raises on reading (RuntimeError: torch's)
_DAMAGE = (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError)


def _damaged(file: Path, e: BaseException) -> PgError:
    detail = " ".join(str(e).split())[:300]  # one line, whatever the exception held
    return PgError(f"{file} is damaged or was edited by hand ({type(e).__name__}: {detail})")


class Session:
    def __init__(self, root: str | os.PathLike = "sessions", notify: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.config = TrainConfig()
        self.notify = notify or (lambda msg: None)
        self.spec = None  # engine.models.ModelSpec
        self.built = None  # engine.models.BuiltModel
        self.binding: DataBinding | None = None  # the data the session is bound to (session/document.py)
        self.splits = None  # engine.data.Splits
        self.trainer = None  # engine.train.Trainer
        self.name: str | None = None
        self.uid = F.new_uid()  # who this session is, whatever its name or folder: kept by a rename, new for a copy
        self.file: Path | None = None
        self.target: dict | None = None  # what the paused/active training run is training towards
        self.pending_state: dict | None = None  # a checkpoint loaded before data was attached
        self.batch_listeners: list[Callable[[dict], None]] = []  # plain functions the worker calls after each batch
        self.dirty = False
        self.saving = False  # a `save` is pausing the run: no "paused" notice
        self.saver = CheckpointSaver(on_saved=lambda path: self.write_session_file())
        self.saver.writes = self._quarantine.writes = self.writes
        self._log = None  # engine.metrics.MetricsLog of this session's folder
        self._init_files()
        self.changes = ChangeLog(self._step_epoch_batch, lambda: self.writes, lambda msg: self.notify(msg))
        self.worker = Worker(lambda msg: self.notify(msg), self._triage)

    # ================================================================ state
    @property
    def running(self) -> bool:
        return self.worker.running

    @property
    def paused(self) -> bool:
        return (self.worker.job is not None or self.target is not None) and not self.running

    @property
    def status(self) -> dict:
        """The worker's status: what the toolbar and `show` read (one story: `settle` keeps it true between jobs)."""
        return self.worker.status

    @status.setter
    def status(self, status: dict) -> None:
        self.worker.status = status

    def report_to(self, notify: Callable[[str], None]) -> None:
        """Where the session's one-line messages go from now on (the shell that works on it)."""
        self.notify = notify

    def settle(self) -> None:
        """Between jobs, the state says whether a run is paused: after a reopen, a stop, a new model or data."""
        if not self.running:
            self.worker.status = {"state": "paused" if self.paused else "idle"}

    @property
    def folder(self) -> Path | None:
        return self.root / self.name if self.name else None

    @property
    def data(self) -> dict | None:
        """The data binding as readers use it: {"path", "split", "size"[, "seed", "root", "keep"]}, or None."""
        return self.binding.where() if self.binding is not None else None

    @property
    def latest_checkpoint(self) -> Path | None:
        return self.saver.latest

    @property
    def best(self) -> dict | None:
        return self.saver.best

    @property
    def _quarantine(self) -> F.Quarantine:
        if "_q" not in self.__dict__:
            self._q = F.Quarantine()
        return self._q

    @property
    def writes(self) -> bool:
        """Under torchrun (DDP) only rank 0 writes files; every other process keeps its state in memory."""
        from ..engine.train.distributed import world

        return world().main

    # ================================================================ model, data, settings
    @staticmethod
    def list_models(pattern: str = "") -> list[dict]:
        from ..engine.models.catalogue import list_models

        return list_models(pattern)

    def load_model(self, name: str, pretrained: bool = False, weights: str = "", classes: int | None = None) -> str:
        """Build a model and give it a fresh head for the data's classes (or `classes`)."""
        from ..engine import models as M

        self._refuse_while_training("load a model")
        n = len(self.splits.classes) if self.splits is not None else classes
        if self.splits is not None and classes is not None and classes != n:
            raise PgError(f"the attached data has {n} classes; drop --classes or attach other data")
        if n is None:
            raise PgError("how many classes? attach data first (`data PATH`) or give `--classes N`")
        if n < 2:
            raise PgError("--classes must be at least 2")
        spec = M.ModelSpec(name=name, num_classes=n, pretrained=pretrained, weights=weights)
        at = self.changes.position()
        built = self._build(spec)
        self._new_run("a new model")
        self.spec, self.built = spec, built
        self.settle()
        self.dirty = True
        self.changes.record_load(at, name, pretrained, weights, classes, self.built, spec, self.config.seed)
        trainable, total = M.count_params(self.built.module)
        notes = "".join(f"\n{note}" for note in self.built.notes)
        return f"{self.built.full_name}: {total:,} parameters ({trainable:,} trainable), head -> {n} classes{notes}"

    def _build(self, spec, seed: int | None = None):
        import torch

        from ..engine import models as M

        torch.manual_seed(self.config.seed if seed is None else seed)  # the new head's initialisation follows it
        return M.build_model(spec)

    def attach_data(self, path: str | None = None, split: float = 0.2, size: int = 0, check: bool = False,
                    keep: bool = False, root: str | None = None, allow_outside: bool = False,
                    exclude: str | None = None) -> Any:
        """Attach a dataset: an image folder, a label file (paths from `root`) or a Hugging Face dataset (PATH: the
        session's data when None). `check` also decodes every image, adding those that fail to `splits.rejected`
        (they stay in their split, skipped when loaded, so the split is the same either way). The same data as the
        run's changes nothing; other data, once the session has trained, starts a new run (`_new_run`); `keep`
        trains on with the recorded file lists, less the files gone (session/fingerprint.py). `exclude`: a list of
        files to leave out (session/audit.py; nothing on disk changes); without PATH the session's exclusion stays,
        a new PATH drops it unless `exclude` is given again."""
        from ..engine import data as D
        from ..engine import models as M

        self._refuse_while_training("change the data")
        if not (0.0 < split < 1.0):
            raise PgError(f"--split must be between 0 and 1 (the validation fraction), not {split}")
        if size < 0 or size > 4096:
            raise PgError(f"--size must be between 1 and 4096 pixels (0: the model's own), not {size}")
        at = self.changes.position()
        location, root = self._data_location(path, root)
        allow_outside = allow_outside or (path is None and bool((self.data or {}).get("allow_outside")))
        splits = self._kept_splits(location) if keep else D.resolve_data(location, split=split,
                                                                           seed=self.config.seed, root=root,
                                                                           allow_outside=allow_outside)
        if check:
            splits.rejected += D.find_undecodable(p for p, _ in splits.train + splits.val + (splits.test or []))
        exclusion = self._exclusion(path, exclude, location, splits)
        lists = FP.file_lists(splits, location)
        ident = FP.identity(lists)
        bound = self.binding
        same = bound is not None and bound.identity is not None \
            and bound.identity.get("fingerprint") == ident["fingerprint"] and bound.size == size
        if keep or same:  # the run goes on, exactly, over the files as they are now (an edited image is read again)
            if self.trainer is not None:
                self.pending_state, self.trainer = self.trainer.state_dict(), None
        else:
            self._new_run("other data")
        kept = self.pending_state is not None
        self.splits = splits
        # seed: the split's; keep: reopen takes the recorded lists again, without asking; exclude: the names
        # themselves (reopen leaves them out, whatever the list says since)
        self.binding = DataBinding(location, split, size, self.config.seed, root, keep, allow_outside, ident, lists,
                                   exclude=exclusion or None)
        self.data_change = None
        self.settle()
        self.dirty = True
        self.quarantine(splits.rejected)
        rebuilt = self.spec is not None and self.spec.num_classes != len(splits.classes)
        if rebuilt:
            self.spec = M.ModelSpec(**{**self.spec.to_dict(), "num_classes": len(splits.classes)})
            self.built = self._build(self.spec)
            self.notify(f"model rebuilt with a {len(splits.classes)}-class head for this data")
        self.changes.record_data(at, splits, location, split, size, check, kept, self.built if rebuilt else None,
                                 self.config.seed, exclusion)
        return splits

    def _exclusion(self, path: str | None, exclude: str | None, location: str, splits) -> dict | None:
        """The exclusion `data` attaches with (session/dataaudit.py), applied to `splits`: a new list, or the session's
        own when the data is the session's (no PATH); None otherwise."""
        from . import dataaudit as AU

        if exclude is not None:
            exclusion, missing = AU.read_exclusion(exclude, location, splits)
            if missing:
                self.notify(f"{missing} file(s) listed in {exclude} are not in this data: left aside")
        elif path is None and (self.data or {}).get("exclude"):
            exclusion = self.data["exclude"]
        else:
            return None
        FP.apply_exclusion(splits, location, exclusion["paths"])
        self.notify(f"{len(splits.excluded)} image(s) excluded ({Path(exclusion['file']).name}); nothing on disk "
                    "was moved or deleted")
        return exclusion

    def _data_location(self, path: str | None, root: str | None) -> tuple[str, str | None]:
        """(where the data is, the root a label file's paths start from): as given, or the session's own."""
        from ..engine import data as D

        if path is None:
            if not self.data:
                raise PgError("which data? `data PATH` attaches an image folder, a label file or hf:NAME")
            return self.data["path"], root if root is not None else self.data.get("root")
        return D.data_location(path), None if root is None else str(Path(root).expanduser().resolve())

    def _kept_splits(self, root: str):
        lists = (self.binding.lists if self.binding else None) or FP.read_lists(self.folder)
        if lists is None:
            raise PgError("--keep needs the file lists this session recorded, and it has none: `data PATH` attaches "
                          "the folder as it is now")
        splits, gone = FP.kept_splits(lists, root)
        if gone:
            self.notify(f"{gone} recorded image(s) are gone: training goes on with the rest")
        return splits

    def _new_run(self, why: str) -> None:
        """What `load` and `data` (other data) do to a session that has trained: never start over at step 0 and
        overwrite its checkpoints and metrics, but begin a new run of the session. The position carries on (steps
        and epochs count on, so files and rows never collide; the schedule goes on from there), with a fresh
        optimizer, a new lineage (reopening never mixes the two runs' checkpoints) and a new `best`."""
        pos = self.position()
        self.trainer, self.target, self.worker.job, self.pending_state = None, None, None, None
        if pos is None or pos["step"] == 0:
            return
        self._carry = {"epoch": pos["epoch"], "step": pos["step"], "run": pos["run"]}
        self.lineage = self.saver.lineage = F.new_lineage()
        self.saver.best = None
        self.notify(f"{why}: a new run of this session from step {pos['step']} (after epoch {pos['epoch']}); its "
                    "checkpoints so far stay as they are (`checkpoints` lists them)")

    def position(self) -> dict | None:
        """{epoch, step, batch, run} of the session's run — the trainer's, a reopened checkpoint's, or a new run's
        carried start (it begins at batch 0) — or None before any. The one answer (session/run.py): the change log,
        replay, `history`, the reads and a new run all read it here."""
        p = live_position(self.trainer, self.pending_state, self._carry)
        return p.to_dict() if p is not None else None

    def select_run(self, checkpoint: str | None = None) -> Run:
        """The run a read looks at (session/run.py): the live one, or the checkpoint named (EPOCH | step:N | best |
        last | soup | PATH) — its position, the trainer to read from, its evaluation data."""
        if checkpoint is None:
            return select_run(self, None, live_position(self.trainer, self.pending_state, self._carry))
        return self.apply(lambda: select_run(self, checkpoint, None))  # read between batches: retention waits

    def _step_epoch_batch(self) -> tuple[int, int, int]:
        p = live_position(self.trainer, self.pending_state, self._carry)
        return p.step_epoch_batch() if p is not None else (0, 0, 0)

    def freeze(self, what: list[str], unfreeze: bool = False) -> tuple[int, int]:
        from ..engine import models as M

        if self.built is None:
            raise PgError("no model yet: `load MODEL` first")

        def change():  # between two batches when training: the position logged is the loop's
            (M.unfreeze if unfreeze else M.freeze)(self.built, what)
            if self.trainer is not None:
                self.trainer.params_changed()
                # mid-run, the run restarts at this batch boundary (TrainJob): frozen BatchNorm layers and the
                # feature cache are decided at a run's start, so the change acts as it would between two runs
                self.trainer.request("pause", RESTART)
            self.changes.record("unfreeze" if unfreeze else "freeze",
                                f"{'unfreeze' if unfreeze else 'freeze'} {' '.join(what)}".strip())

        self.apply(change)
        self.dirty = True
        return M.count_params(self.built.module)

    def set_head(self, weight, bias, cmd: str) -> str:
        """Give the model's head (one Linear layer) these weights: `probe linear --apply`, the classifier fitted on
        the frozen features becoming the start of fine-tuning (LP-FT). Logged as `cmd`, which a replay runs again (the
        probe is deterministic). Returns the head layer's name."""
        from ..engine import models as M

        if self.built is None:
            raise PgError("no model yet: `load MODEL` first")

        def change() -> str:  # between two batches when training, like `freeze`
            layer = M.set_linear_head(self.built, weight, bias)
            self.changes.record("head", cmd)
            return layer

        layer = self.apply(change)
        self.dirty = True
        return layer

    def random_backbone_warning(self) -> str:
        """`freeze` on a backbone that was never pretrained nor trained: a line saying so (engine.models), or ""."""
        from ..engine import models as M

        steps = self.trainer.pos.step if self.trainer is not None else \
            int(((self.pending_state or {}).get("position") or {}).get("step", 0))
        return M.random_backbone_warning(self.built, self.spec, steps) if self.built is not None else ""

    def data_hints(self) -> list[str]:
        """What `data` should point out about the attached images: a milder augmentation for small images, and
        class imbalance (engine.data)."""
        from ..engine import data as D

        if self.splits is None:
            return []
        size = (self.data or {}).get("size", 0)
        hints = (D.small_image_hint(self.splits, size, self.config), D.imbalance_warning(self.splits))
        return [h for h in hints if h]

    def set(self, name: str, value: Any) -> str:
        """Change a setting. Live ones apply at the next batch; the others when training next starts."""
        value = parse_value(name, value)
        if name == "tensorboard" and value:
            from ..engine.report import tensorboard as TB

            if not TB.available():
                raise PgError(TB.INSTALL)
        old = getattr(self.config, name)
        if name == "seed" and old != value and self.built is not None:
            return self._reseed(old, value)
        self.config = self.config.replace(**{name: value})
        self.dirty = True
        if old == value:
            return ""
        cmd, detail = f"set {name} {value_text(value)}", {"name": name, "value": value, "old": old}
        if self.trainer is not None and is_live(name):
            def change():  # between two batches when training: the position logged is the loop's
                self.trainer.apply_live(name, value)
                self.changes.record("set", cmd, **detail)

            self.apply(change)
            return "applies at the next batch" if self.running else ""
        if self.trainer is not None and self.running:
            self.changes.hold("set", cmd, **detail)  # logged where it applies: when training next starts
            return f"{name} applies when training next starts: `pause` then `continue` to use it now"
        self.changes.record("set", cmd, **detail)
        return ""

    def _reseed(self, old: int, value: int) -> str:
        """`set seed` with a model loaded. Before the first training step it re-initialises what `load`
        initialised, exactly as `set seed` then `load` would; after, the weights keep their initialisation."""
        from ..engine.store.digests import weights_digest

        detail = {"name": "seed", "value": value, "old": old}
        if not self._trained_since_init() and not self.running:
            frozen = {n for n, p in self.built.module.named_parameters() if not p.requires_grad}
            built = self._build(self.spec, seed=value)  # first: if it fails, nothing has changed
            for n, p in built.module.named_parameters():
                p.requires_grad_(n not in frozen)
            self.config, self.built, self.dirty = self.config.replace(seed=value), built, True
            pos = self.position()
            if pos is not None and pos["step"]:  # a new run not trained yet: it still starts where it was carried to
                self._carry = {"epoch": pos["epoch"], "step": pos["step"], "run": pos["run"]}
            self.trainer, self.target, self.worker.job, self.pending_state = None, None, None, None
            self.changes.record("set", f"set seed {value}", init_seed=value, digest=weights_digest(built.module),
                                **detail)
            return f"re-initialised {self.spec.name} with seed {value} (as `set seed {value}` then `load` would)"
        self.config, self.dirty = self.config.replace(seed=value), True
        if self.trainer is not None and self.running:
            self.changes.hold("set", f"set seed {value}", **detail)
        else:
            self.changes.record("set", f"set seed {value}", **detail)
        init = self.changes.init_seed()
        was = f"seed {init}" if init is not None else "the seed in force at `load`"
        why = "training has started" if self._trained_since_init() else f"{self.worker.job.label} is running"
        return (f"{why}: the weights keep their initialisation from {was}; seed {value} sets the data order and "
                f"augmentation from {'the next start' if self.running else 'here'} — `load {self.spec.name}` again "
                "to re-initialise the weights with it")

    def _trained_since_init(self) -> bool:
        """Whether the weights have trained since `load` initialised them (a new run starts at a carried step)."""
        return self._step_epoch_batch()[0] > self.changes.init_step()

    # ================================================================ training and jobs
    def train(self, epochs: int | None = None, steps: int | None = None, restart: bool = False) -> str:
        """`restart`: a new phase — the lr schedule counts from here (`set schedule_start`, logged as made by
        `train --restart`, so a replay restarts it at the same position)."""
        if self.running:
            raise PgError("training is already running: `pause`, `stop` or `wait` first")
        if epochs is not None and epochs < 1 or steps is not None and steps < 1:
            raise PgError("train takes a positive number of epochs (train 5) or steps (train --steps 100)")
        if self.built is not None and not any(p.requires_grad for p in self.built.module.parameters()):
            # the trainer says so too, but only once the session is named and the run started
            raise PgError("nothing to train: every parameter is frozen — `unfreeze all` or `freeze backbone`")
        pos = self.ensure_trainer().pos
        if restart:
            if pos.batch:
                raise PgError(f"`train --restart` starts the schedule at an epoch's start; this run is at epoch "
                              f"{pos.epoch + 1}, batch {pos.batch}: `train 1` to end the epoch first")
            with self.changes.via("train --restart"):
                self.set("schedule_start", pos.epoch)
            pos = self.ensure_trainer().pos  # the schedule rebuilt from the new start
        if epochs is None and steps is None:
            epochs = self.config.epochs - pos.epoch
            if epochs < 1:
                raise PgError(f"already trained {pos.epoch} epochs (epochs = {self.config.epochs}): "
                              "`train N` for N more")
        self.target = {"step": pos.step + steps} if steps is not None else {"epoch": pos.epoch + epochs}
        self.changes.record("train", f"train --steps {steps}" if steps is not None else f"train {epochs}",
                            target=dict(self.target), device=str(self.trainer.runtime.device))
        self._start_training()
        return self._describe_target() + self._schedule_notice(new_run=True)

    def finetune(self, epochs: int, head_epochs: int = 1, backbone_lr_scale: float = 0.1) -> str:
        """fastai's fine_tune as ordinary steps: `freeze`, `train HEAD_EPOCHS`, then `unfreeze all`,
        `set backbone_lr_scale S`, `train EPOCHS` — one background job, pausable and resumable in either phase."""
        if self.running:
            raise PgError("training is already running: `pause`, `stop` or `wait` first")
        if epochs < 1 or head_epochs < 0:
            raise PgError("finetune takes EPOCHS >= 1 for the whole model and --head-epochs >= 0 (finetune 5)")
        parse_value("backbone_lr_scale", backbone_lr_scale)
        if self.built is None:
            raise PgError("no model yet: `load MODEL --pretrained` first")
        if not head_epochs:
            self.freeze(["all"], unfreeze=True)
            self.set("backbone_lr_scale", backbone_lr_scale)
            return self.train(epochs)
        self.freeze(["backbone"])
        warning = self.random_backbone_warning()
        pos = self.ensure_trainer().pos
        self.target = {"epoch": pos.epoch + head_epochs + epochs, "unfreeze_at": pos.epoch + head_epochs,
                       "backbone_lr_scale": float(backbone_lr_scale)}
        self._start_training()
        return (f"finetune: the head for {head_epochs} epoch{'s' * (head_epochs != 1)} with the backbone frozen "
                f"(epoch {pos.epoch + 1} to {pos.epoch + head_epochs}), then everything with backbone lr x "
                f"{backbone_lr_scale:g} to epoch {self.target['epoch']}" + (f"\n{warning}" if warning else ""))

    def resume(self) -> str:
        if self.running:
            raise PgError("training is already running")
        job = self.worker.job
        if job is not None and job.label != "train":
            self.start_job(job)  # a paused job of another kind (a tuning study, ...)
            return f"continuing {job.label}"
        if self.target is None:
            raise PgError("nothing to continue: no run is paused — `train N` starts one")
        pos, t = self.ensure_trainer().pos, self.target
        if t.get("unfreeze_at") is not None:  # paused in finetune's first phase: its job picks it up
            self._start_training()
            return self._describe_target()
        if pos.step >= t.get("step", float("inf")) or pos.epoch >= t.get("epoch", float("inf")):
            self.target = None
            raise PgError("nothing to continue: the last run reached its end — `train N` for more")
        self._start_training(job if isinstance(job, TrainJob) else None)
        return self._describe_target() + self._schedule_notice()

    def finetune_second_phase(self) -> None:
        """`finetune`'s second phase begins as `unfreeze all`, `set backbone_lr_scale S` and a new `train` would
        (called by its TrainJob in the worker, at the end of the first phase)."""
        scale = self.target.pop("backbone_lr_scale")
        del self.target["unfreeze_at"]
        self.freeze(["all"], unfreeze=True)
        self.set("backbone_lr_scale", scale)
        self.ensure_trainer().run_id += 1  # a run of its own in metrics.csv, as a typed `train` is
        self.write_session_file()
        self.notify(f"finetune: the backbone unfrozen (backbone lr x {scale:g}), epoch {self.trainer.pos.epoch + 1} "
                    f"to {self.target['epoch']}")

    def aim(self, target: dict) -> None:
        """What the next run trains towards ({"epoch": E} or {"step": S}), for a job that starts the run itself
        (autofit's final run): `continue` picks it up after a pause."""
        self.target = dict(target)

    def run_ended(self) -> None:
        """The run reached its target or was stopped: nothing is left to `continue`."""
        self.target = None

    def job_failed(self, message: str) -> None:
        """A job ended with an error it reports itself (not an exception): the status shows it, one line says it."""
        self.worker.status = {"state": "idle", "error": message}
        self.notify(f"error: {message}")

    def _start_training(self, job: TrainJob | None = None) -> None:
        self.trainer.run_id = max(self.trainer.run_id, 0) + 1
        self.start_job(job or TrainJob(self))

    def start_job(self, job) -> None:
        """Run `job.run(worker)` in the worker thread and return at once: training, a tuning study, an LR range
        test all go through here, so `pause`, `continue`, `stop`, `wait` and the toolbar work the same for all."""
        self.worker.start(job)
        self.dirty = True

    def pause(self, timeout: float = 120.0) -> bool:
        """Ask the run to pause after the current batch; returns True once it has (checkpoint written)."""
        return self.worker.pause(timeout)

    def request_pause(self) -> None:
        """Non-blocking pause (Ctrl-C)."""
        self.worker.request_pause()

    def stop(self, timeout: float = 120.0) -> bool:
        if not self.running:
            had = self.target is not None or self.worker.job is not None
            self.target, self.worker.job = None, None
            self.settle()
            return had
        return self.worker.stop(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the current run finishes or pauses; True if it did within `timeout`."""
        return self.worker.idle.wait(timeout)

    def apply(self, change: Callable[[], Any]) -> Any:
        """Run `change` now if idle, or between two batches of the running job; returns its result."""
        return self.worker.apply(change)

    def _describe_target(self) -> str:
        t, pos = self.target, self.trainer.pos
        if "step" in t:
            return f"training {t['step'] - pos.step} steps (to step {t['step']})"
        left = t["epoch"] - pos.epoch
        return f"training {left} epoch{'s' * (left != 1)} (epoch {pos.epoch + 1} to {t['epoch']})"

    def _schedule_notice(self, new_run: bool = False) -> str:
        """A cosine or one-cycle schedule whose span is not where this run ends, or (`new_run`) a new phase on a
        schedule that has already decayed: say it as the run starts."""
        from ..engine.train.schedule import phase_notice, schedule_notice

        tr, t = self.trainer, self.target
        spe = tr.optimizer_steps_per_epoch
        end = t["step"] if "step" in t else tr.pos.step + tr.steps_to_epoch(t["epoch"])  # optimizer steps
        notes = [schedule_notice(self.config, spe, tr.pos.step, end),
                 new_run and phase_notice(self.config, spe, tr.pos.epoch, tr.pos.step, self._phase_changes())]
        return "".join(f"\nnote: {note}" for note in notes if note)

    def _phase_changes(self) -> list[str]:
        """The freeze/unfreeze commands since the run before this one: this one begins a new phase."""
        found = []
        for entry in reversed(self.changes.entries[:-1]):  # the last is this run's own `train`
            if entry["kind"] == "train":
                break
            if entry["kind"] in ("freeze", "unfreeze"):
                found.insert(0, entry["cmd"])
        return found

    def ensure_trainer(self, named: bool = True):
        """The session's trainer, built on first use (model and data checked, a reopened checkpoint loaded), with
        the session's settings in force; `named`: the session named (auto-named if need be) and its metrics log open,
        as training needs — a read (`eval`, `errors`, `probe`) leaves an unnamed session without a folder."""

        if self.built is None:
            raise PgError("no model yet: `load MODEL` first (e.g. `load resnet18 --pretrained`)")
        if self.splits is None:
            if self.data_change:
                raise PgError(f"the data changed since this session was saved ({self.data_change}): `data --keep` "
                              "trains on with the recorded images that still exist, `data PATH` starts a new run")
            raise PgError("no data yet: `data PATH` attaches an image folder")
        if self.trainer is None:  # before naming the session: a refusal leaves nothing behind
            from ..engine.models.build import check_input_size

            check_input_size(self.built, self.data.get("size", 0))
        if named:
            self._open_log()
        if self.trainer is None:
            self.trainer = self._new_trainer()
        elif self.trainer.cfg != self.config:
            if (self.trainer.cfg.device, self.trainer.cfg.devices) != (self.config.device, self.config.devices):
                self.device_fallback = self.trainer.device_fallback = False  # asked for here and now: it must exist
            self.trainer.reconfigure(self.config)
        if not self.running:
            self.changes.flush_pending()  # settings set mid-run apply from here
        return self.trainer

    def reading_trainer(self):
        """The trainer a read-only command reads from (session/run.py, Run.reader): while a run goes on the running
        one as it is, else the session's, built without naming the session."""
        return self.select_run().reader()

    def _open_log(self) -> None:
        """Name the session (auto-named if need be) and open its metrics log, for the trainer too."""
        from ..engine.train.metrics import MetricsLog

        if self.name is None:
            self._auto_name()
        if self._log is None and self.writes:
            self._log = self.saver.log = MetricsLog(self.folder / "metrics.csv")
            if self.trainer is not None:
                self.trainer.log = self._log

    def _new_trainer(self):
        from ..engine.train.loop import Trainer

        tr = Trainer(self.built, self.spec, self.splits, self.config, log=self._log, size=self.data.get("size", 0),
                     device_fallback=self.device_fallback)
        tr.notify, tr.on_bad = self.notify, self.report_bad
        tr.on_handler_error = lambda msg: self.notify(f"warning: {msg}")
        tr.on_phase = self._on_phase
        tr.add_handler(self.changes.counter)  # before the state: restoring it rewinds the change log
        state = self.pending_state if self.pending_state is not None else self._carried_state()
        if state is not None:
            tr.load_state_dict(state)
            self.pending_state = self._carry = None
        return tr

    def _on_phase(self, name: str, done: int, total: int) -> None:
        from ..engine.train.progress import phase_status

        job = getattr(self.worker.job, "label", "train")
        name0, done0, total0, started, done_then = getattr(self, "_phase", (None, 0, 0, 0.0, 0))
        if done == 0 or name != name0 or done < done0 or total != total0:
            # a new phase: its ETA counts from its first report (the feature cache's first is its first batch, not
            # 0; timed from each report itself, its ETA said 0m00s all the way through)
            started, done_then = time.perf_counter(), done
        self._phase = (name, done, total, started, done_then)
        self.worker.status = phase_status(job, name, done, total, started, done_then)

    def evaluate(self, split: str = "val") -> dict:
        tr = self.reading_trainer()
        return self.apply(lambda: tr.evaluate(split))

    def _triage(self, e: BaseException) -> tuple[str, str | None]:
        """One line for a job's exception (the trace goes to errors.log), and a note to follow it."""
        import torch

        log = F.log_error(self.folder or self.root, e) or "(errors.log could not be written)"
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)) or any(
                words in str(e).lower() for words in _OUT_OF_MEMORY):
            bs = (self.trainer.cfg if self.trainer is not None else self.config).batch_size  # the size that failed
            if self.trainer is not None and self.trainer.optimizer is not None:
                self.trainer.optimizer.zero_grad(set_to_none=True)  # give the half-done step's memory back
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            msg = (f"out of memory at batch_size {bs}: `set batch_size {max(1, bs // 2)}` (or a smaller --size), "
                   "then `continue`")
        elif F.disk_full(e):
            msg = F.disk_full_message(self.folder)
        elif isinstance(e, PgError):
            msg = str(e)
        else:
            msg = f"training stopped by an error: {type(e).__name__}: {str(e)[:200]} (full trace in {log})"
        paused = self.trainer is not None and self.target is not None
        return msg, "the run is paused; the last checkpoint is intact" if paused else None

    # ================================================================ files
    def _init_files(self) -> None:
        """The session-file side of a new Session: its lock, its run's lineage, the data it records."""
        self.lock = SessionLock()  # one writer per session (session/lock.py)
        self.lineage = self.saver.lineage = F.new_lineage()
        self.auto_named = False  # named by auto_name: `save NAME` renames its folder instead of copying it
        self.lists_written: str | None = None  # the fingerprint of the lists on disk
        self.data_change: str | None = None  # what changed since the session was saved (data left detached)
        self.device_fallback = False  # a reopened session runs on the devices that exist (engine/train/device.py)
        self._carry: dict | None = None  # a new run's start: {epoch, step, run} of the run before it

    def use_name(self, name: str, root: Path | None = None) -> None:
        root = self.root if root is None else root
        if self.writes:  # the folder's lock before anything is written there (DDP: rank 0 alone writes)
            self.lock.acquire(root / name, str(root / f"{name}.session"))
        self.root = root
        if self._log is not None and self.name != name:
            self._log.close()
            self._log = self.saver.log = None
        self.name = name
        self.file = self.root / f"{name}.session"
        if self.writes:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.saver.folder, self.saver.root = self.folder / "checkpoints", self.root
        self._quarantine.use(self.folder)
        self.changes.use(self.folder)
        self.quarantine([])  # what `data` found before there was a folder

    def document(self) -> SessionDoc:
        """The session as its file holds it (session/document.py)."""
        return SessionDoc(name=self.name, folder=self.name, model=self.spec.to_dict() if self.spec else None,
                          data=self.binding, config=self.config,
                          checkpoint=str(self.latest_checkpoint.relative_to(self.root)) if self.latest_checkpoint
                          else None, id=self.uid, lineage=self.lineage, auto_named=self.auto_named, best=self.best,
                          target=self.target)

    def write_session_file(self) -> None:
        """The session file, and once per change of data the file lists behind its fingerprint (data-files.json)."""
        if not self.writes:
            return
        b = self.binding
        fingerprint = (b.identity or {}).get("fingerprint") if b is not None else None
        if b is not None and b.lists is not None and self.folder is not None and fingerprint \
                and self.lists_written != fingerprint:
            FP.write_lists(self.folder, b.lists)
            self.lists_written = fingerprint
        write_document(self.file, self.document())

    def _auto_name(self) -> None:
        self.use_name(F.auto_name(self.root, self.spec.name if self.spec else None))
        self.auto_named = True

    def write_checkpoint(self, kind: str) -> Path:
        """A checkpoint of exactly now (a pause, a save, the end of a --steps run), and the session file."""
        if self.name is None:
            self._auto_name()
        return self.saver.save(self._state(), kind, None, self.config)

    def _state(self) -> dict:
        if self.trainer is not None:
            return self.trainer.state_dict()
        if self.pending_state is not None:
            return self.pending_state
        from ..engine.train.loop import fresh_state

        state = self._carried_state() or fresh_state(self.built, self.spec, self.splits, self.config,
                                                     (self.data or {}).get("size", 0))
        state["handlers"] = {**state.get("handlers", {}),
                             self.changes.counter.key: self.changes.counter.state_dict()}
        return state

    def _carried_state(self) -> dict | None:
        """A new run's first state: fresh (the model as it is, no optimizer state) at the position carried on."""
        if self._carry is None:
            return None
        from ..engine.train.loop import fresh_state, position_rng

        state = fresh_state(self.built, self.spec, self.splits, self.config, (self.data or {}).get("size", 0))
        state["position"].update(epoch=self._carry["epoch"], step=self._carry["step"])
        state["rng"], state["run"] = position_rng(self.config.seed, self._carry["step"]), self._carry["run"]
        return state

    def save(self, path: str | None = None, force: bool = False) -> Path:
        """Write the session file and a checkpoint of exactly now; mid-run it pauses, saves and resumes. `path`: a
        bare NAME (the root's NAME.session) or a PATH.session (from the working directory). Onto
        another session's name only with `force`, which replaces that session whole (F.SessionExists otherwise)."""
        if self.built is None:
            raise PgError("nothing to save yet: `load MODEL` first")
        if path and Path(path).name == path and not Path(path).suffix:  # a bare NAME: sessions/NAME.session, as fork
            path = str(self.root / f"{path}.session")
        if path:
            F.check_name(Path(path).stem)  # `save ..`, `save ...session`, `save .`: never a name that is a path
        if path and Path(path).suffix != ".session":
            raise PgError(f"session files end in .session: `save {Path(path).with_suffix('.session')}`")
        if path and not force and self.writes:  # DDP: rank 0 alone writes, and checks
            p = Path(path)
            other = F.other_session(self, p.stem, p.parent if str(p.parent) else Path("."))
            if other is not None:
                raise F.SessionExists(f"{path} is another session ({other} exists): `save {path} --force` replaces "
                                      "it whole, or choose another name")
        was_running = self.running
        self.saving = was_running  # the worker's pause is part of the save: no "paused" notice
        try:
            if was_running and not self.pause():  # before a move too: the worker must not write while it moves
                raise PgError("could not pause the run to save (a batch is taking very long); try again")
        finally:
            self.saving = False
        try:
            self._save_now(path, was_running, force)
        except OSError as e:  # the run stays paused: `continue` once there is space again
            if F.disk_full(e):
                raise PgError(F.disk_full_message(self.folder)) from None
            raise PgError(f"cannot save to {e.filename or self.folder}: {e.strerror or e}") from None
        self.dirty = False
        if was_running and self.paused and "error" not in self.status:  # not if it ended or failed meanwhile
            self.resume()
        return self.file

    def _save_now(self, path: str | None, was_running: bool, force: bool = False) -> None:
        if path:
            p = Path(path)
            root = p.parent if str(p.parent) else Path(".")
            if (p.stem, root.resolve()) != (self.name, self.root.resolve()):
                self._move(p.stem, root, force)
                if self.trainer is not None and self.writes:
                    from ..engine.train.metrics import MetricsLog

                    self._log = self.saver.log = self.trainer.log = MetricsLog(self.folder / "metrics.csv")
        if self.name is None:
            self._auto_name()
        job = self.worker.job
        if was_running and self.status.get("error") is None and job is not None and job.label == "train":
            self.write_session_file()  # the training pause wrote a checkpoint of this exact position
        else:  # idle, or another job (lrfind, tune) paused: it wrote nothing of the session's own state
            self.write_checkpoint("save")

    def _move(self, name: str, root: Path, force: bool) -> None:
        """`save other.session`: the files move (session/files.py), and the session follows them: no longer
        auto-named, a copy is another session (a new id; the old one keeps its own), the saver's paths renamed."""
        old_folder, writes = self.folder, self.writes
        copied = F.move_folder(self, name, root, replace=force)
        self.auto_named = False
        if copied:
            self.uid = F.new_uid()
        if self.saver.latest is not None:
            self.saver.latest = self.folder / "checkpoints" / self.saver.latest.name
        if self.saver.best and old_folder is not None and writes:
            self.saver.best["path"] = str(Path(name) / Path(self.saver.best["path"]).relative_to(old_folder.name))

    @classmethod
    def open(cls, file: str | os.PathLike, notify: Callable[[str], None] | None = None) -> "Session":
        """Reopen a session exactly where it stopped: model, optimizer, schedule, position."""
        file = Path(file)
        try:
            doc = read_document(file)
        except _DAMAGE as e:
            raise _damaged(file, e) from None
        s = cls(root=file.parent, notify=notify)
        try:
            s._reopen(file, doc)
        except _DAMAGE as e:
            s.close(save=False)
            raise _damaged(file, e) from None
        except BaseException:
            s.close(save=False)
            raise
        return s

    def _reopen(self, file: Path, doc: SessionDoc) -> None:
        """Fill this fresh session from its document and its checkpoint (read by session/files.py): model,
        optimizer, schedule, position, data. The one place a reopen assigns the session's state."""
        self.use_name(F.folder_name(doc, file), file.parent)  # the lock first: nothing below touches a session in use
        self.file, self.config, self.saver.best, self.auto_named = file, doc.config, doc.best, doc.auto_named
        self.uid = doc.id or str(self.folder.resolve())  # a file from before ids: its folder's path identified it
        if self.writes:  # DDP: rank 0 alone touches the folder
            removed = F.clean_partial_writes(self.folder, file)
            if removed:
                self.notify(f"removed {len(removed)} partial file(s) left by an interrupted write")
        found = F.find_checkpoint(self.folder, self.root, file, doc, self.notify)
        self.lineage = doc.lineage  # None: a file from before lineages stays without one until a new run
        self.saver.lineage = doc.lineage or ""
        if doc.model:
            self.spec, self.built = F.rebuild_model(file, doc.model, found)
        if found:
            path, state = found
            self.saver.latest = path
            config = TrainConfig.from_dict(state["config"])  # checked either way: a hand edit is an error
            if not (doc.checkpoint and (self.root / doc.checkpoint).resolve() == path.resolve()):
                self.config = config  # the file lags behind the checkpoint: its settings are the newer
            if self.writes:  # DDP: rank 0 alone keeps the log; every other rank appending would double each row
                self._log = self.saver.log = F.reopen_metrics(self.folder, state, self.notify)
            self.pending_state = state
            F.restore_checkpoint(self.built.module, path, state, self.notify)
        if doc.data is not None:
            self.binding, self.splits, self.data_change, self.lists_written = F.rebind_data(
                doc.data, self.folder, found[1] if found else None, self.config.seed, self.notify)
            if self.splits is not None:
                self.quarantine(self.splits.rejected)  # files gone bad since
        if self.splits is not None and self.built is not None and found:
            self.device_fallback = True  # the device is a preference: reopen on what exists, with a note
            tr = self.ensure_trainer()
            if tr.runtime.note:
                self.notify(tr.runtime.note)
        self.target = doc.target if found else None
        self.settle()
        self.dirty = False

    def fork(self, name: str, checkpoint: str | None = None) -> "Session":
        """A new session NAME beside this one from one of its checkpoints (EPOCH | step:N | best | last | soup | PATH;
        default: exactly now, saved first), with its change log, checkpoints and metrics rows up to that point
        (session/replay.py writes them). Returns the new session, open, with this session's notify; this one is
        saved and closed — unless the fork fails, which leaves it as it was, still open."""
        from . import replay as R

        R.check_fork(self, name)  # before anything changes
        if self.running:
            self.pause()
        if checkpoint is None:
            self.save()  # the fork starts from exactly now
        file = R.fork(self, name, checkpoint)
        forked = type(self).open(file, notify=self.notify)
        try:
            self.close(save=True)
        except PgError as e:  # the fork is whole; what this session had not saved is said, not lost silently
            self.notify(f"{self.name} could not be saved as the shell left it: {e}")
        return forked

    def close(self, save: bool = True) -> Path | None:
        """Pause and save if anything is unsaved (a named session is always brought up to date), then end the
        worker."""
        saved = None
        was_running = self.running
        try:
            if was_running:
                self.pause()
            if save and self.built is not None and (self.dirty or was_running):
                saved = self.save()
        finally:  # a failed save (a full disk) still ends the worker
            self.worker.close()
            if self._log is not None:
                self._log.close()
            self.lock.release()
        return saved

    def has_work(self) -> bool:
        """Anything closing should save: a name the user chose, a position, a checkpoint, a paused job."""
        pos = self.position()
        return ((self.name is not None and not self.auto_named) or bool(pos and pos["step"])
                or self.latest_checkpoint is not None or self.worker.job is not None)

    _BOOKKEEPING = {".lock", "quarantine.txt", "data-files.json", "changes.jsonl", "manifests"}

    def disposable(self) -> bool:
        """Nothing here a later session could use: never trained, never named, and its folder holds only what
        naming it wrote (an eval-only plan left a 14 MB session of the untrained weights)."""
        folder = self.folder
        if folder is None:  # never named: a read (`eval`, `probe`, `errors`) names nothing
            return self.spec is not None and not self.has_work()
        return (not self.has_work() and self.auto_named and folder.is_dir()
                and {p.name for p in folder.iterdir()} <= self._BOOKKEEPING)

    def discard(self) -> None:
        """Close without saving, leaving nothing behind if nothing was made: a plan that fails before training
        started removes the session it auto-named (a folder with a checkpoint, a trace or metrics stays)."""
        folder, file = self.folder, self.file
        self.close(save=False)
        if folder is None or not self.auto_named or not folder.is_dir() or not self.writes:  # DDP: rank 0's folder
            return
        if {p.name for p in folder.iterdir()} <= self._BOOKKEEPING:
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
            if file is not None and file.exists():
                file.unlink()

    def sync_metrics(self) -> None:
        if self._log is not None:
            self._log.sync()

    # ================================================================ housekeeping
    def quarantine(self, bad: list) -> list:
        """List bad files in quarantine.txt, each once; returns the ones new to the list."""
        return self._quarantine.add(bad)

    def report_bad(self, bad: list) -> None:
        for path, reason in self.quarantine(bad):  # said once, not at every epoch that meets the file again
            self.notify(f"skipped bad image {path}: {reason}")

    def _refuse_while_training(self, what: str) -> None:
        if self.running:
            raise PgError(f"cannot {what} while training: `pause` or `stop` first")

    def summary_line(self) -> str:
        from .describe import summary_line

        return summary_line(self)

    def describe(self, every: bool = False) -> dict[str, dict]:
        from .describe import describe

        return describe(self, every)
