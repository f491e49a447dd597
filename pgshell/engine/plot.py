"""Graphs of a run, redrawn from `metrics.csv` alone: any past session draws the same picture.

`plot_series(rows)` turns metrics rows into plain lists (what tests read back); `draw_png` (matplotlib, Agg, no
display) and `draw_text` (braille, for the terminal) only draw those lists. No torch here.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from ._textplot import text_plot
from .errors import PgError

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


def plot_series(rows: list[dict], smooth: int = 10, trial: str = "", changes: list[dict] | None = None) -> dict:
    """What a plot shows, as lists: train (per batch) and smoothed values, val points, epoch ends, pause marks, and
    the session's changes.

    rows: metrics.csv rows (engine.metrics.read_rows). Only rows of `trial` are used ("" = ordinary training, not a
    tuning trial). Epoch ends are the steps of the val rows; a pause mark is the step of the first training batch of
    a new run (the `run` column counts starts and resumes). changes: [{"step", "label"}] from the change log — a
    change logged at step S applied from batch S + 1 on, so its line is drawn between the two.
    """
    trial = str(trial or "")
    rows = [r for r in rows if str(r.get("trial") or "") == trial]
    train = [r for r in rows if r.get("split") == "train"]
    val = [r for r in rows if r.get("split") == "val"]
    t = {"step": [int(r["step"]) for r in train], "epoch": [int(r["epoch"]) for r in train],
         "run": [str(r.get("run", "")) for r in train]}
    for m in METRICS:
        t[m] = [_num(r.get(m)) for r in train]
    pauses = [t["step"][i] for i in range(1, len(train)) if t["run"][i] != t["run"][i - 1]]
    v = {"step": [int(r["step"]) for r in val], "epoch": [int(r["epoch"]) for r in val],
         "loss": [_num(r["loss"]) for r in val], "accuracy": [_num(r["accuracy"]) for r in val]}
    return {"train": t, "smoothed": {m: smooth_values(t[m], smooth) for m in ("loss", "accuracy")},
            "val": v, "epoch_ends": list(v["step"]), "pauses": pauses, "smooth": smooth, "trial": trial,
            "changes": [] if trial else [{"step": int(c["step"]), "label": str(c["label"])} for c in changes or []]}


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


# ---------------------------------------------------------------- PNG
def draw_png(named: list[tuple[str, dict]], out: str | os.PathLike, metric: str = "all") -> Path:
    """One panel per metric; each series: raw batches (faint), the smoothed line, val points; epoch ends (dotted)
    and pause/resume marks (dashed, red) of each series. Several series overlay, with a legend by name."""
    metrics = _metric_list(metric)
    fig = _figure(figsize=(10, 3.2 * len(metrics)), dpi=100, layout="constrained")
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    colours = [f"C{i}" for i in range(10)]
    for ax, m in zip(axes, metrics):
        for k, (name, s) in enumerate(named):
            c = colours[k % len(colours)]
            label = name if len(named) > 1 else "train"
            tr = s["train"]
            if m == "lr":
                ax.plot(tr["step"], tr["lr"], color=c, lw=1.2, label=label)
            else:
                ax.plot(tr["step"], tr[m], color=c, alpha=0.25, lw=0.8)
                ax.plot(tr["step"], s["smoothed"][m], color=c, lw=1.6,
                        label=f"{label} (smoothed {s['smooth']})" if s["smooth"] > 1 else label)
                if s["val"]["step"]:
                    ax.plot(s["val"]["step"], s["val"][m], "o", color=c, mec="black", ms=5,
                            label=f"{name} val" if len(named) > 1 else "val")
            for e in s["epoch_ends"]:
                ax.axvline(e, color=c, ls=":", lw=0.8, alpha=0.6)
            for i, p in enumerate(s["pauses"]):
                ax.axvline(p - 0.5, color="red", ls="--", lw=1.0,
                           label="pause/resume" if (k == 0 and i == 0) else None)
            for ch in s["changes"]:
                ax.axvline(ch["step"] + 0.5, color=c, ls="-.", lw=1.0)
                if ax is axes[0]:  # the label once, along the line at the top
                    ax.text(ch["step"] + 0.5, 0.98, ch["label"], transform=ax.get_xaxis_transform(), rotation=90,
                            va="top", ha="right", fontsize=7, color=c)
        ax.set_ylabel({"lr": "learning rate"}.get(m, m))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step (batch)")
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

    from .checkpoint import atomic_write_bytes  # at the first PNG only: it imports torch

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kw)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


# ---------------------------------------------------------------- terminal
def draw_text(named: list[tuple[str, dict]], metric: str = "all", width: int = 70, height: int = 15) -> str:
    """The same panels as text (braille for the first series, a marker character for each further one)."""
    panels = []
    for m in _metric_list(metric):
        lines, points, ends, pauses, changes = [], [], [], [], []
        for name, s in named:
            tr = s["train"]
            ys = tr["lr"] if m == "lr" else s["smoothed"][m]
            lines.append((name, tr["step"], ys))
            points.append((name, s["val"]["step"], [] if m == "lr" else s["val"][m]))
            ends += s["epoch_ends"]
            pauses += s["pauses"]
            changes += [(ch["step"] + 0.5, ch["label"]) for ch in s["changes"]]
        what = "train" if m == "lr" else (f"train smoothed {named[0][1]['smooth']}" if named[0][1]["smooth"] > 1
                                          else "train")
        panels.append(text_plot(lines, points, ends, pauses, width=width, height=height, changes=changes,
                                title=f"{m} — {what}, o val, ┴ epoch end, ▲ pause/resume"
                                      + (", ◆ change" if changes else "")))
    return "\n\n".join(panels)
