"""Looking at what a session made: its checkpoints, their evaluation, predictions, exports, graphs and TensorBoard.

Session-level functions (each takes a Session); the engine does the work (engine/report: evaluate.py, plot.py,
export.py, tensorboard.py) and the shell only prints. Nothing here changes the live model or a paused run: a saved checkpoint is
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

import csv
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.errors import PgError
from ..engine.names import cell, escape

if TYPE_CHECKING:
    from .core import Session


from .document import folder_of, read_raw
from .files import C, disk_full
from .run import _ckdir, checkpoint_copy as _checkpoint_copy, resolve_checkpoint  # noqa: F401 (best.py, tests)


def written(out, write):
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


# ====================================================================== evaluation
def evaluate(s: "Session", splits: list[str] | None = None, checkpoint: str | None = None,
             weights: str = "live", tta: str | None = None) -> list[dict]:
    """Full reports (loss, accuracy, top-5, per-class P/R/F1, confusion, confused pairs) per split, of the live model
    or of a saved checkpoint (evaluated on its own copy, with the settings and image size it was trained with, so
    `--checkpoint N` reproduces the validation row logged at epoch N to the bit). weights "ema": the averaged weights
    (`set ema`) instead of the trained ones. tta "flip" | "none": test-time augmentation for this evaluation (default:
    the `tta` setting of the model evaluated)."""
    from ..engine.report.evaluate import classification_report

    if s.splits is None:
        raise PgError("no data attached: `data PATH` attaches the images to evaluate on")
    splits = splits or (["val", "test"] if s.splits.test else ["val"])
    for split in splits:
        if not getattr(s.splits, split, None):
            raise PgError(f"there is no {split} split in this dataset"
                          + (" (a test/ folder next to train/ and val/ makes one)" if split == "test" else ""))
    run = s.select_run(checkpoint)

    def read():
        tr = run.reader()
        module = run.ema_module(tr) if weights == "ema" else None
        return [tr.evaluate(split, collect=True, module=module, tta=tta) for split in splits]

    results = s.apply(read)
    source = {"checkpoint": str(run.checkpoint) if run.checkpoint else None, "model": run.label, **run.where()}
    classes = list(s.splits.classes)
    cfg = run.config  # the settings evaluated with
    used = tta or cfg.tta
    reports = []
    for r in results:
        report = classification_report(r.pop("logits"), r.pop("labels"), classes)
        report.update(split=r["split"], loss=r["loss"], accuracy=r["accuracy"], n=r["n"], classes=classes, tta=used,
                      bad=len(r["bad"]), label_smoothing=cfg.label_smoothing, **source)
        reports.append(report)
    return reports


def confusion_png(report: dict, out: str) -> Path:
    from ..engine.report.plot import confusion_png as draw

    title = f"{report['model']} — {report['split']} ({report['n']} images, accuracy {report['accuracy']:.3f})"
    return written(out, lambda: draw(report["confusion"], report["classes"], out, title))


# ====================================================================== the model: live or saved
def _run_model(s: "Session", checkpoint: str | None):
    """(Run, a private BuiltModel of its weights) of the live model or a checkpoint (session/run.py)."""
    if checkpoint is None and s.built is None:
        raise PgError("no model yet: `load MODEL` first, or give --checkpoint")
    run = s.select_run(checkpoint)
    return run, s.apply(run.model)  # between batches: never half-way through a step


def _source(s: "Session", run) -> dict:
    where = run.where()
    return {"checkpoint": str(run.checkpoint) if run.checkpoint else None, "model": s.spec.name,
            "epoch": where["epoch"], "step": where["step"]}


def _model_for_use(s: "Session", checkpoint: str | None):
    """(private module copy, classes, image size, data_config, description) of the live model or a checkpoint; the
    data config has the evaluation policy of its settings in force (crop_pct, interpolation, normalize)."""
    run, built = _run_model(s, checkpoint)
    return built.module, list(run.classes), run.size, run.data_config(built), _source(s, run)


def predict(s: "Session", path: str, top: int = 5, checkpoint: str | None = None) -> dict:
    """Top-`top` classes with probabilities for an image or every image under a folder."""
    from ..engine import data as D
    from ..engine.report.evaluate import image_files, predict_files

    if top < 1:
        raise PgError("--top must be at least 1")
    files = image_files(path)
    if not files:
        raise PgError(f"no image at {path}: give an image file or a folder of images "
                      f"({', '.join(D.IMG_EXTENSIONS[:4])}, ...)")
    module, classes, size, data_config, source = _model_for_use(s, checkpoint)
    transform = D.eval_transform(data_config, size)  # the evaluation policy is in data_config already
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
    return {"rows": rows, "classes": classes, "size": size, **source, **_add_truth(rows, classes, base)}


def _add_truth(rows: list[dict], classes: list[str], base: Path) -> dict:
    """Under a folder with class subfolders (`cat/x.jpg`, or `val/cat/x.jpg`) each image's true class is its nearest
    folder named after a class: rows get "true" and "correct"; returns {"labelled": n, "accuracy": a} (or {})."""
    if not base.is_dir():
        return {}
    known = set(classes)
    labelled = correct = 0
    for r in rows:
        folders = Path(r["path"]).parts[:-1]
        r["true"] = next((f for f in reversed(folders) if f in known), "")
        r["correct"] = bool(r["true"]) and bool(r["top"]) and r["top"][0][0] == r["true"]
        labelled += bool(r["true"])
        correct += r["correct"]
    return {"labelled": labelled, "accuracy": correct / labelled} if labelled else {}


def write_predictions_csv(result: dict, out: str, top: int) -> Path:
    """One row per image: path (escaped: engine/names.py), class_1, prob_1, ..., class_K, prob_K, error; and true,
    correct when the folder's subfolders name the classes."""
    import io

    out_path = Path(out)
    k = min(top, len(result["classes"]))
    truth = ["true", "correct"] if result.get("labelled") else []
    f = io.StringIO()
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["path"] + [c for i in range(1, k + 1) for c in (f"class_{i}", f"prob_{i}")] + ["error"] + truth)
    for r in result["rows"]:
        cells = [x for c, p in r["top"] for x in (c, repr(float(p)))]
        known = [r["true"], int(r["correct"])] if truth and r["true"] else [""] * len(truth)
        w.writerow([cell(x) for x in [r["path"]] + cells + [""] * (2 * k - len(cells))
                    + [escape(r["error"]) if r["error"] else ""] + known])  # a label `=cmd|...`: text, not a formula
    written(out, lambda: C.atomic_write_bytes(out_path, f.getvalue().encode()))
    return out_path


