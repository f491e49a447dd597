"""Looking at what a session made: its checkpoints, their evaluation, predictions, exports, graphs and TensorBoard.

Session-level functions (each takes a Session); the engine does the work (engine/evaluate.py, plot.py, export.py,
tensorboard.py) and the shell only prints. Nothing here changes the live model or a paused run: a saved checkpoint is
evaluated on a model copy of its own.

Threads. Building a model draws from torch's global generator (weight initialisation) and the evaluation data path
seeds and restores the process-wide generators around every image; the worker's training relies on those same
generators between its own seeding and use. So every step that builds a model or reads through an ImageDataset runs
through `Session.apply`: at once when idle, between two batches when training (the run waits for it and then goes on
exactly as it would have). Steps that draw no random numbers — an eval-mode forward pass of a private copy, the
deterministic eval transform, writing files — run in the calling thread, so `predict` and `export` barely hold up a
run.
"""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.errors import PgError
from ..engine.names import escape

if TYPE_CHECKING:
    from .core import Session


from .files import C, disk_full


def _written(out, write):
    """`write()` writes `out` atomically (temp + rename); a full disk or an unwritable place is one line, and
    whatever was at `out` before is still there, whole."""
    try:
        return write()
    except OSError as e:
        if disk_full(e):
            raise PgError(f"the disk is full: {out} was not written (nothing half-written was left there) — free "
                          "some space and try again") from None
        raise PgError(f"cannot write {out}: {e.strerror or e}") from None


# ====================================================================== checkpoints
def _ckdir(s: "Session") -> Path:
    if s.folder is None:
        raise PgError("this session has no checkpoints yet: they are written at every epoch end, pause and `save`")
    return s.folder / "checkpoints"


def list_checkpoints(s: "Session") -> list[dict]:
    """Every checkpoint file of the session, oldest first, from the headers alone (no tensor is read)."""
    rows: list[dict] = []
    if s.folder is None:
        return rows
    best = (s.root / s.best["path"]).resolve() if s.best else None
    resume = s.latest_checkpoint.resolve() if s.latest_checkpoint else None
    for p in C.list_checkpoint_files(_ckdir(s)):
        try:
            meta = C.read_metadata(p)
            size = p.stat().st_size
        except FileNotFoundError:  # removed by retention since the listing (a run is going on)
            continue
        except C.CheckpointError:
            meta, size = {"kind": "unreadable"}, p.stat().st_size
        row = {"file": p.name, "path": str(p), "kind": meta.get("kind", "?"), "epoch": _int(meta.get("epoch")),
               "step": _int(meta.get("step")), "batch": _int(meta.get("batch")),
               "val_loss": _float(meta.get("val_loss")), "val_accuracy": _float(meta.get("val_accuracy")),
               "bytes": size, "time": meta.get("time", ""),
               "best": best == p.resolve(), "resume": resume == p.resolve()}
        rows.append(row)
    return rows


def _int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def resolve_checkpoint(s: "Session", which: str) -> Path:
    """EPOCH (a number) | best | last | PATH -> the checkpoint file."""
    which = str(which).strip()
    if which == "best":
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
            raise PgError(f"no checkpoint {which}: give an epoch number, best, last or a .safetensors file "
                          "(`checkpoints` lists them)")
    if not path.exists():
        raise PgError(f"checkpoint {path} is missing on disk: `checkpoints` lists the ones there are")
    return path


def _checkpoint_copy(s: "Session", path: Path):
    """(BuiltModel, ModelSpec, state) of a checkpoint: a fresh model of the session's kind with the checkpoint's
    weights. The model comes from the session (the user's `load` or session file), never from the checkpoint: one
    made by another model is refused, so a stranger's checkpoint cannot name code to import. Call through
    Session.apply."""
    import torch

    from ..engine import models as M

    if s.spec is None:
        raise PgError("no model yet: `load MODEL` first — the model is yours to name, a checkpoint only brings "
                      "weights")
    state = C.load_checkpoint(path)
    theirs = state.get("model_spec")
    theirs = (theirs.get("name"), theirs.get("num_classes")) if isinstance(theirs, dict) else (theirs, None)
    if theirs != (s.spec.name, s.spec.num_classes):
        raise PgError(f"{path.name} was made by another model ({str(theirs[0])[:80]}, {theirs[1]} classes) than this "
                      f"session's ({s.spec.name}, {s.spec.num_classes} classes): a checkpoint never chooses the "
                      "model — evaluate it in a session of its own model")
    spec = s.spec
    with torch.random.fork_rng(devices=[]):  # the copy's throwaway initialisation leaves the global stream as it was
        built = M.build_model(M.ModelSpec(spec.name, spec.num_classes))
    M.restore_weights(built.module, state["model"], [], f"{path.name} ({spec.name})")
    return built, spec, state


