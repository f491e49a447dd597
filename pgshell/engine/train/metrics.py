"""The per-batch metrics log: `metrics.csv` in the session folder, one row per training batch and one per validation.

Graphs are redrawn from this file alone, so it must never double-count: resuming from a checkpoint at step S first
drops every row past S (rows written after the last checkpoint by a run that was killed).
"""

from __future__ import annotations

import csv
import io
import os
import threading
from pathlib import Path

from ..store.checkpoint import atomic_write_bytes, open_append
from .events import Handler

COLUMNS = ["step", "epoch", "batch", "split", "loss", "accuracy", "lr", "images", "seconds", "run", "trial"]
# The columns that two runs of the same training share exactly; `seconds` and `run` (the resume counter) differ.
EXACT_COLUMNS = COLUMNS[:7]


class MetricsLog:
    """Appends rows to a CSV file; thread-safe, flushed per row so a crash loses at most the row being written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._file = None
        self.skipped = 0  # unreadable rows the last truncate_after dropped

    def _open(self):
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open_append(self.path, newline="")  # never through a symbolic link
            if self._file.tell() == 0:
                self._file.write(",".join(COLUMNS) + "\n")
        return self._file

    def append(self, row: dict) -> None:
        line = io.StringIO()
        csv.writer(line).writerow([_fmt(row.get(c, "")) for c in COLUMNS])
        with self._lock:
            f = self._open()
            f.write(line.getvalue())
            f.flush()

    def sync(self) -> None:
        """fsync the log (done at each checkpoint so the rows up to it survive a power cut)."""
        with self._lock:
            if self._file is not None:
                self._file.flush()
                os.fsync(self._file.fileno())

    def truncate_after(self, step: int) -> int:
        """Drop rows with step > `step` (written after the checkpoint being resumed); returns how many were dropped."""
        with self._lock:
            self.close_locked()
            rows, self.skipped = read_rows_counted(self.path)
            keep = [r for r in rows if int(r["step"]) <= step]
            # a torn last row would be glued to the next one; unreadable rows go too (they were counted)
            if len(keep) != len(rows) or self.skipped or _torn(self.path):
                out = io.StringIO()
                w = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
                w.writeheader()
                w.writerows(keep)
                atomic_write_bytes(self.path, out.getvalue().encode())
            return len(rows) - len(keep)

    def close_locked(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        with self._lock:
            self.close_locked()


class MetricsLogger(Handler):
    """The loop's rows into metrics.csv: one per training batch, one per validation (written after the epoch's
    schedule step, so its lr is the next epoch's), synced when a run ends."""

    order = 10
    essential = True  # a run whose rows cannot be written would leave graphs and resume disagreeing

    def __init__(self, log: MetricsLog | None):
        self.log = log

    def after_batch(self, tr, ctx) -> None:
        if self.log is not None:
            self.log.append(ctx.row)

    def after_epoch(self, tr, ctx) -> None:
        val = ctx.info["val"]
        if self.log is not None and val is not None:
            self.log.append({"step": tr.pos.step, "epoch": ctx.info["epoch"], "batch": 0, "split": "val",
                             "loss": val["loss"], "accuracy": val["accuracy"], "lr": tr.lr, "images": val["n"],
                             "run": tr.run_id, "trial": tr.trial})

    def after_fit(self, tr, ctx) -> None:
        if self.log is not None:
            self.log.sync()


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All complete, readable rows of a metrics file (a torn last line from a kill is ignored)."""
    return read_rows_counted(path)[0]


def read_rows_counted(path: str | os.PathLike) -> tuple[list[dict], int]:
    """(rows, how many lines were skipped as unreadable). Each line is parsed on its own, so a damaged one (a stray
    quote, text where a number belongs, a NUL byte) costs that line only, never the rows after it."""
    path = Path(path)
    if not path.exists():
        return [], 0
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    lines = text.splitlines()
    if not lines:
        return [], 0
    header = next(csv.reader([lines[0].replace("\0", "")]), [])
    if "step" not in header or "split" not in header:
        header = COLUMNS  # the header line itself was damaged: the columns pgshell writes
        lines.insert(0, "")
    rows, skipped = [], 0
    for line in lines[1:]:
        row = _parse(line, header)
        if row is None:
            skipped += 1
        else:
            rows.append(row)
    return rows, skipped


def _parse(line: str, header: list[str]) -> dict | None:
    if "\0" in line:
        return None
    cells = next(csv.reader([line]), [])
    if len(cells) != len(header):
        return None
    row = dict(zip(header, cells))
    try:
        int(row["step"]), int(row["epoch"]), int(row["batch"]), float(row["loss"]), float(row["accuracy"])
    except (KeyError, ValueError):
        return None
    return row if row.get("split") in ("train", "val") else None


def _torn(path: Path) -> bool:
    """The file ends inside a row (a power cut in the middle of an append)."""
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return repr(v)  # round-trips exactly: identical runs give identical text
    return "" if v is None else str(v)