def export(s: "Session", fmt: str, path: str, checkpoint: str | None = None) -> dict:
    """The model (live or a checkpoint) as ONNX or TorchScript, with PATH.json: classes and preprocessing."""
    from ..engine.report.export import FORMATS, export_model, preprocessing

    if fmt not in FORMATS:
        raise PgError(f"export format must be onnx or torchscript, not {fmt!r}")
    module, classes, size, data_config, source = _model_for_use(s, checkpoint)
    info = {"model": source["model"], "classes": classes, "preprocessing": preprocessing(data_config, size),
            "source": {k: v for k, v in source.items() if k != "model"}}
    return written(path, lambda: export_model(module, fmt, path, info))


def export_timm(s: "Session", folder: str, checkpoint: str | None = None) -> dict:
    """The model (live or a checkpoint) as timm publishes one: FOLDER/model.safetensors + config.json with its class
    names and the eval preprocessing it was trained with, then rebuilt by timm and compared."""
    from ..engine.report.export import check_timm, export_timm as write, preprocessing, timm_architecture

    module, classes, size, data_config, source = _model_for_use(s, checkpoint)
    timm_architecture(module)  # before any file is written
    info = write(module, folder, classes, preprocessing(data_config, size))
    info["check"] = {"max_abs_diff": s.apply(lambda: check_timm(module, folder, info["preprocessing"])),
                     "by": f"timm.create_model('local-dir:{folder}', pretrained=True)"}
    return {**info, "model": source["model"], "source": {k: v for k, v in source.items() if k != "model"}}


# ====================================================================== graphs
def _rows_of(source: str, skipped: dict | None = None) -> tuple[str, list[dict], set[int] | None]:
    """(name, metrics rows, steps where runs paused) of a .session file, a session folder or a metrics.csv file;
    unreadable rows are left out and counted in `skipped` by name."""
    from ..engine.train.metrics import read_rows_counted

    p = Path(source).expanduser()
    if p.suffix == ".session":
        name, csv_path = p.stem, folder_of(p, read_raw(p)) / "metrics.csv"
    elif p.is_dir():
        name, csv_path = p.name, p / "metrics.csv"
    else:
        name, csv_path = p.parent.name or p.stem, p
    if not csv_path.is_file():
        raise PgError(f"no metrics for {source}: {csv_path} does not exist (train first)")
    rows, bad = read_rows_counted(csv_path)
    if bad and skipped is not None:
        skipped[name] = bad
    return name, rows, _paused_at(csv_path.parent / "checkpoints")


