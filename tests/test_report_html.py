"""report.html and aggregate_report.html: self-contained pages whose charts come from the data, checked in process
and in a real browser (Debian's headless Chromium): the charts are in the rendered DOM, the page logs no console
message, requests nothing from the network, and a screenshot is taken.

Chromium is installed by `.ci/run`; elsewhere the browser tests are skipped when it is absent (never under CI).
Every Chromium here resolves every host name to nothing, so neither the page nor the browser's own background
services reach the network.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.control.config import load_config
from pipeline.pricing import pricing_args, resolve_rates
from pipeline.report.html import render_aggregate_html, render_trial_html
from pipeline.report.render import SIMULATED_LABEL
from tests.conftest import finished_run, small_experiment
from tests.test_report import _trial, context

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="Debian's chromium is not installed (CI installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0"]
SVG_NS = "http://www.w3.org/2000/svg"


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is not installed (.ci/run installs Debian's package)"
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """What the page logged: Chromium prints console messages to stderr as `…:CONSOLE(line)] "text", source: …`."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def page_requests(netlog: Path) -> list[str]:
    """URLs the page itself asked the network stack for (requests whose top frame is a file:// page); the
    browser's own background requests have another isolation key. The page's file is not loaded through it."""
    log = json.loads(netlog.read_text(encoding="utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return sorted({event["params"]["url"] for event in log["events"] if event["type"] == start
                   and str(event.get("params", {}).get("network_isolation_key", "")).startswith("file://")})


def render(page: Path, profile: Path) -> tuple[str, list[str], list[str]]:
    """The rendered DOM, the console messages and the page's network requests of one load of `page`."""
    netlog = profile.parent / f"{profile.name}.netlog.json"
    loaded = chromium(page, profile, f"--log-net-log={netlog}", "--dump-dom")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    return loaded.stdout, console_messages(loaded.stderr), page_requests(netlog)


def charts(html: str) -> dict[str, list[int]]:
    """kind → the data-points count of each chart, in page order."""
    found: dict[str, list[int]] = {}
    for kind, points in re.findall(r'<svg[^>]*class="chart (\w+)"[^>]*data-points="(\d+)"', html):
        found.setdefault(kind, []).append(int(points))
    return found


def links(html: str) -> list[str]:
    return re.findall(r'\b(?:href|src)\s*=\s*"([^"]*)"', html)


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("html")
    run_dir = finished_run(base / "exp", small_experiment(base), "html")
    return {"trial": next(run_dir.glob("*/reports/report.html")), "run": run_dir / "aggregate_report.html",
            "base": base}


# ---------------------------------------------------------------- the pages, in process


def test_trial_page_has_one_forest_per_temperature_and_a_risk_curve_per_type() -> None:
    html = render_trial_html(context())
    assert html == render_trial_html(context())
    found = charts(html)
    # T=0.0 closed-book has EM and Abstain deltas; T=0.7 has no significance block at all
    assert found["forest"] == [2, 0] and "no data" in html
    assert len(found["lines"]) == 4 and found["bars"] == [2, 8]  # cost by T × condition; items by T × type × cond
    assert 'id="deltas"' in html and 'id="provenance"' in html
    assert "a" * 64 in html and "b" * 64 in html and "cafebabe" in html and "job-abc" in html


def test_trial_page_tables_show_means_beside_deltas_with_cis() -> None:
    def em_row(html: str) -> tuple[str, list[str]]:
        row = re.search(r'<tr( class="sig")?><td class="l">EM</td>(.*?)</tr>', html)
        assert row, "an EM row"
        return row.group(1) or "", re.findall(r"<td[^>]*>(.*?)</td>", row.group(2))

    ctx = context()
    marked, cells = em_row(render_trial_html(ctx))
    assert cells[:4] == ["50.0%", "100.0%", "+50.00 pp", "[+0.00, +100.00] pp"] and not marked  # 0 is in the CI
    ctx["significance"]["results"]["0.0"]["closed"]["metrics"]["em"]["ci_95"] = [0.1, 0.9]
    assert em_row(render_trial_html(ctx))[0] == ' class="sig"'


def test_selective_risk_points_become_polylines() -> None:
    ctx = context()
    ctx["significance"]["results"]["0.0"]["closed"]["selective_risk"]["points"] = {
        "control": [{"coverage": 1.0, "risk": 0.5}, {"coverage": 0.5, "risk": 0.25}],
        "treatment": [{"coverage": 0.75, "risk": None}, {"coverage": 0.9, "risk": 0.2}]}
    first_risk_chart = re.search(r'<svg[^>]*class="chart lines".*?</svg>', render_trial_html(ctx), re.S)
    assert first_risk_chart and 'data-points="3"' in first_risk_chart.group(0)
    assert first_risk_chart.group(0).count("<polyline") == 2 and "AURC control 0.2500" in first_risk_chart.group(0)


