"""`report`: one page about a session — its data, its runs and settings, the curves, the best model's confusion
matrix and highest losses, and how to export it.

The page is built as a list of sections of plain blocks (paragraphs, tables, images, commands), then rendered as HTML
(one file: the images embedded as data URIs, and written beside it too) or Markdown (the images beside it, in
`NAME_files/`). Tables go through tabulate ("html", which escapes every cell, and "github"); the pictures are the
ones `plot`, `eval --out` and `errors --out` draw. Everything is read from the session's files and evaluated
through session/review.py, so the figures are the ones those commands print.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..engine.errors import PgError

if TYPE_CHECKING:
    from .core import Session

TOP_LOSSES = 12  # images in the report's highest-loss table and contact sheet


@dataclass
class Section:
    title: str
    blocks: list[tuple] = field(default_factory=list)  # ("p", text) | ("table", headers, rows) | ("img", path, alt)
    #                                                    | ("code", text)

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: list[str], rows: list[list[Any]]) -> None:
        self.blocks.append(("table", headers, rows))

    def img(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", Path(path), alt))

    def code(self, text: str) -> None:
        self.blocks.append(("code", text))


def write_report(s: "Session", out: str | None = None) -> dict:
    """Build the session's report and write it to `out` (.html or .md; default: the session folder's report.html).
    Returns {"out", "images": [paths], "sections": [titles], "best": which weights the page evaluates}."""
    if s.running:
        raise PgError("training is running: `pause` or `wait` first (the report evaluates the best model)")
    if s.folder is None or s.spec is None:
        raise PgError("nothing to report yet: `load`, `data` and `train` first")
    path = Path(out).expanduser() if out else s.folder / "report.html"
    if path.suffix.lower() not in (".html", ".htm", ".md"):
        raise PgError(f"--out writes .html or .md, not {path.name}")
    assets = path.with_name(path.stem + "_files")
    try:
        assets.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PgError(f"cannot write the report's images to {assets}: {e.strerror or e}") from None
    sections, best = build_sections(s, assets)
    title = f"pgshell report — {s.name}"
    text = render_html(title, sections) if path.suffix.lower() in (".html", ".htm") else render_md(title, sections,
                                                                                                     path.parent)
    from ..engine.store.checkpoint import atomic_write_bytes
    from .files import disk_full

    try:
        atomic_write_bytes(path, text.encode())
    except OSError as e:
        if disk_full(e):
            raise PgError(f"the disk is full: {path} was not written — free some space and try again") from None
        raise PgError(f"cannot write {path}: {e.strerror or e}") from None
    images = [b[1] for sec in sections for b in sec.blocks if b[0] == "img"]
    return {"out": str(path), "images": [str(p) for p in images], "sections": [sec.title for sec in sections],
            "best": best}


# ====================================================================== the content
def build_sections(s: "Session", assets: Path) -> tuple[list[Section], dict]:
    from . import review as R

    sections = [_summary(s), _data(s), _runs(s)]
    curves = Section("Curves")
    if (s.folder / "metrics.csv").exists():
        try:
            R.plot(s, [], out=str(assets / "curves.png"))
            curves.img(assets / "curves.png", "training loss and accuracy per batch, validation per epoch, lr")
        except PgError as e:
            curves.p(f"no curves: {e}")
    else:
        curves.p("no metrics yet: train first")
    sections.append(curves)
    best = _best_weights(s)
    sections += _evaluation(s, best, assets)
    sections.append(_export(s, best))
    return sections, best


def _summary(s: "Session") -> Section:
    from .describe import best_line

    sec = Section("Summary")
    pos = s.select_run().position  # the live run's (a reopened checkpoint's too: session/run.py)
    rows = [["session", s.name], ["file", str(s.file)], ["model", f"{s.spec.name} ({s.built.full_name})"],
            ["pretrained", "yes" if s.spec.pretrained else f"file {s.spec.weights}" if s.spec.weights else "no"],
            ["position", f"epoch {pos.epoch}, step {pos.step}" if pos else "not trained"],
            ["written", datetime.now().isoformat(timespec="seconds")]]
    sec.table(["", ""], rows)
    line = best_line(s)
    if line:
        sec.p(line)
    return sec


def _data(s: "Session") -> Section:
    from ..engine import data as D

    sec = Section("Data")
    if s.splits is None:
        sec.p("no data attached")
        return sec
    sp, n = s.splits, len(s.splits.classes)
    sec.p(f"{s.data['path']} — {sp.layout}; images at {s.data.get('size') or 'the model input size'} px; "
          f"{n} classes")
    counts = {name: D.class_counts(getattr(sp, name) or [], n) for name in ("train", "val", "test")}
    splits = [name for name in counts if sum(counts[name])]
    rows = [[c] + [counts[name][i] for name in splits] for i, c in enumerate(sp.classes)]
    rows.append(["total"] + [sum(counts[name]) for name in splits])
    sec.table(["class"] + splits, rows)
    if sp.rejected:
        sec.p(f"{len(sp.rejected)} file(s) rejected (quarantine.txt lists them with their reasons)")
    for hint in s.data_hints():
        sec.p(hint)
    return sec


def _runs(s: "Session") -> Section:
    from ..engine.config import TrainConfig
    from . import review as R
    from .changelog import value_text, where
    from .replay import note

    sec = Section("Runs and settings")
    defaults = TrainConfig().to_dict()
    changed = [[k, value_text(v), value_text(defaults[k])] for k, v in s.config.to_dict().items() if v != defaults[k]]
    if changed:
        sec.p("settings that differ from the defaults:")
        sec.table(["setting", "value", "default"], changed)
    else:
        sec.p("every setting at its default")
    entries = [e for e in s.changes.entries]
    if entries:
        sec.p("what was done (the change log, `history`):")
        sec.table(["#", "where", "command", "note"], [[e["n"], where(e), e["cmd"], note(e)] for e in entries])
    rows = [r for r in R.list_checkpoints(s) if r["kind"] != "unreadable"] + _soup_row(s)
    if rows:
        sec.p("checkpoints:")
        sec.table(["checkpoint", "kind", "epoch", "step", "val loss", "val accuracy", "note"],
                  [[r["file"], r["kind"], r["epoch"], r["step"], _f(r["val_loss"]), _f(r["val_accuracy"]),
                    " ".join(w for w, on in (("best", r["best"]), ("resume point", r["resume"])) if on)
                    or r.get("members", "")]
                   for r in rows])
    probes = R.probe_results(s)
    if probes:
        sec.p("baselines (`probe`): " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in probes.items()))
    tune = _tune_rows(s)
    if tune:
        sec.p("tuning trials (`tune show`), best first:")
        sec.table(["trial", "state", "value", "settings"], tune)
    from .autofit import autofit_summary

    summary = autofit_summary(s)
    if summary:
        sec.p("autofit: " + summary)
    return sec


def _soup_row(s: "Session") -> list[dict]:
    """The soup as `checkpoints` would list it (it is not an epoch or step checkpoint), with its members."""
    from ..engine.store import checkpoint as C
    from .best import soup_path

    path = soup_path(s)
    try:
        meta = C.read_metadata(path) if path.exists() else None
    except C.CheckpointError:
        meta = None
    if meta is None:
        return []
    members = ", ".join(m.removeprefix("epoch-").removesuffix(".safetensors").lstrip("0")
                        for m in json.loads(meta.get("members", "[]")))
    return [{"file": path.name, "kind": f"soup ({meta.get('mode', '?')})", "epoch": meta.get("epoch"),
             "step": meta.get("step"), "val_loss": float(meta["val_loss"]), "val_accuracy": float(meta["val_accuracy"]),
             "best": False, "resume": False, "members": f"of epochs {members}"}]


def _tune_rows(s: "Session") -> list[list]:
    if not (s.folder / "tune.db").exists():
        return []
    from . import study as T

    try:
        table = T.trials_table(s)
    except PgError:
        return []
    return [[t["number"], t["state"], _f(t["value"]), " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                                               for k, v in t["params"].items())]
            for t in table["trials"][:8]]


def _best_weights(s: "Session") -> dict:
    """The weights the report evaluates: the soup when its val accuracy is at least the best epoch's, else the best
    checkpoint, else the current weights. {"checkpoint": name for --checkpoint or None, "why": words}."""
    from ..engine.store import checkpoint as C
    from .best import soup_path

    best = s.best
    soup = soup_path(s)
    soup_acc = None
    if soup.exists():
        try:
            soup_acc = float(C.read_metadata(soup).get("val_accuracy"))
        except (C.CheckpointError, TypeError, ValueError):
            soup_acc = None
    best_acc = best["value"] if best and best.get("metric") == "val_accuracy" else None
    if soup_acc is not None and (best_acc is None or soup_acc >= best_acc):
        return {"checkpoint": "soup", "why": f"the soup (val accuracy {100 * soup_acc:.1f}%"
                + (f", best single epoch {100 * best_acc:.1f}%)" if best_acc is not None else ")")}
    if best:
        return {"checkpoint": "best", "why": f"the best epoch, {best['epoch']} (by {best['metric']}: "
                                             f"{best['value']:.4f})"}
    return {"checkpoint": None, "why": "the current weights (no epoch validated yet)"}


def _evaluation(s: "Session", best: dict, assets: Path) -> list[Section]:
    from . import review as R

    sec = Section("The best model")
    sec.p(f"evaluated: {best['why']}")
    if s.splits is None or not s.splits.val:
        sec.p("no validation split to evaluate on")
        return [sec]
    splits = ["val", "test"] if s.splits.test else ["val"]
    reports = R.evaluate(s, splits, best["checkpoint"])
    sec.table(["split", "images", "loss", "accuracy", "macro F1"] + (["top-5"] if reports[0]["top5"] is not None
                                                                      else []),
              [[r["split"], r["n"], _f(r["loss"]), _pct(r["accuracy"]), _f(r["macro"]["f1"], 3)]
               + ([_pct(r["top5"])] if r["top5"] is not None else []) for r in reports])
    r0 = reports[0]
    sec.table(["class", "precision", "recall", "F1", "support"],
              [[c["class"], _f(c["precision"], 3), _f(c["recall"], 3), _f(c["f1"], 3), c["support"]]
               for c in r0["per_class"]])
    R.confusion_png(r0, str(assets / "confusion.png"))
    sec.img(assets / "confusion.png", "confusion matrix on val (rows: true class, columns: predicted)")
    if r0["confused"]:
        sec.p("most confused: " + ", ".join(f"{x['true']} → {x['predicted']} ({x['count']})" for x in r0["confused"]))
    losses = Section("Highest losses (val)")
    top = R.top_losses(s, "val", TOP_LOSSES, None, best["checkpoint"])
    losses.table(["rank", "image", "true", "predicted", "probability", "loss"],
                 [[r["rank"], r["path"], r["true"], r["predicted"], _f(r["probability"], 3), _f(r["loss"])]
                  for r in top["rows"]])
    if top["rows"]:
        R.write_errors(top, str(assets / "top-losses.png"))
        losses.img(assets / "top-losses.png", "the highest-loss validation images: true / predicted / probability")
    return [sec, losses]


def _export(s: "Session", best: dict) -> Section:
    sec = Section("How to export it")
    which = f" --checkpoint {best['checkpoint']}" if best["checkpoint"] else ""
    name = s.name or "model"
    sec.p(f"in pgshell (`pgshell -s {s.file}`):")
    sec.code("\n".join([f"export timm exports/{name}{which}      # model.safetensors + config.json, for timm and "
                        "the Hugging Face Hub",
                        f"export onnx exports/{name}.onnx{which}",
                        f"export torchscript exports/{name}.pt{which}",
                        f"predict IMAGE_OR_FOLDER{which}"]))
    sec.p("then in Python:")
    sec.code(f'import timm\nmodel = timm.create_model("local-dir:exports/{name}", pretrained=True).eval()')
    return sec


def _f(v, digits: int = 4) -> str:
    return "" if v is None else f"{v + 0.0:.{digits}f}"  # + 0.0: a loss of -0.0 reads 0.0000


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.1f}%"


# ====================================================================== rendering
_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
        "font-size:.9em}th{background:#f3f3f3}img{max-width:100%;border:1px solid #ddd;margin:.5em 0}"
        "pre{background:#f6f6f6;padding:.8em;overflow-x:auto}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}")


def render_html(title: str, sections: list[Section]) -> str:
    from tabulate import tabulate

    out = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for sec in sections:
        out.append(f"<section><h2>{html.escape(sec.title)}</h2>")
        for block in sec.blocks:
            kind = block[0]
            if kind == "p":
                out.append(f"<p>{html.escape(block[1])}</p>")
            elif kind == "table":
                headers = block[1] if any(block[1]) else ()
                out.append(tabulate(block[2], headers, tablefmt="html", disable_numparse=True))
            elif kind == "img":
                data = base64.b64encode(Path(block[1]).read_bytes()).decode()
                out.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(block[2])}\" "
                           f"data-file=\"{html.escape(Path(block[1]).name)}\"><figcaption>{html.escape(block[2])}"
                           "</figcaption></figure>")
            elif kind == "code":
                out.append(f"<pre><code>{html.escape(block[1])}</code></pre>")
        out.append("</section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def render_md(title: str, sections: list[Section], base: Path) -> str:
    from tabulate import tabulate

    out = [f"# {title}\n"]
    for sec in sections:
        out.append(f"## {sec.title}\n")
        for block in sec.blocks:
            kind = block[0]
            if kind == "p":
                out.append(block[1] + "\n")
            elif kind == "table":
                rows = [[str(c).replace("|", "\\|") for c in row] for row in block[2]]
                out.append(tabulate(rows, block[1], tablefmt="github", disable_numparse=True) + "\n")
            elif kind == "img":
                rel = Path(block[1]).resolve().relative_to(base.resolve())
                out.append(f"![{block[2]}]({rel.as_posix()})\n")
            elif kind == "code":
                out.append(f"```\n{block[1]}\n```\n")
    return "\n".join(out)