def _paused_at(ckdir: Path) -> set[int] | None:
    """The steps of the session's pause checkpoints (a pause, a stop and a `save` mid-run write one; a finished run,
    an epoch end and a `save` while idle write other kinds), or None when there is no checkpoint folder to tell.
    A pause checkpoint that retention or `checkpoints prune` removed takes its mark with it."""
    if not ckdir.is_dir():
        return None
    steps = set()
    for p in C.list_checkpoint_files(ckdir):
        try:
            meta = C.read_metadata(p)
        except (C.CheckpointError, FileNotFoundError):
            continue
        if meta.get("kind") == "pause" and _int(meta.get("step")) is not None:
            steps.add(int(meta["step"]))
    return steps


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
         trial: str = "", x: str = "step") -> dict:
    """Curves from metrics.csv: of the named sessions (overlaid), or of this one. A PNG with `out`, else text.
    `x`: step, epoch or time (overlaying runs by step misleads when their batch sizes differ)."""
    from ..engine.report import plot as P

    if smooth < 1:
        raise PgError("--smooth must be at least 1 (1: no smoothing)")
    if metric not in (*P.METRICS, "all"):
        raise PgError(f"--metric must be loss, accuracy, lr or all, not {metric!r}")
    skipped: dict[str, int] = {}
    if x not in P.X_AXES:
        raise PgError(f"--x must be epoch, step or time, not {x!r}")
    if sources:
        loaded = [(*_rows_of(src, skipped), _marks(_log_of(src))) for src in sources]
    else:
        if s.folder is None or not (s.folder / "metrics.csv").exists():
            raise PgError("no metrics yet: train first, or name session files (`plot sessions/a.session`)")
        s.sync_metrics()
        loaded = [(s.name, *_rows_of(str(s.folder), skipped)[1:], _marks(s.changes.entries))]
    named = [(name, P.plot_series(rows, smooth, trial, marks, paused)) for name, rows, paused, marks in loaded]
    empty = [name for name, ser in named if not ser["train"]["step"]]
    if empty:
        what = f"trial {trial}" if trial else "training (not tuning-trial)"
        raise PgError(f"no {what} rows in the metrics of {', '.join(empty)}"
                      + ("" if trial else ": `--trial N` plots a tuning trial"))
    result = {"series": {name: ser for name, ser in named}, "names": [n for n, _ in named], "skipped": skipped,
              "x": x}
    if out:
        result["out"] = str(written(out, lambda: P.draw_png(named, out, metric, x)))
    else:
        result["text"] = P.draw_text(named, metric, x=x)
    return result


# ====================================================================== mistakes, baselines, runs, disk
def _size_of(s: "Session") -> int:
    return int((s.data or {}).get("size") or 0)


def _class_index(classes: list[str], name: str) -> int:
    if name not in classes:
        shown = ", ".join(classes[:12]) + (" ..." if len(classes) > 12 else "")
        raise PgError(f"no class {name!r}: the classes are {shown}")
    return classes.index(name)


def _split_outputs(s: "Session", split: str, checkpoint: str | None):
    """(eval result with logits and labels, the samples they belong to, source) of one split, in the split's order:
    the plain evaluation pass (the feature and image caches' batches do not say which image they left out)."""
    from ..engine.report.evaluate import evaluate_dataset

    if s.splits is None:
        raise PgError("no data attached: `data PATH` attaches the images to look at")
    samples = getattr(s.splits, split, None)
    if not samples:
        raise PgError(f"there is no {split} split in this dataset")
    run = s.select_run(checkpoint)

    def read():
        tr = run.reader()
        ds = tr.eval_dataset(split)  # the evaluation policy of the weights read, as `eval` reads the split
        return evaluate_dataset(tr.built.module, ds, tr.loss_fn, tr.runtime, tr.cfg.batch_size, tr.cfg.workers,
                                tr.cfg.seed, collect=True, num_classes=len(s.splits.classes), tta=tr.cfg.tta)

    result = s.apply(read)
    source = {"model": run.label, "epoch": run.where()["epoch"], "step": run.where()["step"]}
    bad = {p for p, _ in result["bad"]}
    kept = [(p, label) for p, label in samples if p not in bad]
    if len(kept) != len(result["labels"]):  # the plain pass lists every image it left out: this cannot happen
        raise RuntimeError(f"{len(kept)} usable images but {len(result['labels'])} predictions")
    return result, kept, source


