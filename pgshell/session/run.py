"""Which run a read looks at, and which checkpoint a name means: the one answer for `eval`, `errors`, `probe`,
`predict`, `explain`, `export`, `fork`, the change log and replay.

A `Run` is the session's live run or one of its saved checkpoints as a reader sees it: where it is (`position`), the
settings and image size it reads with (a checkpoint's own: its evaluation policy, tta and loss), the classes it
predicts, the trainer to read from (`reader`) and the evaluation data (`data_config`, `eval_spec`). The session makes
one (`Session.select_run`); nothing else works out a position or builds an evaluation's data by hand.

`resolve_checkpoint` turns what the user types — EPOCH | step:N | best | last | soup | PATH — into the file, for
every command that takes a checkpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.config import TrainConfig
from ..engine.errors import PgError
from .files import C

if TYPE_CHECKING:
    from .core import Session

CHECKPOINT_NAMES = "EPOCH|step:N|best|last|soup|PATH"  # what resolve_checkpoint takes, as the shell's help says it


@dataclass(frozen=True)
class Position:
    """Where a run is: completed epochs, optimizer steps, batches into the next epoch, and which run of the session
    (metrics.csv's `run`)."""

    epoch: int = 0
    step: int = 0
    batch: int = 0
    run: int = 0

    @classmethod
    def of_state(cls, state: dict) -> "Position":
        """A checkpoint's (or a pending reopened state's) position."""
        p = state["position"]
        return cls(int(p["epoch"]), int(p["step"]), int(p["batch"]), int(state.get("run", 0)))

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "batch": self.batch, "run": self.run}

    def step_epoch_batch(self) -> tuple[int, int, int]:
        """The change log's order: (step, completed epochs, batches into the next)."""
        return self.step, self.epoch, self.batch


def live_position(trainer, pending_state: dict | None, carry: dict | None) -> Position | None:
    """The session's run's position: its trainer's, a reopened checkpoint's not yet given to a trainer, or a new
    run's carried start (it begins at batch 0) — None before any."""
    if trainer is not None:
        p = trainer.pos
        return Position(p.epoch, p.step, p.batch, trainer.run_id)
    if pending_state is not None:
        return Position.of_state(pending_state)
    if carry is not None:
        return Position(carry["epoch"], carry["step"], 0, carry["run"])
    return None


@dataclass(frozen=True)
class Run:
    """The live run (`checkpoint` None) or a saved checkpoint, as `eval`, `errors`, `probe`, `predict`, `explain` and
    `export` read it."""

    session: Any = field(repr=False, compare=False)
    position: Position | None
    config: TrainConfig  # the settings it is read with: the session's, or those the checkpoint was trained with
    size: int  # the image size override (0: the model's own)
    classes: tuple[str, ...]  # the classes it predicts, in the head's order
    checkpoint: Path | None = None  # None: the live model
    state: dict | None = field(default=None, repr=False, compare=False)  # the checkpoint's state

    @property
    def label(self) -> str:
        """Which weights, in a word: "current weights" or the checkpoint's file name."""
        return "current weights" if self.checkpoint is None else self.checkpoint.name

    def where(self) -> dict:
        """{"epoch", "step", "batch"} of the weights read (a model never trained is at step 0)."""
        p = self.position or Position()
        return {"epoch": p.epoch, "step": p.step, "batch": p.batch}

    def reader(self):
        """The trainer to read from. Live: the running one as it is (ensure_trainer would apply pending settings —
        a new optimizer — under the worker's feet), else the session's, built without naming the session. A
        checkpoint: a Trainer of its own on a private copy, with its settings and image size (the evaluation pass,
        loss, batch size and transform exactly the training run's) on the devices here. Call through
        Session.apply (building a model draws from the global generator)."""
        s = self.session
        if self.checkpoint is None:
            return s.trainer if s.running else s.ensure_trainer(named=False)
        from ..engine.train.loop import Trainer

        if s.splits is None:
            raise PgError("no data attached: `data PATH` attaches the images to evaluate on")
        built = self.model()  # first: a checkpoint of another model is refused as that
        if self.state.get("classes") and self.classes != tuple(s.splits.classes):
            raise PgError(f"{self.checkpoint.name} was trained on the classes {', '.join(self.classes[:6])}; the "
                          f"attached data has {', '.join(s.splits.classes[:6])}: attach its data (`data PATH`) to "
                          "evaluate it")
        here = {k: getattr(s.config, k) for k in ("device", "amp", "channels_last", "devices")}
        return Trainer(built, s.spec, s.splits, self.config.replace(**here), log=None, size=self.size)

    def model(self):
        """A private BuiltModel of the weights read (a run goes on undisturbed). Call through Session.apply."""
        import copy
        import dataclasses

        s = self.session
        if self.checkpoint is None:
            return dataclasses.replace(s.built, module=copy.deepcopy(s.built.module))
        return checkpoint_copy(s, self.checkpoint, self.state)[0]

    def ema_module(self, tr):
        """The averaged weights (`set ema`) of the trainer `reader` gave: the live EMA, or the checkpoint's."""
        from ..engine.train import recipes as R

        return R.live_ema_module(tr) if self.checkpoint is None else R.ema_module(tr.built.module, self.state)

    def data_config(self, built) -> dict:
        """The model's data config with the evaluation policy this run is read with (crop_pct, interpolation,
        normalize)."""
        from ..engine.data.transforms import policy_data_config

        return policy_data_config(built.data_config, self.config)

    def eval_spec(self, built, module=None):
        """The evaluation data of this run (engine.sources.DataSpec): its transform, crop and image size."""
        from ..engine.batches.interface import DataSpec

        return DataSpec(self.session.splits, self.data_config(built), self.size, self.config, None,
                        module if module is not None else built.module)


