"""The provider-fault matrix (`tests/test_provider_faults.py`) on the Anthropic API."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.test_provider_faults import RID as RID  # the run the conftest `emulator` fixture serves
from tests.test_provider_faults import fault_case, matrix, reference_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference_run(tmp_path_factory)


@pytest.mark.parametrize("case", matrix("anthropic"))
def test_the_run_survives_the_fault_without_paying_twice(tmp_path: Path, emulator: str, reference: dict[str, Any],
                                                         case: str) -> None:
    fault_case(tmp_path, emulator, reference, "anthropic", case)