# ====================================================================== evaluation
def evaluate(s: "Session", splits: list[str] | None = None, checkpoint: str | None = None,
             weights: str = "live") -> list[dict]:
    """Full reports (loss, accuracy, top-5, per-class P/R/F1, confusion, confused pairs) per split, of the live model
    or of a saved checkpoint (evaluated on its own copy, with the settings and image size it was trained with, so
    `--checkpoint N` reproduces the validation row logged at epoch N to the bit). weights "ema": the averaged weights
    (`set ema`) instead of the trained ones."""
    from ..engine import recipes as R

    from ..engine.evaluate import classification_report

    if s.splits is None:
        raise PgError("no data attached: `data PATH` attaches the images to evaluate on")
    splits = splits or (["val", "test"] if s.splits.test else ["val"])
    for split in splits:
        if not getattr(s.splits, split, None):
            raise PgError(f"there is no {split} split in this dataset"
                          + (" (a test/ folder next to train/ and val/ makes one)" if split == "test" else ""))
    if checkpoint is None:
        # while a run goes on its trainer is the one to use; ensure_trainer could reconfigure it under the worker
        tr = s.trainer if s.running else s.ensure_trainer()
        module = R.live_ema_module(tr) if weights == "ema" else None
        results = s.apply(lambda: [tr.evaluate(split, collect=True, module=module) for split in splits])
        source = {"checkpoint": None, "model": "current weights",
                  "epoch": tr.pos.epoch, "step": tr.pos.step, "batch": tr.pos.batch}
    else:
        path = resolve_checkpoint(s, checkpoint)
        results, state = s.apply(lambda: _evaluate_checkpoint(s, path, splits, weights))
        pos = state["position"]
        source = {"checkpoint": str(path), "model": path.name, "epoch": pos["epoch"], "step": pos["step"],
                  "batch": pos["batch"]}
    classes = list(s.splits.classes)
    reports = []
    for r in results:
        report = classification_report(r.pop("logits"), r.pop("labels"), classes)
        report.update(split=r["split"], loss=r["loss"], accuracy=r["accuracy"], n=r["n"], classes=classes,
                      bad=len(r["bad"]), **source)
        reports.append(report)
    return reports


def _evaluate_checkpoint(s: "Session", path: Path, splits: list[str], weights: str = "live"):
    from ..engine import recipes as R
    from ..engine.config import TrainConfig
    from ..engine.train import Trainer

    built, spec, state = _checkpoint_copy(s, path)
    classes = list(state.get("classes") or [])
    if classes and classes != list(s.splits.classes):
        raise PgError(f"{path.name} was trained on the classes {', '.join(classes[:6])}; the attached data has "
                      f"{', '.join(s.splits.classes[:6])}: attach its data (`data PATH`) to evaluate it")
    # a Trainer of its own: the evaluation pass, loss, batch size and transform are exactly the training run's. The
    # device and precision are where the session runs now (a checkpoint from a GPU machine evaluates on a laptop);
    # on the machine and settings it was trained with, the numbers are the logged ones to the bit.
    here = {k: getattr(s.config, k) for k in ("device", "amp", "channels_last", "devices")}
    cfg = TrainConfig.from_dict({**state["config"], **here})
    tr = Trainer(built, spec, s.splits, cfg, log=None, size=int(state.get("size") or 0))
    module = R.ema_module(built.module, state) if weights == "ema" else None
    return [tr.evaluate(split, collect=True, module=module) for split in splits], state


def confusion_png(report: dict, out: str) -> Path:
    from ..engine.plot import confusion_png as draw

    title = f"{report['model']} — {report['split']} ({report['n']} images, accuracy {report['accuracy']:.3f})"
    return _written(out, lambda: draw(report["confusion"], report["classes"], out, title))


