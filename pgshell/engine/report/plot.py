"""Graphs of a run, redrawn from `metrics.csv` alone: any past session draws the same picture.

`plot_series(rows)` turns metrics rows into plain lists (what tests read back); `draw_png` (matplotlib, Agg, no
display) and `draw_text` (braille, for the terminal) only draw those lists. No torch here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import PgError
from ._textplot import text_plot

METRICS = ("loss", "accuracy", "lr")


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def smooth_values(values: list[float], n: int) -> list[float]:
    """Trailing mean over the last `n` finite values (fewer at the start); n <= 1 returns the values unchanged."""
    if n <= 1:
        return list(values)
    out, window, total = [], [], 0.0
    for v in values:
        if math.isfinite(v):
            window.append(v)
            total += v
            if len(window) > n:
                total -= window.pop(0)
        out.append(total / len(window) if window else float("nan"))
    return out


def plot_series(rows: list[dict], smooth: int = 10, trial: str = "", changes: list[dict] | None = None,
                paused_at: set[int] | None = None) -> dict:
    """What a plot shows, as lists: train (per batch) and smoothed values, val points, epoch ends, pause marks, and
    the session's changes.

    rows: metrics.csv rows (train.metrics.read_rows). Only rows of `trial` are used ("" = ordinary training, not a
    tuning trial). Epoch ends are the steps of the val rows. A pause mark is the step of the first training batch of
    a new run (the `run` column counts starts and resumes) that follows a real pause: `paused_at` holds the steps
    where runs paused (the session's pause checkpoints). Without it (a bare metrics file) a new run that starts an
    epoch is taken for a new `train` after a finished one and gets no mark. changes: [{"step", "label"}] from the
    change log — a change logged at step S applied from batch S + 1 on, so its line is drawn between the two.

    Each train and val point also has an `epoch_x` (fractional epochs: 2.5 is half-way through epoch 3) and a `time`
    (seconds of training batches so far: validation and time spent paused are not counted), for `--x epoch|time`.
    """
    trial = str(trial or "")
    rows = [r for r in rows if str(r.get("trial") or "") == trial]
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    t = {"step": [int(r["step"]) for r in train], "epoch": [int(r["epoch"]) for r in train],
         "run": [str(r.get("run", "")) for r in train]}
    for m in METRICS:
        t[m] = [_num(r.get(m)) for r in train]
    t["time"] = _cumulative([_num(r.get("seconds")) for r in train])
    t["epoch_x"] = _epoch_x(t["epoch"], [int(r["batch"]) for r in train], {int(r["epoch"]) for r in val})
    starts = [i for i in range(1, len(train)) if t["run"][i] != t["run"][i - 1]]
    if paused_at is None:
        pauses = [t["step"][i] for i in starts if int(train[i]["batch"]) != 1]
    else:
        pauses = [t["step"][i] for i in starts if t["step"][i - 1] in paused_at]
    v = {"step": [int(r["step"]) for r in val], "epoch": [int(r["epoch"]) for r in val],
         "loss": [_num(r["loss"]) for r in val], "accuracy": [_num(r["accuracy"]) for r in val]}
    at = dict(zip(t["step"], t["time"]))
    v["time"] = [at.get(step, float("nan")) for step in v["step"]]
    v["epoch_x"] = [float(e) for e in v["epoch"]]
    return {"train": t, "smoothed": {m: smooth_values(t[m], smooth) for m in ("loss", "accuracy")},
            "val": v, "epoch_ends": list(v["step"]), "pauses": pauses, "smooth": smooth, "trial": trial,
            "changes": [] if trial else [{"step": int(c["step"]), "label": str(c["label"])} for c in changes or []]}


def _cumulative(values: list[float]) -> list[float]:
    out, total = [], 0.0
    for v in values:
        total += v if math.isfinite(v) else 0.0
        out.append(total)
    return out


def _epoch_x(epochs: list[int], batches: list[int], validated: set[int]) -> list[float]:
    """Fractional epochs: epoch e's batch b of n is e - 1 + b / n. n is the epoch's last batch when the epoch is over
    (a later epoch's rows or its validation are there), else the length of the finished epochs (the run goes on)."""
    last: dict[int, int] = {}
    for e, b in zip(epochs, batches):
        last[e] = max(last.get(e, 0), b)
    done = {e: n for e, n in last.items() if e in validated or any(f > e for f in last)}
    usual = max(done.values(), default=0)
    return [e - 1 + b / (done.get(e) or max(usual, last[e])) for e, b in zip(epochs, batches)]


X_AXES = {"step": "step (batch)", "epoch": "epoch", "time": "training time (s)"}


def _x_of(series: dict, x: str):
    """step -> x-axis position of one series (steps between two logged rows: the mean of their neighbours)."""
    tr = series["train"]
    if x == "step":
        return lambda step: step
    key = "epoch_x" if x == "epoch" else "time"
    at = dict(zip(tr["step"], tr[key]))

    def pos(step):
        if step in at:
            return at[step]
        near = [at[s] for s in (step - 1, step + 1) if s in at]
        return sum(near) / len(near) if near else float("nan")
    return pos


def _figure(**kw):
    """A matplotlib Figure from the object API: no pyplot, no global backend or figure state (Agg draws the PNG)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PgError("PNG graphs need matplotlib: pip install 'pgshell[plot]' (or pip install matplotlib); "
                      "without --out, plot draws in the terminal") from None
    return Figure(**kw)


def _metric_list(metric: str) -> list[str]:
    return list(METRICS) if metric == "all" else [metric]


def _pause_x(pos, step: int) -> float:
    """A pause mark sits between the last batch before it and the first after it."""
    before, after = pos(step - 1), pos(step)
    return (before + after) / 2 if math.isfinite(before) else after


def _positive(values: list[float]) -> bool:
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0


# ---------------------------------------------------------------- PNG
def draw_png(named: list[tuple[str, dict]], out: str | os.PathLike, metric: str = "all", x: str = "step") -> Path:
    """One panel per metric; each series: raw batches (faint), the smoothed line, val points; epoch ends (dotted)
    and pause/resume marks (dashed, red) of each series. Several series overlay, with a legend by name. `x`: step,
    epoch or time on the horizontal axis; the learning rate is drawn on a log scale."""
    metrics = _metric_list(metric)
    fig = _figure(figsize=(10, 3.2 * len(metrics)), dpi=100, layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{i}" for i in range(10)]
    for ax, m in zip(axes, metrics):
        for k, (name, s) in enumerate(named):
            c, pos = colours[k % len(colours)], _x_of(s, x)
            label = name if len(named) > 1 else "train"
            tr = s["train"]
            xs = [pos(step) for step in tr["step"]]
            if m == "lr":
                ax.plot(xs, tr["lr"], color=c, lw=1.2, label=label)
            else:
                ax.plot(xs, tr[m], color=c, alpha=0.25, lw=0.8)
                ax.plot(xs, s["smoothed"][m], color=c, lw=1.6,
                        label=f"{label} (smoothed {s['smooth']})" if s["smooth"] > 1 else label)
                if s["val"]["step"]:
                    ax.plot([pos(step) for step in s["val"]["step"]], s["val"][m], "o", color=c, mec="black", ms=5,
                            label=f"{name} val" if len(named) > 1 else "val")
            for e in s["epoch_ends"]:
                ax.axvline(pos(e), color=c, ls=":", lw=0.8, alpha=0.6)
            for i, p in enumerate(s["pauses"]):
                ax.axvline(_pause_x(pos, p), color="red", ls="--", lw=1.0,
                           label="pause/resume" if (k == 0 and i == 0) else None)
            for ch in s["changes"]:
                at = _pause_x(pos, ch["step"] + 1)
                ax.axvline(at, color=c, ls="-.", lw=1.0)
                if ax is axes[0]:  # the label once, along the line at the top
                    ax.text(at, 0.98, ch["label"], transform=ax.get_xaxis_transform(), rotation=90,
                            va="top", ha="right", fontsize=7, color=c)
        if m == "lr" and all(_positive(s["train"]["lr"]) for _, s in named):
            ax.set_yscale("log")  # schedules decay by factors: a linear axis flattens all but the first phase
        ax.set_ylabel({"lr": "learning rate"}.get(m, m))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel(X_AXES[x])
    return save_png(fig, out)


def confusion_png(confusion: list[list[int]], classes: list[str], out: str | os.PathLike, title: str = "") -> Path:
    """The confusion matrix as a heat map (rows: true class, columns: predicted), counts written in each cell."""
    c = len(classes)
    side = min(16.0, max(5.5, 2.5 + 0.45 * c))
    fig = _figure(figsize=(side + 1.5, side), dpi=100, layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(im, ax=ax, shrink=0.8)
    ticks = list(range(c))
    ax.set_xticks(ticks, classes, rotation=90 if c > 6 else 0)
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title, fontsize="medium")
    if c <= 30:
        peak = max((max(r) for r in confusion), default=0) or 1
        for i, row in enumerate(confusion):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8,
                        color="white" if v > peak / 2 else "black")
    return save_png(fig, out)


def save_png(fig, out: str | os.PathLike, **kw) -> Path:
    """Render in memory, then write atomically (temp + rename): a kill or a full disk never leaves half a PNG or an
    empty one where the file was."""
    import io

    from ..store.checkpoint import atomic_write_bytes  # at the first PNG only: it imports torch

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _save(fig, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def _save_rgb(fig, out: str | os.PathLike) -> Path:
    """A PNG without the alpha channel Agg draws (a quarter of a sheet of photos: nothing in it is transparent)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba()).convert("RGB").save(out, "PNG")
    return out


def contact_sheet_png(images: list, labels: list[str], out: str | os.PathLike, title: str = "",
                      wrong: list[bool] | None = None, cols: int = 0, tile: float = 2.0) -> tuple[Path, list]:
    """Images (H x W x 3 uint8 arrays) in a grid, row by row, each titled with its label (red when `wrong`); each
    tile `tile` inches (100 px an inch) square, its two-line label above it.

    Returns the PNG and each tile's box in its pixels, (left, top, right, bottom), in the order given: what the
    tests read the tiles back by. The cells are placed by hand: constrained layout took seconds a page."""
    n = len(images)
    cols = cols or min(n, max(1, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    dpi, label, head, pad = 100, 0.38, (0.4 if title else 0.05), 0.04  # inches: a label, the title, the gaps
    width, height = (tile + pad) * cols + pad, (tile + label) * rows + head + pad
    fig = _figure(figsize=(width, height), dpi=dpi)
    axes = []
    for i in range(n):
        r, c = divmod(i, cols)
        left, top = pad + c * (tile + pad), head + r * (tile + label) + label
        ax = fig.add_axes((left / width, 1 - (top + tile) / height, tile / width, tile / height))
        ax.set_axis_off()
        ax.set_anchor("N")  # a wide image sits right under its label, not in the middle of its cell
        ax.imshow(images[i], interpolation="nearest" if max(images[i].shape[:2]) < 64 else "antialiased")
        ax.set_title(labels[i], fontsize=8, color="firebrick" if wrong and wrong[i] else "black", pad=2)
        axes.append(ax)
    if title:
        fig.suptitle(title, fontsize="medium", y=1 - 0.08 / height, va="top")
    out = _save_rgb(fig, out)
    px_h = fig.canvas.get_width_height()[1]  # the figure as saved (Agg drew it just now)
    boxes = []
    for ax in axes:
        b = ax.get_window_extent()  # the image's area in display pixels, origin bottom-left
        boxes.append((round(b.x0), round(px_h - b.y1), round(b.x1), round(px_h - b.y0)))
    return out, boxes


def activation_png(image, cam, out: str | os.PathLike, title: str = "") -> Path:
    """The image, and the image under the activation map (jet, half transparent), side by side."""
    h, w = image.shape[:2]
    fig = _figure(figsize=(8, 4 * h / w + 0.5), dpi=100, layout="constrained")
    left, right = fig.subplots(1, 2)
    left.imshow(image)
    right.imshow(image)
    shown = right.imshow(cam, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    fig.colorbar(shown, ax=right, shrink=0.8)
    for ax in (left, right):
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize="medium")
    return _save(fig, out)


# ---------------------------------------------------------------- terminal
def draw_text(named: list[tuple[str, dict]], metric: str = "all", width: int = 70, height: int = 15,
              x: str = "step") -> str:
    """The same panels as text (braille for the first series, a marker character for each further one); the
    learning rate as log10 when it is positive throughout."""
    panels = []
    for m in _metric_list(metric):
        lines, points, ends, pauses, changes = [], [], [], [], []
        log = m == "lr" and all(_positive(s["train"]["lr"]) for _, s in named)
        for name, s in named:
            tr, pos = s["train"], _x_of(s, x)
            ys = [math.log10(v) if log and v > 0 else v for v in tr["lr"]] if m == "lr" else s["smoothed"][m]
            lines.append((name, [pos(step) for step in tr["step"]], ys))
            points.append((name, [pos(step) for step in s["val"]["step"]], [] if m == "lr" else s["val"][m]))
            ends += [pos(e) for e in s["epoch_ends"]]
            pauses += [_pause_x(pos, p) for p in s["pauses"]]
            changes += [(_pause_x(pos, ch["step"] + 1), ch["label"]) for ch in s["changes"]]
        what = "train" if m == "lr" else (f"train smoothed {named[0][1]['smooth']}" if named[0][1]["smooth"] > 1
                                          else "train")
        title = (f"{'log10 lr' if log else m} — {what}, o val, ┴ epoch end, ▲ pause/resume"
                 + (", ◆ change" if changes else ""))
        panels.append(text_plot(lines, points, ends, pauses, width=width, height=height, title=title,
                                changes=changes, xlabel=X_AXES[x]))
    return "\n\n".join(panels)


def draw_heat_text(cam, width: int = 32) -> str:
    """An activation map (H x W array in [0, 1]) in the terminal: one character per cell, darker to brighter
    " .:-=+*#%@"; rows are taken twice as tall as columns, as terminal cells are."""
    import numpy as np

    shades = " .:-=+*#%@"
    cam = np.asarray(cam, dtype=np.float32)
    h, w = cam.shape
    cols = min(width, w)
    rows = max(1, min(h, round(cols * h / w / 2)))
    ys, xs = np.arange(rows + 1) * h // rows, np.arange(cols + 1) * w // cols
    cells = np.add.reduceat(np.add.reduceat(cam, ys[:-1], axis=0), xs[:-1], axis=1)
    cells /= np.outer(np.diff(ys), np.diff(xs))
    index = np.clip((cells * len(shades)).astype(int), 0, len(shades) - 1)
    return "\n".join("".join(shades[i] for i in row) for row in index)
