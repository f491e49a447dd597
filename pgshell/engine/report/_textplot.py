"""A small text plotter: lines in braille dots (2x4 per character), points and marks as characters.

Enough for a training curve in a terminal or a script's log; no dependency, no colour codes.
"""

from __future__ import annotations

import math

# bit of each dot in a braille cell, by (column 0..1, row 0..3) — Unicode's dot numbering
_DOTS = {(0, 0): 0x01, (0, 1): 0x02, (0, 2): 0x04, (1, 0): 0x08, (1, 1): 0x10, (1, 2): 0x20, (0, 3): 0x40,
         (1, 3): 0x80}
_LINE_MARKS = "•+x*#"  # series after the first, at character resolution
_POINT_MARKS = "oOX@%"
_EPOCH, _PAUSE, _CHANGE, _AXIS = "┴", "▲", "◆", "─"


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def text_plot(lines: list[tuple[str, list, list]], points: list[tuple[str, list, list]], epoch_ends: list,
              pauses: list, width: int = 70, height: int = 15, title: str = "", changes: list = (),
              xlabel: str = "step") -> str:
    """lines / points: (name, xs, ys) per series. epoch_ends and pauses: x positions marked on the axis row;
    changes: (x, label) marked there too and listed under the plot.

    Returns the title, `height` canvas rows, the axis row and the x labels (plus a legend line for overlays).
    """
    finite = [(x, y) for _, xs, ys in lines + points for x, y in zip(xs, ys) if math.isfinite(y)]
    if not finite:
        return f"{title}\n(no data)"
    xs_all = [x for x, _ in finite] + list(epoch_ends) + list(pauses) + [x for x, _ in changes]
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = min(y for _, y in finite), max(y for _, y in finite)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y0, y1 = y0 - 0.5 * (abs(y0) or 1), y1 + 0.5 * (abs(y1) or 1)
    dw, dh = width * 2, height * 4

    def col(x) -> int:  # x -> dot column
        return min(dw - 1, max(0, round((x - x0) / (x1 - x0) * (dw - 1))))

    def row(y) -> int:  # y -> dot row (0 at the top)
        return min(dh - 1, max(0, round((y1 - y) / (y1 - y0) * (dh - 1))))

    bits, chars = _canvas(lines, points, col, row, width, height)
    axis = _axis(epoch_ends, pauses, changes, col, width)
    labels = {0: _fmt(y1), height // 2: _fmt((y0 + y1) / 2), height - 1: _fmt(y0)}
    pad = max(len(s) for s in labels.values())
    out = [title] if title else []
    for r in range(height):
        cells = "".join(chars[r][c] or (chr(0x2800 + bits[r][c]) if bits[r][c] else " ") for c in range(width))
        out.append(f"{labels.get(r, ''):>{pad}} ┤{cells}")
    out.append(" " * pad + " └" + "".join(axis))
    left, right = _fmt(x0), _fmt(x1)
    out.append(" " * (pad + 2) + left + " " * max(1, width - len(left) - len(right)) + right + "  " + xlabel)
    out += [" " * (pad + 2) + line for line in _footer(lines, points, changes)]
    return "\n".join(out)


def _canvas(lines: list, points: list, col, row, width: int, height: int) -> tuple[list, list]:
    """The plot's cells: braille dot bits of the first line (joined by straight segments), and characters for the
    other lines (their mean row per cell) and the points; `col`/`row` map x/y to dot columns and rows."""
    bits = [[0] * width for _ in range(height)]
    chars: list[list[str | None]] = [[None] * width for _ in range(height)]
    for k, (_, xs, ys) in enumerate(lines):
        pts = [(col(x), row(y)) for x, y in zip(xs, ys) if math.isfinite(y)]
        if k == 0:
            prev = None
            for p in pts:
                for cx, cy in _segment(prev or p, p):
                    bits[cy // 4][cx // 2] |= _DOTS[(cx % 2, cy % 4)]
                prev = p
        else:
            by_cell: dict[int, list[int]] = {}
            for cx, cy in pts:
                by_cell.setdefault(cx // 2, []).append(cy)
            for c, rows in by_cell.items():
                chars[round(sum(rows) / len(rows)) // 4][c] = _LINE_MARKS[(k - 1) % len(_LINE_MARKS)]
    for k, (_, xs, ys) in enumerate(points):
        for x, y in zip(xs, ys):
            if math.isfinite(y):
                chars[row(y) // 4][col(x) // 2] = _POINT_MARKS[k % len(_POINT_MARKS)]
    return bits, chars


def _axis(epoch_ends: list, pauses: list, changes: list, col, width: int) -> list[str]:
    """The axis row: epoch ends, then pauses, then changes marked (a later mark wins a shared cell)."""
    axis = [_AXIS] * width
    for x in epoch_ends:
        axis[col(x) // 2] = _EPOCH
    for x in pauses:
        axis[col(x) // 2] = _PAUSE
    for x, _ in changes:
        axis[col(x) // 2] = _CHANGE
    return axis


def _footer(lines: list, points: list, changes: list) -> list[str]:
    """The legend of an overlay, and the changes marked on the axis."""
    out = []
    if len(lines) > 1:
        legend = [f"⣿ {lines[0][0]}"] + [f"{_LINE_MARKS[(k - 1) % len(_LINE_MARKS)]} {name}"
                                          for k, (name, _, _) in enumerate(lines) if k]
        out.append("   ".join(legend) + "   (val: " +
                   ", ".join(f"{_POINT_MARKS[k % len(_POINT_MARKS)]} {n}" for k, (n, _, _) in enumerate(points)) + ")")
    if changes:
        out.append(f"{_CHANGE} " + " · ".join(f"{x - 0.5:g} {text}" for x, text in changes))
    return out


def _segment(a: tuple[int, int], b: tuple[int, int]):
    """The dots of a straight line from a to b (Bresenham), both ends included."""
    (x, y), (x2, y2) = a, b
    dx, dy = abs(x2 - x), -abs(y2 - y)
    sx, sy = (1 if x2 > x else -1), (1 if y2 > y else -1)
    err = dx + dy
    while True:
        yield x, y
        if (x, y) == (x2, y2):
            return
        e2 = 2 * err
        if e2 >= dy:
            err += dy
            x += sx
        if e2 <= dx:
            err += dx
            y += sy