# ====================================================================== the model: live or saved
def _model_for_use(s: "Session", checkpoint: str | None):
    """(private module copy, classes, image size, data_config, description) of the live model or a checkpoint; the
    data config has the evaluation policy of its settings in force (crop_pct, interpolation, normalize)."""
    from ..engine.config import TrainConfig
    from ..engine.data import policy_data_config

    if checkpoint is not None:
        path = resolve_checkpoint(s, checkpoint)
        built, spec, state = s.apply(lambda: _checkpoint_copy(s, path))
        classes = list(state.get("classes") or []) or [str(i) for i in range(spec.num_classes)]
        config = policy_data_config(built.data_config, TrainConfig.from_dict(state.get("config") or {}))
        return built.module, classes, int(state.get("size") or 0), config, {
            "checkpoint": str(path), "model": spec.name, "epoch": state["position"]["epoch"],
            "step": state["position"]["step"]}
    if s.built is None:
        raise PgError("no model yet: `load MODEL` first, or give --checkpoint")
    module = s.apply(lambda: copy.deepcopy(s.built.module))  # between batches: never half-way through a step
    pending = s.pending_state  # a reopened session's checkpoint state while its data is not attached
    if s.splits is not None:
        classes = list(s.splits.classes)
    elif pending and pending.get("classes"):
        classes = list(pending["classes"])
    else:
        classes = [str(i) for i in range(s.spec.num_classes)]
    if s.data:
        size = int(s.data.get("size") or 0)
    else:
        size = int((pending or {}).get("size") or 0)
    pos = s.trainer.pos if s.trainer is not None else None
    return module, classes, size, policy_data_config(s.built.data_config, s.config), {
        "checkpoint": None, "model": s.spec.name, "epoch": pos.epoch if pos else None, "step": pos.step if pos else None}


def predict(s: "Session", path: str, top: int = 5, checkpoint: str | None = None) -> dict:
    """Top-`top` classes with probabilities for an image or every image under a folder."""
    from ..engine import data as D
    from ..engine.evaluate import image_files, predict_files

    if top < 1:
        raise PgError("--top must be at least 1")
    files = image_files(path)
    if not files:
        raise PgError(f"no image at {path}: give an image file or a folder of images "
                      f"({', '.join(D.IMG_EXTENSIONS[:4])}, ...)")
    module, classes, size, data_config, source = _model_for_use(s, checkpoint)
    transform = D.build_transform(data_config, train=False, size=size)  # the model's own eval preprocessing
    raw = predict_files(module, files, transform, min(top, len(classes)))
    base = Path(path).expanduser().resolve()
    rows = []
    for r in raw:
        rel = escape(os.path.relpath(r["path"], base) if base.is_dir() else Path(r["path"]).name)  # printable
        if "error" in r:
            rows.append({"path": rel, "file": r["path"], "error": r["error"], "top": []})
        else:
            rows.append({"path": rel, "file": r["path"], "error": "",
                         "top": [(classes[i], p) for i, p in r["top"]]})
    return {"rows": rows, "classes": classes, "size": size, **source}


def write_predictions_csv(result: dict, out: str, top: int) -> Path:
    """One row per image: path (escaped: engine/names.py), class_1, prob_1, ..., class_K, prob_K, error."""
    import io

    out_path = Path(out)
    k = min(top, len(result["classes"]))
    f = io.StringIO()
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")] + ["error"])
    for r in result["rows"]:
        cells = [x for c, p in r["top"] for x in (c, repr(float(p)))]
        w.writerow([r["path"]] + cells + [""] * (2 * k - len(cells)) + [escape(r["error"]) if r["error"] else ""])
    _written(out, lambda: C.atomic_write_bytes(out_path, f.getvalue().encode()))
    return out_path


def export(s: "Session", fmt: str, path: str, checkpoint: str | None = None) -> dict:
    """The model (live or a checkpoint) as ONNX or TorchScript, with PATH.json: classes and preprocessing."""
    from ..engine.export import FORMATS, export_model, preprocessing

    if fmt not in FORMATS:
        raise PgError(f"export format must be onnx or torchscript, not {fmt!r}")
    module, classes, size, data_config, source = _model_for_use(s, checkpoint)
    info = {"model": source["model"], "classes": classes, "preprocessing": preprocessing(data_config, size),
            "source": {k: v for k, v in source.items() if k != "model"}}
    return _written(path, lambda: export_model(module, fmt, path, info))


