"""The hostile download matrix (`tests/test_hostile_downloads.py`) on the OpenAI API: its results download shaped by
each hostile body; the CLI fallback cases are skipped (Fireworks features)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_hostile_downloads import RID as RID  # the run the conftest `emulator` fixture serves
from tests.test_hostile_downloads import hostile_case, matrix

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("case", "needle"), matrix("openai"))
def test_hostile_download_fails_the_part_bounded_and_a_good_one_repairs_it(tmp_path: Path, emulator: str, case: str,
                                                                          needle: str) -> None:
    hostile_case(tmp_path, emulator, "openai", case, needle)
