"""Charts for report.html as inline SVG: pure functions from plain data to markup, no JavaScript, no fetches.

Every function returns a complete `<svg>` element whose root carries `class="chart <kind>"` and a `data-points`
count (what the screenshot test checks). Labels are escaped; numbers are rounded so that the same data always
gives the same bytes. An empty input gives a small "no data" chart rather than raising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:12px"
PALETTE = {"control": "#4e79a7", "treatment": "#e15759"}
INK, GRID, MUTED = "#222", "#ddd", "#777"


@dataclass(frozen=True)
class Interval:
    """One row of a forest plot: an estimate with its CI (any of them may be None = not available)."""

    label: str
    estimate: float | None
    low: float | None
    high: float | None
    group: str = ""


def _f(x: float) -> str:
    return f"{x:.1f}"


def _svg(kind: str, width: int, height: int, points: int, body: list[str], title: str) -> str:
    return (f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {kind}" data-points="{points}" role="img" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" style="{FONT}">'
            f"<title>{escape(title)}</title>" + "".join(body) + "</svg>")


def _empty(kind: str, title: str, width: int = 480) -> str:
    return _svg(kind, width, 40, 0, [f'<text x="8" y="24" fill="{MUTED}">no data</text>'], title)


def _label_room(labels: Sequence[str], width: int) -> int:
    """Pixels left of the plot for the longest label (about 6.6 px per character at 12 px), at most half the width."""
    return int(min(max((len(label) for label in labels), default=10) * 6.6 + 16, width / 2))


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high]."""
    span = high - low or 1.0
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < high - step * 1e-9:  # the last tick reaches past `high`, so nothing is drawn off the axis
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def forest_plot(rows: Sequence[Interval], *, title: str, unit: str = "pp", scale: float = 100.0,
                width: int = 760) -> str:
    """Estimates with CIs, one row each, grouped by `group`, around a zero line (values × `scale` in `unit`)."""
    shown = [r for r in rows if r.estimate is not None]
    if not shown:
        return _empty("forest", title, width)
    values = [v * scale for r in shown for v in (r.estimate, r.low, r.high) if v is not None]
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    pad = (high - low) * 0.05 or 1.0
    ticks = _ticks(low - pad, high + pad)
    x0, x1 = ticks[0], ticks[-1]
    left, right, top, row_h = _label_room([r.label for r in rows], width), 20, 30, 18
    groups: list[str] = []
    for r in rows:
        if r.group not in groups:
            groups.append(r.group)
    height = top + row_h * (len(rows) + len([g for g in groups if g])) + 44
    plot_w = width - left - right

    def x(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    body = [f'<text x="{left}" y="16" fill="{INK}" font-weight="600">{escape(title)}</text>']
    for t in ticks:
        body.append(f'<line x1="{_f(x(t))}" y1="{top - 6}" x2="{_f(x(t))}" y2="{height - 38}" stroke="{GRID}"/>')
        body.append(f'<text x="{_f(x(t))}" y="{height - 24}" text-anchor="middle" fill="{MUTED}">{t:g}</text>')
    body.append(f'<line x1="{_f(x(0))}" y1="{top - 6}" x2="{_f(x(0))}" y2="{height - 38}" stroke="{INK}" '
                'stroke-dasharray="4 3"/>')
    body.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" fill="{MUTED}">'
                f"treatment − control ({escape(unit)})</text>")
    y = top
    for group in groups:
        if group:
            body.append(f'<text x="8" y="{y + 12}" fill="{INK}" font-weight="600">{escape(group)}</text>')
            y += row_h
        for r in (r for r in rows if r.group == group):
            mid = y + row_h / 2
            body.append(f'<text x="{left - 8}" y="{_f(mid + 4)}" text-anchor="end" fill="{INK}">{escape(r.label)}</text>')
            if r.estimate is not None:
                if r.low is not None and r.high is not None:
                    body.append(f'<line class="ci" x1="{_f(x(r.low * scale))}" y1="{_f(mid)}" x2="{_f(x(r.high * scale))}" '
                                f'y2="{_f(mid)}" stroke="{INK}" stroke-width="1.5"/>')
                significant = r.low is not None and r.high is not None and (r.low > 0 or r.high < 0)
                colour = PALETTE["treatment"] if significant else PALETTE["control"]
                body.append(f'<circle class="estimate" cx="{_f(x(r.estimate * scale))}" cy="{_f(mid)}" r="4" '
                            f'fill="{colour}"><title>{escape(r.label)}: {r.estimate * scale:+.2f} {escape(unit)}'
                            + (f" [{r.low * scale:+.2f}, {r.high * scale:+.2f}]" if r.low is not None and r.high is not None
                               else "") + "</title></circle>")
            else:
                body.append(f'<text x="{left + 4}" y="{_f(mid + 4)}" fill="{MUTED}">n/a</text>')
            y += row_h
    return _svg("forest", width, height, len(shown), body, title)


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
               width: int = 360, height: int = 240, y_max: float | None = None) -> str:
    """One polyline per series over [0, 1] × [0, y_max] (e.g. selective risk over coverage)."""
    drawn = {name: sorted(points) for name, points in series.items() if points}
    if not drawn:
        return _empty("lines", title, width)
    top_value = y_max if y_max is not None else max(max(y for _, y in pts) for pts in drawn.values()) or 1.0
    left, right, top, bottom = 44, 12, 28, 36
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(px: float, py: float) -> tuple[float, float]:
        return left + px * plot_w, top + plot_h - (py / top_value) * plot_h

    body = [f'<text x="{left}" y="16" fill="{INK}" font-weight="600">{escape(title)}</text>']
    for t in _ticks(0.0, top_value, 5):
        if t <= top_value + 1e-12:
            _, ty = xy(0, t)
            body.append(f'<line x1="{left}" y1="{_f(ty)}" x2="{width - right}" y2="{_f(ty)}" stroke="{GRID}"/>')
            body.append(f'<text x="{left - 4}" y="{_f(ty + 4)}" text-anchor="end" fill="{MUTED}">{t:g}</text>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        tx, _ = xy(t, 0)
        body.append(f'<text x="{_f(tx)}" y="{height - bottom + 14}" text-anchor="middle" fill="{MUTED}">{t:g}</text>')
    body.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 4}" text-anchor="middle" fill="{MUTED}">'
                f"{escape(x_label)}</text>")
    body.append(f'<text x="10" y="{top + plot_h / 2:.1f}" transform="rotate(-90 10 {top + plot_h / 2:.1f})" '
                f'text-anchor="middle" fill="{MUTED}">{escape(y_label)}</text>')
    legend_x = left + 8
    for index, (name, points) in enumerate(drawn.items()):
        colour = PALETTE.get(name, ["#59a14f", "#f28e2b", "#76b7b2"][index % 3])
        coords = " ".join(f"{_f(a)},{_f(b)}" for a, b in (xy(px, py) for px, py in points))
        body.append(f'<polyline class="series" points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        body += [f'<circle cx="{_f(a)}" cy="{_f(b)}" r="2.5" fill="{colour}"/>' for a, b in (xy(px, py) for px, py in points)]
        body.append(f'<rect x="{legend_x}" y="{top + 4 + 14 * index}" width="10" height="10" fill="{colour}"/>'
                    f'<text x="{legend_x + 14}" y="{top + 13 + 14 * index}" fill="{INK}">{escape(name)}</text>')
    return _svg("lines", width, height, sum(len(p) for p in drawn.values()), body, title)


def bar_chart(bars: Sequence[tuple[str, float | None, str]], *, title: str, prefix: str = "", width: int = 480,
              decimals: int = 4) -> str:
    """Horizontal bars `(label, value, colour key)`; the colour key picks a palette entry (condition names)."""
    shown = [(label, value, key) for label, value, key in bars if value is not None and value >= 0]
    if not shown:
        return _empty("bars", title, width)
    top_value = max(v for _, v, _ in shown) or 1.0
    left, right, top, row_h = _label_room([label for label, _, _ in shown], width), 90, 28, 20
    height = top + row_h * len(shown) + 10
    plot_w = width - left - right
    body = [f'<text x="{left}" y="16" fill="{INK}" font-weight="600">{escape(title)}</text>']
    for index, (label, value, key) in enumerate(shown):
        y = top + index * row_h
        bar_w = value / top_value * plot_w
        body.append(f'<text x="{left - 8}" y="{y + 14}" text-anchor="end" fill="{INK}">{escape(label)}</text>')
        body.append(f'<rect class="bar" x="{left}" y="{y + 3}" width="{_f(max(bar_w, 1.0))}" height="{row_h - 6}" '
                    f'fill="{PALETTE.get(key, "#76b7b2")}"/>')
        body.append(f'<text x="{_f(left + bar_w + 6)}" y="{y + 14}" fill="{INK}">{escape(prefix)}{value:,.{decimals}f}'
                    "</text>")
    return _svg("bars", width, height, len(shown), body, title)