def test_trial_page_escapes_text_and_survives_missing_blocks() -> None:
    ctx = context()
    ctx["prompts"]["control"]["path"] = "<script>alert(1)</script>"
    ctx["trial"]["slug"] = 'x" onload="y'
    html = render_trial_html(ctx)
    assert "<script" not in html and "&lt;script&gt;" in html and 'x" onload' not in html
    ctx.update(significance={}, costs={}, jobs={}, per_item=None)
    bare = charts(render_trial_html(ctx))
    assert bare["forest"] == [0, 0] and bare["lines"] == [0, 0, 0, 0] and bare["bars"] == [0, 8]


def test_run_page_links_each_trial_and_plots_its_deltas() -> None:
    trials = [{**_trial("a"), "report_href": "a/reports/report.html"}, _trial("b", significance={}, costs={})]
    html = render_aggregate_html({"rid": "r", "trials": trials})
    assert '<a href="a/reports/report.html">a</a>' in html and 'href="b/' not in html
    assert charts(html) == {"forest": [1], "bars": [1]}


# ---------------------------------------------------------------- the pages of a real run


def test_emulator_pages_open_with_the_simulated_banner_and_fireworks_pages_without() -> None:
    trials = [_trial("a")]
    for name in ("emulator", "fireworks"):
        pages = [render_trial_html({**context(), "provider": name}),
                 render_aggregate_html({"rid": "r", "provider": name, "trials": trials})]
        for html in pages:
            assert f"provider <b>{name}</b>" in html.lower()
            banner = re.search(r'<main>\s*<p class="simulated"[^>]*><b>([^<]*)</b>', html)
            assert (banner.group(1) if banner else None) == (SIMULATED_LABEL if name == "emulator" else None)
            assert ("SIMULATED" in html) == (name == "emulator")


def test_an_emulator_run_says_so_in_every_report_and_in_its_costs(reports: dict[str, Path]) -> None:
    run_dir = reports["run"].parent
    trial_reports = reports["trial"].parent
    pages = [trial_reports / "report.md", reports["trial"], run_dir / "aggregate_report.md", reports["run"]]
    for page in pages:
        text = page.read_text(encoding="utf-8")
        body = text[text.index("<main>"):] if page.suffix == ".html" else text  # a page's head is its styles
        head = "\n".join(body.splitlines()[:8])
        assert SIMULATED_LABEL in head and "emulator" in head, page.name
    costs = json.loads((trial_reports.parent / "results" / "costs.json").read_text(encoding="utf-8"))
    assert costs["provider"] == "emulator"
    # priced as before: with the Fireworks rates of the config's pricing table
    cfg = load_config(reports["base"] / "config" / "experiment.yaml")
    assert costs["pricing"] == resolve_rates(**pricing_args(cfg, cfg.model_id))
    assert costs["pricing"]["provider"] == "fireworks" and costs["pricing"]["table_found"]


@pytest.mark.parametrize("page", ["trial", "run"])
def test_reports_are_self_contained(reports: dict[str, Path], page: str) -> None:
    path = reports[page]
    html = path.read_text(encoding="utf-8")
    assert "<script" not in html.lower() and "@import" not in html and "url(" not in html
    urls = set(re.findall(r"[a-z][a-z0-9+.-]*://[^\s\"'<>)]+", html)) - {SVG_NS}
    assert not urls, f"a self-contained page refers to nothing outside itself: {sorted(urls)[:5]}"
    ids = set(re.findall(r'\bid="([^"]+)"', html))
    for link in links(html):
        # in-page anchors, and on the run page relative links to the trials' pages (followed only on a click)
        assert (link.startswith("#") and link[1:] in ids) or (page == "run" and (path.parent / link).is_file()), link
    assert page == "trial" or any(link.endswith("report.html") for link in links(html))


@pytest.mark.e2e
@needs_chromium
@pytest.mark.parametrize(("page", "expected"), [("trial", {"forest": 2, "lines": 4, "bars": 2}),
                                                 ("run", {"forest": 1, "bars": 1})])
def test_chromium_renders_the_charts_quietly_and_offline(reports: dict[str, Path], page: str,
                                                         expected: dict[str, int]) -> None:
    profile = reports["base"] / f"profile-{page}"
    dom, console, requests = render(reports[page], profile)
    assert not console, console
    assert not requests, requests
    found = charts(dom)
    assert {kind: len(counts) for kind, counts in found.items()} == expected
    assert all(n > 0 for counts in found.values() for n in counts), f"a chart without data: {found}"
    assert dom.count("<circle") > 0 and dom.count('class="ci"') > 0
    shot = reports["base"] / f"{page}.png"
    taken = chromium(reports[page], profile, "--window-size=1200,1800", f"--screenshot={shot}")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@needs_chromium