def select_run(s: "Session", checkpoint: str | None, position: Position | None) -> Run:
    """The Run of the live model (`checkpoint` None, at the session's `position`) or of the checkpoint named."""
    if checkpoint is None:
        pending = s.pending_state or {}  # a reopened session's checkpoint state while its data is not attached
        if s.splits is not None:
            classes = tuple(s.splits.classes)
        elif pending.get("classes"):
            classes = tuple(pending["classes"])
        else:
            classes = tuple(str(i) for i in range(s.spec.num_classes)) if s.spec is not None else ()
        size = int((s.data or {}).get("size") or 0) if s.data else int(pending.get("size") or 0)
        return Run(s, position, s.config, size, classes)
    path = resolve_checkpoint(s, checkpoint)
    state = C.load_checkpoint(path)
    n = (state.get("model_spec") or {}).get("num_classes") if isinstance(state.get("model_spec"), dict) else None
    classes = tuple(state.get("classes") or []) or tuple(str(i) for i in range(int(n or 0)))
    return Run(s, Position.of_state(state), TrainConfig.from_dict(state.get("config") or {}),
               int(state.get("size") or 0), classes, path, state)


def checkpoint_copy(s: "Session", path: Path, state: dict | None = None):
    """(BuiltModel, ModelSpec, state) of a checkpoint: a fresh model of the session's kind with the checkpoint's
    weights. The model comes from the session (the user's `load` or session file), never from the checkpoint: one
    made by another model is refused, so a stranger's checkpoint cannot name code to import. Call through
    Session.apply."""
    import torch

    from ..engine import models as M

    if s.spec is None:
        raise PgError("no model yet: `load MODEL` first — the model is yours to name, a checkpoint only brings "
                      "weights")
    state = C.load_checkpoint(path) if state is None else state
    theirs = state.get("model_spec")
    theirs = (theirs.get("name"), theirs.get("num_classes")) if isinstance(theirs, dict) else (theirs, None)
    if theirs != (s.spec.name, s.spec.num_classes):
        raise PgError(f"{path.name} was made by another model ({str(theirs[0])[:80]}, {theirs[1]} classes) than this "
                      f"session's ({s.spec.name}, {s.spec.num_classes} classes): a checkpoint never chooses the "
                      "model — evaluate it in a session of its own model")
    spec = s.spec
    with torch.random.fork_rng(devices=[]):  # the copy's throwaway initialisation leaves the global stream as it was
        built = M.build_skeleton(spec)
    M.restore_weights(built.module, state["model"], [], f"{path.name} ({spec.name})")
    return built, spec, state


# ====================================================================== checkpoints by name
def _ckdir(s: "Session") -> Path:
    if s.folder is None:
        raise PgError("this session has no checkpoints yet: they are written at every epoch end, pause and `save`")
    return s.folder / "checkpoints"


def resolve_checkpoint(s: "Session", which: str | None) -> Path:
    """EPOCH (a number) | step:N (a pause, save or epoch end at step N) | best | last | soup | PATH -> the
    checkpoint file (None: last). The one resolver: `fork`, `eval`, `errors`, `predict`, `explain`, `export` and
    `soup` all name checkpoints through it."""
    which = "last" if which is None else str(which).strip()
    step = re.fullmatch(r"step[:-]?(\d+)", which)
    if step:
        path = _at_step(s, int(step.group(1)))
    elif which == "best":
        if not s.best:
            raise PgError("no best checkpoint yet: it is chosen at epoch ends by `best_metric` "
                          "(`checkpoints` lists what there is)")
        path = s.root / s.best["path"]
    elif which == "last":
        files = C.list_checkpoint_files(_ckdir(s))
        path = s.latest_checkpoint if s.latest_checkpoint and s.latest_checkpoint.exists() else (
            files[-1] if files else None)
        if path is None:
            raise PgError("no checkpoint yet: one is written at every epoch end, pause and `save`")
    elif which == "soup":  # the last `soup` made (session/best.py)
        path = _ckdir(s) / "soup.safetensors"
        if not path.exists():
            raise PgError("no soup yet: `soup` averages the epoch checkpoints into one")
    elif which.isdigit():
        path = _ckdir(s) / f"epoch-{int(which):04d}.safetensors"
        if not path.exists():
            raise PgError(f"no checkpoint for epoch {int(which)}: `checkpoints` lists them"
                          + (" (keep_last removes older ones)" if s.config.keep_last else ""))
    else:
        path = Path(which).expanduser()
        if not path.exists() and s.folder is not None and (_ckdir(s) / which).exists():
            path = _ckdir(s) / which
        if not path.is_file():
            raise PgError(f"no checkpoint {which}: give an epoch number, step:N, best, last or a .safetensors file "
                          "(`checkpoints` lists them)")
    if not path.exists():
        raise PgError(f"checkpoint {path} is missing on disk: `checkpoints` lists the ones there are")
    return path


def _at_step(s: "Session", step: int) -> Path:
    """The newest checkpoint file whose header says `step`."""
    for p in reversed(C.list_checkpoint_files(_ckdir(s))):
        try:
            if int(C.read_metadata(p).get("step", -1)) == step:
                return p
        except (C.CheckpointError, FileNotFoundError):
            continue
    raise PgError(f"no checkpoint at step {step}: `checkpoints` lists them (epoch ends, pauses and saves)")
