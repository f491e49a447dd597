"""Every table the shell prints goes through `fit_table`: it fits the terminal's width, so a rule line never breaks.

In order: the whole table if it fits; else the caller's low-value columns are dropped one by one (a footnote names
them and `--wide` brings them back); else the wrappable columns (the long text ones) are wrapped inside their
cells, the widest first; else each row is printed as `header: value` lines. A width of None means no limit (output
to a file or a pipe, as git and pip do).
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from tabulate import tabulate
from wcwidth import wcswidth

_MIN_WRAP = 8  # a wrapped column narrower than this reads worse than the record layout


def text_width(text: str) -> int:
    """The widest line of `text` in terminal cells."""
    return max((max(wcswidth(line), len(line)) for line in text.splitlines()), default=0)


def fit_table(rows: Sequence[Sequence], headers: Sequence[str] | None, width: int | None = None, *,
              drop: Sequence[str] = (), wrap: Sequence[str | int] | None = None, tablefmt: str = "simple",
              records: bool = True) -> str | None:
    """`rows` under `headers` (None: no header row) as text no wider than `width`. `drop` names the columns that may
    be left out, least valuable first; `wrap` those whose cells may wrap, by header or index (default: every column
    holding text). `records=False`: None instead of the one-cell-a-line layout when the table cannot fit."""
    names = list(headers) if headers else [""] * max((len(r) for r in rows), default=0)
    show = headers is not None
    cols = list(range(len(names)))
    text = _render(rows, names, cols, tablefmt, show)
    if width is None or text_width(text) <= width:
        return text
    hidden = []
    for name in drop:
        if name in names:
            cols.remove(names.index(name))
            hidden.append(name)
            text = _render(rows, names, cols, tablefmt, show)
            if text_width(text) <= width:
                return _with_note(text, hidden, width)
    wrappable = [i for i in cols if (i in wrap or names[i] in wrap if wrap is not None else _is_text(rows, i))]
    text = _wrapped(rows, names, cols, wrappable, width, tablefmt, show)
    if text is None:
        return _records(rows, names, cols, width) if records else None
    return _with_note(text, hidden, width) if hidden else text


def _render(rows, names, cols, tablefmt, show, maxcolwidths=None) -> str:
    widths = maxcolwidths or [None] * len(cols)
    return tabulate([[_wrap_cell(r[i], w) for i, w in zip(cols, widths)] for r in rows],
                    headers=[names[i] for i in cols] if show else (), tablefmt=tablefmt)


def _wrap_cell(value, width: int | None):
    """A text cell wrapped to `width` between words: not at hyphens inside one (tabulate's own wrapping splits
    `rand-m9-mstd0.5` there), a word cut only when it is wider than the column itself."""
    if width is None or not isinstance(value, str) or text_width(value) <= width:
        return value
    wrapper = textwrap.TextWrapper(width=width, break_on_hyphens=False)
    return "\n".join(line for part in value.split("\n") for line in (wrapper.wrap(part) or [""]))


def _is_text(rows, i) -> bool:
    return any(isinstance(r[i], str) and not _is_number(r[i]) for r in rows)


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def _wrapped(rows, headers, cols, wrappable, width, tablefmt, show) -> str | None:
    """Narrow the widest wrappable column a step at a time until the table fits; None if it cannot. Columns narrow
    down to their longest word first, so words are broken only when nothing else fits."""
    if not wrappable:
        return None
    cells = {i: [str(headers[i])] + ["" if r[i] is None else str(r[i]) for r in rows] for i in wrappable}
    limits = {i: max(text_width(c) for c in cells[i]) for i in wrappable}
    words = {i: max(_MIN_WRAP, *(text_width(w) for c in cells[i] for w in c.split())) for i in wrappable}
    for floor in (words, dict.fromkeys(wrappable, _MIN_WRAP)):
        while True:
            text = _render(rows, headers, cols, tablefmt, show, [limits.get(i) for i in cols])
            excess = text_width(text) - width
            if excess <= 0:
                return text
            slack = {i: limits[i] - floor[i] for i in wrappable if limits[i] > floor[i]}
            if not slack:
                break
            widest = max(slack, key=lambda i: limits[i])
            limits[widest] -= max(1, min(excess, slack[widest], limits[widest] // 4))
    return None


def _records(rows, headers, cols, width) -> str:
    """The last resort, psql's expanded display: one `header: value` line per cell, a blank line between rows."""
    label = max(text_width(str(headers[i])) for i in cols)
    out = []
    for r in rows:
        for i in cols:
            head = f"{str(headers[i]):<{label}}  "
            body = textwrap.wrap(str("" if r[i] is None else r[i]), max(10, width - len(head))) or [""]
            out.append(head + body[0])
            out.extend(" " * len(head) + line for line in body[1:])
        out.append("")
    return "\n".join(out[:-1])


def _with_note(text: str, hidden: list[str], width: int) -> str:
    note = f"(not shown: {', '.join(hidden)}; --wide shows every column)"
    return text + "\n" + "\n".join(textwrap.wrap(note, width))
