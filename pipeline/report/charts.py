"""Charts for report.html as inline SVG: pure functions from plain data to markup, no JavaScript, no fetches.

Every function returns a complete `<svg>` element whose root carries `class="chart <kind>"` (`forest`, `lines`,
`bars`) and a `data-points` count of the marks drawn (what the browser test checks). Labels are escaped; numbers
are rounded so that the same data always gives the same bytes. An empty input gives a "no data" chart of the same
width rather than raising. Marks carry a `<title>` with their exact values (the browser shows it on hover).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

FONT = "font-family:system-ui,-apple-system,'Segoe UI',sans-serif;font-size:12px;font-variant-numeric:tabular-nums"
PALETTE = {"control": "#4e79a7", "treatment": "#f28e2b"}
NEUTRAL = "#76b7b2"
INK, GRID, MUTED, BAND = "#222", "#e3e5e8", "#6b7280", "#f3f4f6"
STRONG, WEAK = "#1f3b63", "#9aa3b2"  # forest marks whose CI excludes / includes zero
_CHAR_PX = 6.6  # mean advance of a 12 px system-ui glyph, for sizing label columns without a font engine


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


def _heading(title: str, subtitle: str = "", x: float = 10) -> list[str]:
    body = [f'<text x="{_f(x)}" y="18" fill="{INK}" font-weight="600" font-size="13">{escape(title)}</text>']
    if subtitle:
        body.append(f'<text x="{_f(x)}" y="34" fill="{MUTED}">{escape(subtitle)}</text>')
    return body


def _empty(kind: str, title: str, width: int, height: int = 64) -> str:
    return _svg(kind, width, height, 0,
                _heading(title) + [f'<text x="10" y="{height - 16}" fill="{MUTED}">no data</text>'], title)


def _text_px(text: str) -> float:
    return len(text) * _CHAR_PX


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values from at or below `low` to at or above `high` (so nothing is drawn off the axis)."""
    span = high - low or 1.0
    raw = span / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(low / step) * step
    ticks = [round(start, 10)]
    while ticks[-1] < high - step * 1e-9:
        ticks.append(round(ticks[-1] + step, 10))
    return ticks


def _signed(value: float) -> str:
    return f"{value:+.2f}".replace("-", "−")


