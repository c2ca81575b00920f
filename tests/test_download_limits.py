"""Download bounds derived from a part's requests, and the CLI fallback held to them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pipeline.providers import limits as L
from pipeline.providers.bounded_command import run_bounded
from pipeline.providers.limits import Deadline, DownloadLimits, DownloadRefused, ensure_free_space


@pytest.mark.parametrize(("requests", "max_tokens", "n"), [(1, 16, 1), (20, 512, 1), (500, 512, 1), (50_000, 512, 1),
                                                          (1_000, 4096, 1), (1_000, 512, 4), (0, 512, 1)])
def test_limit_follows_what_the_requests_can_hold(requests: int, max_tokens: int, n: int) -> None:
    legit = requests * (n * max_tokens * L.BYTES_PER_TOKEN + L.ENVELOPE_BYTES)
    limits = DownloadLimits.for_part(requests, max_tokens=max_tokens, n=n)
    assert limits.max_bytes == max(L.FLOOR_BYTES, legit)
    bigger = DownloadLimits.for_part(requests * 2 + 1, max_tokens=max_tokens, n=n)
    assert bigger.max_bytes >= limits.max_bytes
    assert limits.deadline_s == pytest.approx(L.STARTUP_S + limits.max_bytes / L.MIN_RATE)


@pytest.mark.parametrize("cap", [1, L.FLOOR_BYTES // 2, 10 * L.FLOOR_BYTES, 10**12])
def test_configured_cap_only_lowers_the_limit(cap: int) -> None:
    derived = DownloadLimits.for_part(5_000, max_tokens=512).max_bytes
    assert DownloadLimits.for_part(5_000, max_tokens=512, cap=cap).max_bytes == min(cap, derived)


def test_configured_deadline_wins() -> None:
    assert DownloadLimits.for_part(20, max_tokens=512, deadline_s=7.5).deadline_s == 7.5


def test_deadline_raises_once_passed() -> None:
    Deadline(60, "download x").check()
    with pytest.raises(DownloadRefused, match="download x: not finished within its deadline of 0 s"):
        Deadline(0, "download x").check()


def test_free_space_check_names_the_space_needed(tmp_path: Path) -> None:
    ensure_free_space(tmp_path / "not" / "yet", 1, "download of part p")
    with pytest.raises(DownloadRefused, match=r"download of part p may write up to [\d,]+ bytes but .* free"):
        ensure_free_space(tmp_path, 2**62, "download of part p")


FLOODS = {
    "one endless file": "import sys\nf = open(sys.argv[1] + '/a.jsonl', 'wb')\nwhile True: f.write(b'x' * 65536)\n",
    "stdout flood": "import sys\nwhile True: sys.stdout.buffer.write(b'x' * 65536)\n",
    "stderr flood": "import sys\nwhile True: sys.stderr.buffer.write(b'x' * 65536)\n",
}


@pytest.mark.parametrize("printed", [False, True], ids=["writes files", "prints results"])
@pytest.mark.parametrize("script", FLOODS)
def test_cli_flood_is_killed_at_the_byte_limit(tmp_path: Path, script: str, printed: bool) -> None:
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    limits = DownloadLimits(max_bytes=1 << 20, deadline_s=60)
    with pytest.raises(DownloadRefused, match="above the limit"):
        run_bounded([sys.executable, "-c", FLOODS[script], str(out)], out, logs, limits, "flood", printed=printed)
    written = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert written < 2 * limits.max_bytes


def test_cli_writing_many_files_is_killed_past_the_byte_limit(tmp_path: Path) -> None:
    """Each file stays under the kernel's limit; the sum is caught by the watcher (within one interval's writes)."""
    out = tmp_path / "out"
    out.mkdir()
    script = "import sys\ni = 0\nwhile True:\n    open(f'{sys.argv[1]}/f{i}', 'wb').write(b'x' * 200_000)\n    i += 1\n"
    with pytest.raises(DownloadRefused, match="above the limit of 1,048,576"):
        run_bounded([sys.executable, "-c", script, str(out)], out, tmp_path / "logs",
                    DownloadLimits(max_bytes=1 << 20, deadline_s=60), "many")


@pytest.mark.parametrize("printed", [False, True], ids=["writes files", "prints results"])
def test_cli_that_hangs_is_killed_at_the_deadline(tmp_path: Path, printed: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(DownloadRefused, match="hang: not finished within its deadline of 0.3 s"):
        run_bounded([sys.executable, "-c", "import time; time.sleep(60)"], out, tmp_path / "logs",
                    DownloadLimits(max_bytes=1 << 20, deadline_s=0.3), "hang", printed=printed)


@pytest.mark.parametrize("printed", [False, True], ids=["writes files", "prints results"])
def test_cli_within_bounds_returns_its_exit_code_and_stderr(tmp_path: Path, printed: bool) -> None:
    out = tmp_path / "out"
    out.mkdir()
    write = "print('{}')" if printed else "open(sys.argv[1] + '/BIJOutputSet.jsonl', 'w').write('{}\\n')"
    script = f"import sys\n{write}\nsys.exit('no more ' + 'x' * 500)\n"
    done = run_bounded([sys.executable, "-c", script, str(out)], out, tmp_path / "logs",
                       DownloadLimits(max_bytes=1 << 20, deadline_s=60), "ok", printed=printed)
    assert done.returncode == 1
    assert done.stderr_tail.endswith("x" * 50) and len(done.stderr_tail) <= 200
    assert (out / "BIJOutputSet.jsonl").read_text() == "{}\n"
