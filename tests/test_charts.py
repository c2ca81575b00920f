"""Inline SVG charts: deterministic, escaped, every mark inside the axis, and a placeholder for no data."""

from __future__ import annotations

import re

from pipeline.report.charts import Interval, bar_chart, forest_plot, line_chart


def numbers(svg: str, attribute: str) -> list[float]:
    return [float(v) for v in re.findall(rf'{attribute}="(-?[0-9.]+)"', svg)]


def test_forest_plot_keeps_every_interval_inside_the_axis_and_escapes_labels() -> None:
    rows = [Interval("EM <b>", 0.2, 0.1, 0.567, "T=0.7"), Interval("F1", -0.05, -0.3, 0.1, "T=0.7"),
            Interval("n/a row", None, None, None, "T=0.7")]
    svg = forest_plot(rows, title="deltas & CIs", width=600)
    assert svg == forest_plot(rows, title="deltas & CIs", width=600)
    assert 'data-points="2"' in svg and "EM &lt;b&gt;" in svg and "deltas &amp; CIs" in svg
    grid = [float(x) for x in re.findall(r'<line x1="([0-9.]+)" y1="[0-9.]+" x2="\1"', svg)]
    ends = [float(x) for pair in re.findall(r'class="ci" x1="([0-9.]+)" y1="[0-9.]+" x2="([0-9.]+)"', svg) for x in pair]
    assert ends and min(grid) <= min(ends) and max(ends) <= max(grid)


def test_line_and_bar_charts_count_their_points_and_skip_missing_values() -> None:
    lines = line_chart({"control": [(1.0, 0.4), (0.8, 0.3)], "treatment": []}, title="risk", x_label="c", y_label="r",
                       y_max=1.0)
    assert 'class="chart lines" data-points="2"' in lines and lines.count("<polyline") == 1
    bars = bar_chart([("a", 0.5, "control"), ("b", None, "treatment")], title="usd", prefix="$")
    assert 'class="chart bars" data-points="1"' in bars and "$0.5000" in bars


def test_no_data_gives_a_placeholder() -> None:
    for svg in (forest_plot([], title="f"), line_chart({}, title="l", x_label="", y_label=""), bar_chart([], title="b")):
        assert 'data-points="0"' in svg and "no data" in svg