def forest_plot(rows: Sequence[Interval], *, title: str, subtitle: str = "", unit: str = "pp", scale: float = 100.0,
                width: int = 1036) -> str:
    """Estimates with CIs (values × `scale`, in `unit`) around a zero line, one row each, under a band per `group`.

    Left: the row labels; right: the estimate and CI as text. A filled mark means the CI excludes zero.
    """
    shown = [r for r in rows if r.estimate is not None]
    if not shown:
        return _empty("forest", title, width)
    values = [v * scale for r in shown for v in (r.estimate, r.low, r.high) if v is not None]
    low, high = min(min(values), 0.0), max(max(values), 0.0)
    pad = (high - low) * 0.04 or 1.0
    ticks = _ticks(low - pad, high + pad)
    x0, x1 = ticks[0], ticks[-1]
    groups: list[str] = []
    for r in rows:
        if r.group not in groups:
            groups.append(r.group)
    row_h, top = 20, 48 if subtitle else 34
    left = int(min(max(_text_px(r.label) for r in rows) + 28, width * 0.35))
    right = 176
    plot_w = width - left - right
    n_rows = len(rows) + sum(1 for g in groups if g)
    axis_y = top + row_h * n_rows + 6
    height = axis_y + 40

    def x(v: float) -> float:
        return left + (v - x0) / (x1 - x0) * plot_w

    body = _heading(title, subtitle)
    legend_x = width - 10
    body.append(f'<text x="{legend_x}" y="18" text-anchor="end" fill="{MUTED}">'
                f'<tspan fill="{STRONG}">●</tspan> CI excludes 0<tspan dx="14" fill="{WEAK}">○</tspan> CI includes 0</text>')
    body.append(f'<text x="{width - 10}" y="{top - 6}" text-anchor="end" fill="{MUTED}">Δ [95% CI] ({escape(unit)})</text>')
    y = top
    bands: list[str] = []
    marks: list[str] = []
    for group in groups:
        if group:
            bands.append(f'<rect x="0" y="{y}" width="{width}" height="{row_h}" fill="{BAND}"/>')
            marks.append(f'<text x="10" y="{y + 14}" fill="{INK}" font-weight="600">{escape(group)}</text>')
            y += row_h
        for r in (r for r in rows if r.group == group):
            mid = y + row_h / 2
            marks.append(f'<text x="{left - 12}" y="{_f(mid + 4)}" text-anchor="end" fill="{INK}">{escape(r.label)}</text>')
            if r.estimate is None:
                marks.append(f'<text x="{width - 10}" y="{_f(mid + 4)}" text-anchor="end" fill="{MUTED}">n/a</text>')
                y += row_h
                continue
            est = r.estimate * scale
            ci = (r.low * scale, r.high * scale) if r.low is not None and r.high is not None else None
            strong = ci is not None and (ci[0] > 0 or ci[1] < 0)
            colour = STRONG if strong else WEAK
            ci_text = f" [{_signed(ci[0])}, {_signed(ci[1])}]" if ci else " [n/a]"
            if ci:
                lo, hi = x(ci[0]), x(ci[1])
                marks.append(f'<line class="ci" x1="{_f(lo)}" y1="{_f(mid)}" x2="{_f(hi)}" y2="{_f(mid)}" '
                             f'stroke="{colour}" stroke-width="1.6"/>')
                marks += [f'<line class="cap" x1="{_f(v)}" y1="{_f(mid - 4)}" x2="{_f(v)}" y2="{_f(mid + 4)}" '
                          f'stroke="{colour}" stroke-width="1.6"/>' for v in (lo, hi)]
            marks.append(f'<circle class="estimate" cx="{_f(x(est))}" cy="{_f(mid)}" r="4.5" '
                         f'fill="{STRONG if strong else "#fff"}" stroke="{colour}" stroke-width="1.8">'
                         f"<title>{escape(r.group + ' · ' if r.group else '')}{escape(r.label)}: "
                         f"{_signed(est)}{ci_text} {escape(unit)}</title></circle>")
            marks.append(f'<text x="{width - 10}" y="{_f(mid + 4)}" text-anchor="end" '
                         f'fill="{INK if strong else MUTED}">{_signed(est)}{ci_text}</text>')
            y += row_h
    grid = []
    for t in ticks:
        grid.append(f'<line x1="{_f(x(t))}" y1="{top}" x2="{_f(x(t))}" y2="{axis_y}" stroke="{GRID}"/>')
        grid.append(f'<text x="{_f(x(t))}" y="{axis_y + 16}" text-anchor="middle" fill="{MUTED}">{t:g}</text>')
    grid.append(f'<line class="zero" x1="{_f(x(0))}" y1="{top}" x2="{_f(x(0))}" y2="{axis_y}" stroke="{INK}" '
                'stroke-dasharray="4 3"/>')
    grid.append(f'<text x="{left + plot_w / 2:.1f}" y="{axis_y + 33}" text-anchor="middle" fill="{MUTED}">'
                f"treatment − control ({escape(unit)})</text>")
    return _svg("forest", width, height, len(shown), body + bands + grid + marks, title)


