"""report.html in a real browser: Debian's headless Chromium renders it, the charts are in the DOM, the page logs no
console message, needs nothing from the network, and a screenshot is taken.

Chromium is installed by `.ci/run`; elsewhere the browser tests are skipped when it is absent (never under CI).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import finished_run, small_experiment

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                                    reason="Debian's chromium is not installed (CI installs it)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--enable-logging=stderr", "--v=0"]


def chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is not installed (.ci/run installs Debian's package)"
    profile.mkdir(parents=True, exist_ok=True)
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("html")
    run_dir = finished_run(base / "exp", small_experiment(base), "html")
    return {"trial": next(run_dir.glob("*/reports/report.html")), "run": run_dir / "aggregate_report.html",
            "base": base}


@pytest.mark.parametrize("page", ["trial", "run"])
def test_reports_are_self_contained(reports: dict[str, Path], page: str) -> None:
    html = reports[page].read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    urls = set(re.findall(r"(?:https?|file|ftp)://[^\s\"'<>)]+", html)) - {"http://www.w3.org/2000/svg"}
    assert not urls, f"a self-contained page fetches nothing: {sorted(urls)[:5]}"
    assert not re.search(r"\b(?:src|href)\s*=", html), "no linked resources"


@pytest.mark.e2e
@needs_chromium
@pytest.mark.parametrize(("page", "charts"), [("trial", {"forest": 2, "lines": 4, "bars": 2}),
                                               ("run", {"forest": 1, "bars": 1})])
def test_chromium_renders_the_charts_without_console_messages(reports: dict[str, Path], page: str,
                                                              charts: dict[str, int]) -> None:
    profile = reports["base"] / f"profile-{page}"
    dom = chromium(reports[page], profile, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert not console_messages(dom.stderr), console_messages(dom.stderr)
    for kind, count in charts.items():
        found = re.findall(rf'<svg[^>]*class="chart {kind}"[^>]*data-points="(\d+)"', dom.stdout)
        assert len(found) == count, f"{kind}: {len(found)} charts in the rendered DOM, expected {count}"
        assert all(int(n) > 0 for n in found), f"{kind}: a chart without data points"
    shot = reports["base"] / f"{page}.png"
    taken = chromium(reports[page], profile, "--window-size=1200,1800", f"--screenshot={shot}")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


@needs_chromium
def test_the_console_check_catches_a_page_that_logs(tmp_path: Path) -> None:
    page = tmp_path / "noisy.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("noisy page")</script></body></html>')
    rendered = chromium(page, tmp_path / "profile", "--dump-dom")
    assert any("noisy page" in line for line in console_messages(rendered.stderr))