def export_timm(s: "Session", folder: str, checkpoint: str | None = None) -> dict:
    """The model (live or a checkpoint) as timm publishes one: FOLDER/model.safetensors + config.json with its class
    names and the eval preprocessing it was trained with, then rebuilt by timm and compared."""
    from ..engine.export import check_timm, export_timm as write, preprocessing, timm_architecture

    module, classes, size, data_config, source = _model_for_use(s, checkpoint)
    timm_architecture(module)  # before any file is written
    info = write(module, folder, classes, preprocessing(data_config, size))
    info["check"] = {"max_abs_diff": s.apply(lambda: check_timm(module, folder, info["preprocessing"])),
                     "by": f"timm.create_model('local-dir:{folder}', pretrained=True)"}
    return {**info, "model": source["model"], "source": {k: v for k, v in source.items() if k != "model"}}


# ====================================================================== graphs
def _rows_of(source: str, skipped: dict | None = None) -> tuple[str, list[dict]]:
    """(name, metrics rows) of a .session file, a session folder or a metrics.csv file; unreadable rows are left
    out and counted in `skipped` by name."""
    from ..engine.metrics import read_rows_counted

    p = Path(source).expanduser()
    if p.suffix == ".session":
        try:
            doc = json.loads(p.read_text())
        except FileNotFoundError:
            raise PgError(f"no session file {p}") from None
        except (OSError, ValueError):
            raise PgError(f"{p} is not a readable session file") from None
        folder = p.parent / str(doc.get("folder") or p.stem)
        name, csv_path = p.stem, folder / "metrics.csv"
    elif p.is_dir():
        name, csv_path = p.name, p / "metrics.csv"
    else:
        name, csv_path = p.parent.name or p.stem, p
    if not csv_path.is_file():
        raise PgError(f"no metrics for {source}: {csv_path} does not exist (train first)")
    rows, bad = read_rows_counted(csv_path)
    if bad and skipped is not None:
        skipped[name] = bad
    return name, rows


def _log_of(source: str) -> list[dict]:
    """The change-log entries of a session named by its .session file or folder (none for a bare metrics.csv)."""
    from .changelog import LOG, read_log

    p = Path(source).expanduser()
    folder = p.with_suffix("") if p.suffix == ".session" else p if p.is_dir() else p.parent
    return read_log(folder / LOG)[1] if (folder / LOG).is_file() else []


def _marks(entries: list[dict]) -> list[dict]:
    """The changes made once training was under way (those before its first step set the run up) and forks."""
    from .changelog import REPLAYED, label

    return [{"step": e["step"], "label": label(e)} for e in entries
            if e["step"] > 0 and (e["kind"] in REPLAYED or e["kind"] == "fork")]


def plot(s: "Session", sources: list[str], out: str | None = None, smooth: int = 10, metric: str = "all",
         trial: str = "") -> dict:
    """Curves from metrics.csv: of the named sessions (overlaid), or of this one. A PNG with `out`, else text."""
    from ..engine import plot as P

    if smooth < 1:
        raise PgError("--smooth must be at least 1 (1: no smoothing)")
    if metric not in (*P.METRICS, "all"):
        raise PgError(f"--metric must be loss, accuracy, lr or all, not {metric!r}")
    skipped: dict[str, int] = {}
    if sources:
        loaded = [(*_rows_of(src, skipped), _marks(_log_of(src))) for src in sources]
    else:
        if s.folder is None or not (s.folder / "metrics.csv").exists():
            raise PgError("no metrics yet: train first, or name session files (`plot sessions/a.session`)")
        s.sync_metrics()
        loaded = [(s.name, _rows_of(str(s.folder), skipped)[1], _marks(s.changes.entries))]
    named = [(name, P.plot_series(rows, smooth, trial, marks)) for name, rows, marks in loaded]
    empty = [name for name, ser in named if not ser["train"]["step"]]
    if empty:
        what = f"trial {trial}" if trial else "training (not tuning-trial)"
        raise PgError(f"no {what} rows in the metrics of {', '.join(empty)}"
                      + ("" if trial else ": `--trial N` plots a tuning trial"))
    result = {"series": {name: ser for name, ser in named}, "names": [n for n, _ in named], "skipped": skipped}
    if out:
        result["out"] = str(_written(out, lambda: P.draw_png(named, out, metric)))
    else:
        result["text"] = P.draw_text(named, metric)
    return result