def line_chart(series: dict[str, Sequence[tuple[float, float]]], *, title: str, x_label: str, y_label: str,
               subtitle: str = "", width: int = 512, height: int = 280, y_max: float | None = None) -> str:
    """One polyline with point marks per series over [0, 1] × [0, y_max] (e.g. selective risk over coverage)."""
    drawn = {name: sorted(points) for name, points in series.items() if points}
    if not drawn:
        return _empty("lines", title, width, height)
    top_value = y_max if y_max is not None else max(max(y for _, y in pts) for pts in drawn.values()) or 1.0
    left, right, top, bottom = 52, 16, 48 if subtitle else 36, 42
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(px: float, py: float) -> tuple[float, float]:
        return left + px * plot_w, top + plot_h - (py / top_value) * plot_h

    body = _heading(title, subtitle)
    for t in _ticks(0.0, top_value, 5):
        if t <= top_value + 1e-12:
            _, ty = xy(0, t)
            body.append(f'<line x1="{left}" y1="{_f(ty)}" x2="{width - right}" y2="{_f(ty)}" stroke="{GRID}"/>')
            body.append(f'<text x="{left - 6}" y="{_f(ty + 4)}" text-anchor="end" fill="{MUTED}">{t:g}</text>')
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        tx, _ = xy(t, 0)
        body.append(f'<line x1="{_f(tx)}" y1="{top}" x2="{_f(tx)}" y2="{top + plot_h}" stroke="{GRID}"/>')
        body.append(f'<text x="{_f(tx)}" y="{top + plot_h + 16}" text-anchor="middle" fill="{MUTED}">{t:g}</text>')
    body.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" fill="{MUTED}">'
                f"{escape(x_label)}</text>")
    body.append(f'<text x="14" y="{top + plot_h / 2:.1f}" transform="rotate(-90 14 {top + plot_h / 2:.1f})" '
                f'text-anchor="middle" fill="{MUTED}">{escape(y_label)}</text>')
    legend_x = width - right
    for name in reversed(list(drawn)):  # right-aligned legend, laid out from the right
        colour = PALETTE.get(name, NEUTRAL)
        legend_x -= _text_px(name) + 30
        body.append(f'<rect x="{_f(legend_x)}" y="8" width="12" height="12" rx="2" fill="{colour}"/>'
                    f'<text x="{_f(legend_x + 17)}" y="18" fill="{INK}">{escape(name)}</text>')
    for name, points in drawn.items():
        colour = PALETTE.get(name, NEUTRAL)
        coords = [xy(px, py) for px, py in points]
        body.append(f'<polyline class="series" points="{" ".join(f"{_f(a)},{_f(b)}" for a, b in coords)}" '
                    f'fill="none" stroke="{colour}" stroke-width="2.2" stroke-linejoin="round"/>')
        body += [f'<circle cx="{_f(a)}" cy="{_f(b)}" r="3.2" fill="{colour}"><title>{escape(name)}: '
                 f"{escape(x_label)} {px:.3f}, {escape(y_label)} {py:.3f}</title></circle>"
                 for (a, b), (px, py) in zip(coords, points, strict=True)]
    return _svg("lines", width, height, sum(len(p) for p in drawn.values()), body, title)


def bar_chart(bars: Sequence[tuple[str, float | None, str]], *, title: str, prefix: str = "", width: int = 560,
              decimals: int = 4) -> str:
    """Horizontal bars `(label, value, colour key)`; the key picks a palette entry (a condition name), else neutral."""
    shown = [(label, value, key) for label, value, key in bars if value is not None and value >= 0]
    if not shown:
        return _empty("bars", title, width)
    top_value = max(v for _, v, _ in shown) or 1.0
    labels = [f"{prefix}{value:,.{decimals}f}" for _, value, _ in shown]
    left = int(min(max(_text_px(label) for label, _, _ in shown) + 24, width * 0.5))
    right = int(max(_text_px(text) for text in labels) + 16)
    top, row_h = 32, 22
    height = top + row_h * len(shown) + 8
    plot_w = width - left - right
    body = _heading(title)
    for index, ((label, value, key), text) in enumerate(zip(shown, labels, strict=True)):
        y = top + index * row_h
        bar_w = value / top_value * plot_w
        body.append(f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" fill="{INK}">{escape(label)}</text>')
        body.append(f'<rect class="bar" x="{left}" y="{y + 4}" width="{_f(max(bar_w, 1.0))}" height="{row_h - 8}" '
                    f'rx="2" fill="{PALETTE.get(key, NEUTRAL)}"><title>{escape(label)}: {escape(text)}</title></rect>')
        body.append(f'<text x="{_f(left + bar_w + 6)}" y="{y + 15}" fill="{INK}">{escape(text)}</text>')
    return _svg("bars", width, height, len(shown), body, title)