@pytest.mark.parametrize(("body", "catches"), [
    ('<script>console.error("noisy page")</script>', "console"),
    ('<img src="https://reports.invalid/x.png"><svg><image href="http://reports.invalid/y.png"/></svg>', "requests"),
])
def test_the_browser_checks_catch_a_bad_page(tmp_path: Path, body: str, catches: str) -> None:
    page = tmp_path / "bad.html"
    page.write_text(f"<!DOCTYPE html><html><body><p>bad</p>{body}</body></html>")
    _, console, requests = render(page, tmp_path / "profile")
    found: dict[str, Any] = {"console": console, "requests": requests}
    if catches == "console":
        assert any("noisy page" in line for line in console) and not requests
    else:
        assert requests == ["http://reports.invalid/y.png", "https://reports.invalid/x.png"], found


# ---------------------------------------------------------------- no horizontal overflow at 1280 px

# Written into the page after it laid out: the document's overflow, and every scroll box whose content is wider
# than the box (a table whose right columns are hidden until the reader scrolls the box).
_MEASURE = """<script>
const boxes = [...document.querySelectorAll(".scroll, table")].filter(e => e.scrollWidth > e.clientWidth + 1);
const out = document.createElement("pre");
out.id = "overflow-measure";
out.textContent = JSON.stringify({scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
  wide: boxes.map(e => `${e.tagName}: ${e.scrollWidth} > ${e.clientWidth}: ${e.textContent.slice(0, 60)}`)});
document.body.appendChild(out);
</script>"""


def markdown_page(text: str) -> str:
    """Markdown as a viewer shows it: headings, paragraphs, list items, `code` and pipe tables become HTML with the
    browser's default styles (cells wrap at spaces, as GitHub's do; nothing is scrolled)."""
    def inline(s: str) -> str:
        s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        return re.sub(r"`([^`]*)`", r"<code>\1</code>", s)

    html, table = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                table.append("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in cells) + "</tr>")
            continue
        if table:
            html.append("<table>" + "".join(table) + "</table>")
            table = []
        heading = re.match(r"(#+) (.*)", line)
        if heading:
            html.append(f"<h{len(heading.group(1))}>{inline(heading.group(2))}</h{len(heading.group(1))}>")
        elif line.startswith("- "):
            html.append(f"<li>{inline(line[2:])}</li>")
        elif line.strip():
            html.append(f"<p>{inline(line)}</p>")
    return "<!DOCTYPE html><html><body>" + "\n".join(html) + "</body></html>"


def overflow(page: Path, profile: Path) -> dict[str, Any]:
    """The measurement of `page` (HTML, or Markdown shown as `markdown_page`) in a 1280 px wide window."""
    text = page.read_text(encoding="utf-8")
    html = markdown_page(text) if page.suffix == ".md" else text
    probe = profile.parent / f"{profile.name}-{page.name}.probe.html"
    probe.write_text(html.replace("</body>", f"{_MEASURE}</body>"), encoding="utf-8")
    loaded = chromium(probe, profile, "--window-size=1280,900", "--dump-dom")
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    found = re.search(r'<pre id="overflow-measure">(.*?)</pre>', loaded.stdout, re.S)
    assert found, "the measuring script did not run"
    return json.loads(found.group(1).replace("&gt;", ">").replace("&lt;", "<").replace("&amp;", "&"))


@pytest.mark.e2e
@needs_chromium
def test_no_report_overflows_a_1280px_window(reports: dict[str, Path]) -> None:
    run_dir = reports["run"].parent
    pages = [reports["trial"].parent / "report.md", reports["trial"], run_dir / "aggregate_report.md", reports["run"]]
    for page in pages:
        measured = overflow(page, reports["base"] / "profile-overflow")
        assert measured["innerWidth"] == 1280, measured
        assert measured["scrollWidth"] <= measured["innerWidth"] and not measured["wide"], (page.name, measured)


def test_a_finished_run_reports_the_official_unanswerable_rule(reports: dict[str, Path]) -> None:
    """OptionalAnalyses writes unanswerable_rules.json and the report shows it (not n/a) in md and html."""
    text = (reports["trial"].parent / "report.md").read_text(encoding="utf-8")
    html = reports["trial"].read_text(encoding="utf-8")
    rules = re.findall(r"#### Open-book under the official unanswerable rule\n.*?\n\| Control \| (\d+) \| ([^|]+) \|",
                       text, re.S)
    assert len(rules) == 2 and all(re.fullmatch(r"\d+\.\d%", em.strip()) for _, em in rules), rules
    assert "Official-rule scores: n/a" not in text
    assert "EM (official)" in html and "Official-rule scores: n/a" not in html


@needs_chromium
def test_the_overflow_check_catches_a_wide_page(tmp_path: Path) -> None:
    wide = tmp_path / "wide.html"
    wide.write_text('<!DOCTYPE html><html><body><div class="scroll" style="overflow-x:auto">'
                    '<table><tr><td style="white-space:nowrap">' + "x" * 400 + "</td></tr></table></div>"
                    '<p style="width:1500px">wide</p></body></html>')
    measured = overflow(wide, tmp_path / "profile")
    assert measured["scrollWidth"] > 1280 and len(measured["wide"]) == 1
    assert overflow(_write(tmp_path / "wide.md", "| " + "y" * 300 + " |\n|---|\n"), tmp_path / "p2")["scrollWidth"] > 1280


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path