# the errors path's evaluation and class check, for `errors --suspect` (session/dataaudit.py)
split_outputs, class_index = _split_outputs, _class_index


def top_losses(s: "Session", split: str = "val", top: int = 16, cls: str | None = None,
               checkpoint: str | None = None) -> dict:
    """The images of a split with the highest loss (fastai's plot_top_losses), highest first: path, true class,
    predicted class and its probability, the true class's probability, and the loss (cross-entropy: -log p(true))."""
    import torch.nn.functional as F

    if top < 1:
        raise PgError("--top must be at least 1")
    classes = list(s.splits.classes) if s.splits is not None else []
    wanted = _class_index(classes, cls) if cls is not None else None
    result, kept, source = _split_outputs(s, split, checkpoint)
    logits, labels = result["logits"].float(), result["labels"].long()
    probs = logits.softmax(1)
    losses = F.cross_entropy(logits, labels, reduction="none")
    order = sorted(range(len(kept)), key=lambda i: -losses[i].item())  # stable: ties keep the split's order
    if wanted is not None:
        order = [i for i in order if labels[i].item() == wanted]
    base = Path(s.data["path"])
    rows = []
    for rank, i in enumerate(order[:top], 1):
        pred = int(probs[i].argmax())
        rows.append({"rank": rank, "path": os.path.relpath(kept[i][0], base), "file": kept[i][0],
                     "true": classes[labels[i].item()], "predicted": classes[pred],
                     "probability": probs[i, pred].item(), "p_true": probs[i, labels[i]].item(),
                     "loss": losses[i].item()})
    return {"rows": rows, "split": split, "n": len(kept), "class": cls, **source}


ERRORS_COLUMNS = ["rank", "path", "true", "predicted", "probability", "p_true", "loss"]
SHEET_TILES = 64  # tiles on one PNG (8 x 8): more go on further pages, so each stays a few MB and readable
TILE_PX = 160  # each image is scaled to fit a square of this many pixels before it is drawn


def sheet_paths(out: Path, n: int) -> list[Path]:
    """The PNG pages of a sheet of `n` tiles: FILE.png, then FILE-2.png, FILE-3.png, ..."""
    pages = max(1, -(-n // SHEET_TILES))
    return [out] + [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(2, pages + 1)]


def write_errors(result: dict, out: str) -> dict:
    """The contact sheet (FILE.png: tiles row by row, each labelled true / predicted / probability; past
    SHEET_TILES tiles more pages FILE-2.png, ...) and its sidecar FILE.csv (the same rows, in tile order). Returns
    {"out", "pages", "csv", "tiles": pixel boxes on their page, "page" of each tile, "labels"}."""
    import numpy as np

    from ..engine import data as D
    from ..engine.report.plot import contact_sheet_png

    if not result["rows"]:
        raise PgError("no images to draw" + (f" of class {result['class']}" if result["class"] else ""))
    out_path = Path(out)
    if out_path.suffix.lower() != ".png":
        raise PgError(f"--out draws a PNG: give FILE.png, not {out}")
    images, labels = [], []
    for r in result["rows"]:
        try:
            picture = D.load_image(r["file"], min_side=TILE_PX)
        except D.BadImage as e:  # changed on disk since the evaluation
            raise PgError(f"cannot draw {r['path']}: {e}") from None
        picture.thumbnail((TILE_PX, TILE_PX))  # a sheet of 341 full-size photos was 18 MB (and their memory)
        images.append(np.asarray(picture))
        labels.append(f"true {r['true']}\npred {r['predicted']} {r['probability']:.2f}")
    what = f"{result['split']}, {result['model']}" + (f", class {result['class']}" if result["class"] else "")
    wrong = [r["true"] != r["predicted"] for r in result["rows"]]
    paths, pages, boxes, page_of = sheet_paths(out_path, len(images)), [], [], []
    for k, path in enumerate(paths):
        part = slice(k * SHEET_TILES, (k + 1) * SHEET_TILES)
        first, last = part.start + 1, min(part.stop, len(images))
        title = f"highest losses ({what})" + (f" — {first} to {last} of {len(images)}" if len(paths) > 1 else "")
        png, page_boxes = contact_sheet_png(images[part], labels[part], path, title, wrong=wrong[part],
                                            tile=TILE_PX / 100)
        pages.append(str(png))
        boxes += page_boxes
        page_of += [k] * len(page_boxes)
    csv_path = out_path.with_suffix(".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ERRORS_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: cell(v) for k, v in {**r, **{k: repr(r[k]) for k in ("probability", "p_true", "loss")}}.items()}
                    for r in result["rows"])
    return {"out": pages[0], "pages": pages, "csv": str(csv_path), "tiles": boxes, "page": page_of,
            "labels": labels}


# ====================================================================== where the model looks (`explain`)
def explain(s: "Session", image: str, cls: str | None = None, out: str | None = None,
            checkpoint: str | None = None, method: str = "gradcam") -> dict:
    """A class-activation map of one image for `cls` (default: the predicted class), on the original image's pixels
    (H, W). Computed on a private copy of the model in the calling thread: a run goes on undisturbed."""
    import numpy as np

    from ..engine import data as D
    from ..engine.report import explain as X
    from ..engine.batches.inputcache import EvalCrop

    run, built = _run_model(s, checkpoint)
    module, classes, spec = built.module, list(run.classes), run.eval_spec(built)  # the run's evaluation data
    index = _class_index(classes, cls) if cls is not None else None
    try:
        picture = D.load_image(str(Path(image).expanduser()))
    except D.BadImage as e:
        raise PgError(f"cannot read {image}: {e}") from None
    x = spec.transform(train=False)(picture)[None]
    res = X.activation_map(module, x.to(next(module.parameters()).device), index, method)
    steps = EvalCrop.for_spec(spec)
    full = X.to_image_frame(res["map"], picture.size, steps.resize.size, steps.crop.size)
    probs = res["probabilities"]
    result = {"image": str(image), "class": classes[res["class"]], "probability": probs[res["class"]].item(),
              "predicted": classes[int(probs.argmax())], "map": full, "input_map": res["map"], "layer": res["layer"],
              "method": method, "empty": not full.any(), **_source(s, run)}
    if out:
        from ..engine.report.plot import activation_png

        title = (f"{X.METHODS[method]} for {result['class']} (p {result['probability']:.2f}; predicted "
                 f"{result['predicted']}) at {res['layer']}")
        result["out"] = str(activation_png(np.asarray(picture), full, out, title))
    else:
        from ..engine.report.plot import draw_heat_text

        result["text"] = draw_heat_text(full)
    return result


# ====================================================================== a baseline in seconds (`probe`)
PROBE_FILE = "probe.json"
_probe_features_cache: dict = {}  # one entry: the last features extracted (`probe knn` then `probe linear` reuse it)


def _probe_key(s: "Session", tr) -> tuple:
    """What the features depend on: the model object and its weights (a cheap sum), the data, the image size and
    the evaluation policy."""
    import torch

    with torch.no_grad():
        weights = sum(float(t.double().abs().sum()) for t in s.built.module.state_dict().values()
                      if t.is_floating_point())
    policy = (tr.cfg.crop_pct, tr.cfg.interpolation, tr.cfg.normalize)
    return (id(s.built.module), weights, s.data["path"], len(s.splits.train), len(s.splits.val), _size_of(s), policy)


def _probe_features(s: "Session", tr) -> dict:
    """{"train"|"val": (features, labels)} of the usable images: the head's input, the backbone in eval mode, with
    the eval transform. Runs through Session.apply (the data path seeds the process-wide generators)."""
    import torch

    from ..engine.report.evaluate import eval_batch_size
    from ..engine.batches.features import compute_features, head_module_name

    key = _probe_key(s, tr)
    if key in _probe_features_cache:
        return _probe_features_cache[key]
    name = head_module_name(s.built.head)
    head = s.built.module.get_submodule(name) if name else s.built.module
    splits = {split: getattr(s.splits, split) for split in ("train", "val")}
    jobs = [(tr.eval_dataset(split), [(i, 0) for i in range(len(samples))]) for split, samples in splits.items()]
    found = compute_features(s.built.module, head, jobs, tr.runtime, eval_batch_size(tr.cfg.batch_size),
                             tr.cfg.workers)
    out = {}
    for (split, samples), (x, ok, _bad) in zip(splits.items(), found):
        y = torch.tensor([label for _, label in samples], device=x.device)
        out[split] = (x[ok], y[ok])
    _probe_features_cache.clear()
    _probe_features_cache[key] = out
    return out


def probe(s: "Session", kind: str, k: int = 20, apply: bool = False) -> dict:
    """Validation accuracy of a weighted k-NN (kind "knn") or a linear probe ("linear") on the frozen features of the
    current model; recorded in the session folder's probe.json (what `show` and `compare` print). `apply` (linear
    only): the fitted probe becomes the model's head (Session.set_head), the start of fine-tuning that Kumar et al.
    2022 call LP-FT — the backbone's first gradients then come from a fitted head, not a random one."""
    import time
    from datetime import datetime

    from ..engine.report import probe as PR

    if kind not in ("knn", "linear"):
        raise PgError(f"probe knn or probe linear, not {kind!r}")
    if k < 1:
        raise PgError("--k must be at least 1")
    if apply and kind != "linear":
        raise PgError("only the linear probe can become the head: `probe linear --apply`")
    if s.splits is None or s.built is None:
        raise PgError("probe needs a model and data: `load MODEL` and `data PATH` first")
    if not s.splits.val:
        raise PgError("there is no val split to measure the probe on")
    tr = s.select_run().reader()  # the live run's trainer (session/run.py)
    t0 = time.perf_counter()
    feats = s.apply(lambda: _probe_features(s, tr))
    t1 = time.perf_counter()
    (tx, ty), (vx, vy) = feats["train"], feats["val"]
    classes = len(s.splits.classes)
    if kind == "knn":
        scores = PR.knn_scores(tx, ty, vx, classes, k)
        extra = {"k": min(k, len(tx)), "temperature": PR.KNN_TEMPERATURE}
    else:
        fitted = PR.fit_linear(tx, ty, classes, seed=s.config.seed)
        scores, extra = fitted.scores(vx), {"weight_decay": fitted.weight_decay}
        if apply:
            extra["head"] = s.set_head(*fitted.as_linear(), cmd="probe linear --apply")
    result = {"kind": kind, "accuracy": PR.accuracy(scores, vy), **extra, "train": len(tx), "val": len(vx),
              "features": int(tx.shape[1]), "feature_seconds": t1 - t0, "fit_seconds": time.perf_counter() - t1,
              "model": s.spec.name, "epoch": tr.pos.epoch, "step": tr.pos.step,
              "time": datetime.now().isoformat(timespec="seconds")}
    _record_probe(s, result)
    return result


def _record_probe(s: "Session", result: dict) -> None:
    from ..engine.train.distributed import world

    if s.folder is None or not world().main:
        return
    recorded = probe_results(s)
    recorded[result["kind"]] = result
    C.atomic_write_bytes(s.folder / PROBE_FILE, (json.dumps(recorded, indent=2) + "\n").encode())


def probe_results(s: "Session") -> dict:
    """{"knn": {...}, "linear": {...}} as last recorded in the session folder ({} when never probed)."""
    return _read_probe(s.folder) if s.folder is not None else {}


def _read_probe(folder: Path) -> dict:
    try:
        doc = json.loads((folder / PROBE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in doc.items() if k in ("knn", "linear") and isinstance(v, dict)} \
        if isinstance(doc, dict) else {}


# ====================================================================== runs side by side (`compare`, `sessions`)
def folder_bytes(folder: Path) -> int:
    total = 0
    for p in folder.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:  # removed meanwhile (retention while a run goes on)
            pass
    return total


def _session_file(s: "Session", source: str) -> Path:
    """NAME (under the sessions folder), NAME.session or a path to one."""
    p = Path(source).expanduser()
    if p.suffix != ".session":
        p = s.root / f"{source}.session" if not p.parent.parts else p.with_suffix(".session")
    if not p.is_file():
        raise PgError(f"no session {source}: `sessions` lists them ({s.root}/NAME.session)")
    return p


def _checkpoint_header(root: Path, doc: dict) -> dict:
    """The session's latest checkpoint's header (position, kind, the JSON state), or {} when there is none."""
    rel = doc.get("checkpoint")
    if not isinstance(rel, str):
        return {}
    try:
        return C.read_metadata(root / rel)
    except (C.CheckpointError, FileNotFoundError):
        return {}


def _frozen(header: dict) -> str:
    try:
        frozen = json.loads(header["state"]).get("frozen") or []
    except (KeyError, ValueError, AttributeError):
        return "?"
    return f"{len(frozen)} tensors" if frozen else "none"


def _val_summary(rows: list[dict]) -> dict:
    """Best and final validation accuracy and loss, with their epochs, and the seconds of training batches."""
    val = [r for r in rows if r.get("split") == "val" and not r.get("trial")]
    out: dict = {"seconds": sum(_float(r.get("seconds")) or 0.0 for r in rows
                                if r.get("split") == "train" and not r.get("trial"))}
    if val:
        acc = max(val, key=lambda r: _float(r["accuracy"]) or 0.0)  # max/min keep the first of equals
        loss = min(val, key=lambda r: _float(r["loss"]) if _float(r["loss"]) is not None else float("inf"))
        out.update(best_accuracy=_float(acc["accuracy"]), best_accuracy_epoch=_int(acc["epoch"]),
                   best_loss=_float(loss["loss"]), best_loss_epoch=_int(loss["epoch"]),
                   final_accuracy=_float(val[-1]["accuracy"]), final_loss=_float(val[-1]["loss"]),
                   final_epoch=_int(val[-1]["epoch"]))
    return out


def session_summary(file: Path) -> dict:
    """One session as `compare` and `sessions` show it, from its files alone (no tensor is read)."""
    from datetime import datetime

    from ..engine.config import TrainConfig
    from ..engine.train.metrics import read_rows

    doc = read_raw(file)  # any version: the one reader of session files (session/document.py)
    folder = folder_of(file, doc)
    model, data = doc.get("model") or {}, doc.get("data") or {}
    header = _checkpoint_header(file.parent, doc)
    try:
        config = TrainConfig.from_dict(doc.get("config") or {}).to_dict()  # older files: today's defaults filled in
    except (PgError, TypeError, ValueError) as e:
        raise PgError(f"{file}: unreadable settings ({e})") from None
    size = data.get("size") if isinstance(data, dict) else None
    return {"session": file.stem, "file": str(file), "folder": str(folder), "model": model.get("name", ""),
            "pretrained": "file" if model.get("weights") else ("yes" if model.get("pretrained") else "no"),
            "data": (Path(str(data.get("path", ""))).name + (f" @{size}px" if size else "")) if data else "",
            "config": {**config, "frozen": _frozen(header)} if header else config,
            "epoch": _int(header.get("epoch")), "step": _int(header.get("step")), "batch": _int(header.get("batch")),
            "batches": _batches_per_epoch(data, config),
            "best": doc.get("best"), **_val_summary(read_rows(folder / "metrics.csv")),
            "bytes": file.stat().st_size + (folder_bytes(folder) if folder.is_dir() else 0),
            "last_used": datetime.fromtimestamp(file.stat().st_mtime).isoformat(timespec="seconds"),
            "probe": _read_probe(folder)}


def _batches_per_epoch(data, config: dict) -> int | None:
    """Batches in an epoch of the recorded data at the recorded batch size (for `where`'s `batch 18/26`)."""
    counts = data.get("counts") if isinstance(data, dict) else None
    train = counts.get("train") if isinstance(counts, dict) else None
    if not isinstance(train, int) or train < 1:
        return None
    return -(-train // max(1, int(config.get("batch_size") or 1)))


def _summaries(files: list[Path]) -> tuple[list[dict], list[str]]:
    rows, skipped = [], []
    for f in files:
        try:
            rows.append(session_summary(f))
        except PgError as e:
            skipped.append(str(e))
    return rows, skipped


def compare(s: "Session", sources: list[str]) -> dict:
    """The named sessions (default: every session under the sessions folder), best validation accuracy first, and
    the settings whose values differ between them (the frozen parameter count counts as one)."""
    files = [_session_file(s, src) for src in sources] if sources else sorted(s.root.glob("*.session"))
    if not files:
        raise PgError(f"no sessions under {s.root}: a session is saved when training starts or on `save`")
    rows, skipped = _summaries(files)
    if not rows:
        raise PgError("no readable session: " + "; ".join(skipped))
    keys = list(dict.fromkeys(k for r in rows for k in r["config"]))
    differing = [k for k in keys if len({json.dumps(r["config"].get(k)) for r in rows}) > 1]
    rows.sort(key=lambda r: (r.get("best_accuracy") is None, -(r.get("best_accuracy") or 0.0), r["session"]))
    return {"rows": rows, "differing": differing, "skipped": skipped}


def list_sessions(s: "Session") -> dict:
    """Every session under the sessions folder, last used first: name, model, position, best, size."""
    rows, skipped = _summaries(sorted(s.root.glob("*.session")))
    for r in rows:
        r["open"] = s.name == r["session"] and s.root.resolve() == Path(r["file"]).parent.resolve()
    rows.sort(key=lambda r: r["last_used"], reverse=True)
    from .files import orphan_folders

    orphans = [{"folder": str(p), "name": p.name, "bytes": folder_bytes(p)} for p in orphan_folders(s.root)]
    return {"rows": rows, "skipped": skipped, "bytes": sum(r["bytes"] for r in rows), "orphans": orphans}


# ====================================================================== freeing space
def session_removal(s: "Session", name: str) -> dict:
    """What `sessions rm NAME` deletes: {"session", "paths", "bytes", "note"}. Only pgshell's own session folders go
    (session/files.py): a copied file names another session's folder, so only the file goes; a folder holding other
    files, or a link, is refused; an orphan folder (no file names it: a kill during `fork`) goes by its name. The
    open session is refused here, one open in another pgshell when its lock is taken (`remove_session`)."""
    from . import files as F

    orphan = s.root / name
    if (Path(name).name == name and not (s.root / f"{name}.session").exists()
            and orphan in F.orphan_folders(s.root)):
        return {"session": name, "paths": [str(orphan)], "bytes": folder_bytes(orphan),
                "note": "a folder no session file names", "folder": str(orphan), "file": None}
    file = _session_file(s, name)
    folder = file.with_suffix("")
    problem = F.session_file_problem(file)
    if s.folder is not None and folder.resolve() == s.folder.resolve():
        raise PgError(f"{file.stem} is the open session: quit and reopen another, or remove it from another shell")
    if problem and folder.is_symlink():
        raise PgError(f"cannot remove {file.stem}: {problem}")
    if problem and folder.is_dir() and not F.sharing_folder(file) and F.folder_problem(folder):
        raise PgError(f"cannot remove {file.stem}: {F.folder_problem(folder)}")
    keep_folder = problem is not None or not folder.is_dir()
    paths = [file] + ([] if keep_folder else [folder])
    return {"session": file.stem, "paths": [str(p) for p in paths],
            "bytes": file.stat().st_size + (0 if keep_folder else folder_bytes(folder)),
            "note": f"the file only: {problem}" if problem else "",
            "folder": None if keep_folder else str(folder), "file": str(file)}


def remove_session(s: "Session", name: str) -> dict:
    from . import files as F

    plan = session_removal(s, name)
    file = Path(plan["file"]) if plan["file"] else None
    if plan["folder"]:  # the folder first, under its lock: a file left alone still names what to clean up
        F.delete_session(Path(plan["folder"]), file)
    elif file is not None:
        file.unlink()
    return plan


def prune_plan(s: "Session", keep: int) -> dict:
    """Which checkpoints `checkpoints prune --keep K` deletes: all but the last K epoch checkpoints, the best and
    the resume point. {"remove": rows as list_checkpoints gives them, "kept": file names, "bytes"}."""
    if keep < 0:
        raise PgError("--keep must be 0 or more (epoch checkpoints kept besides the best and the resume point)")
    rows = list_checkpoints(s)
    epochs = [r["file"] for r in rows if r["file"].startswith("epoch-")]
    recent = set(epochs[-keep:]) if keep else set()
    remove = [r for r in rows if not (r["best"] or r["resume"] or r["file"] in recent)]
    return {"remove": remove, "kept": [r["file"] for r in rows if r not in remove],
            "bytes": sum(r["bytes"] for r in remove)}


def prune_checkpoints(s: "Session", keep: int) -> dict:
    """Delete what prune_plan names; between two batches while a run goes on (the worker writes and removes
    checkpoints too)."""
    def run():
        plan = prune_plan(s, keep)
        for r in plan["remove"]:
            Path(r["path"]).unlink(missing_ok=True)
        return plan

    return s.apply(run)


COMPARE_FIELDS = ["session", "model", "pretrained", "data", "epoch", "step", "best_accuracy", "best_accuracy_epoch",
                  "final_accuracy", "best_loss", "best_loss_epoch", "final_loss", "final_epoch", "seconds", "bytes"]


def write_compare_csv(result: dict, out: str) -> Path:
    """`compare --out`: one row per session, the differing settings as columns of their own, then the probes."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COMPARE_FIELDS + result["differing"] + ["knn_accuracy", "linear_accuracy"])
        for r in result["rows"]:
            probes = [r["probe"].get(k, {}).get("accuracy", "") for k in ("knn", "linear")]
            w.writerow([_cell(r.get(k)) for k in COMPARE_FIELDS] + [_cell(r["config"].get(k))
                                                                    for k in result["differing"]] + probes)
    return out_path


def _cell(v) -> str:
    return "" if v is None else repr(v) if isinstance(v, float) else cell(v) if isinstance(v, str) else str(v)
