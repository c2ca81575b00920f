"""The provider-fault matrix (`tests/test_provider_faults.py`) on the Anthropic API."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_emulator
from tests.test_provider_faults import RID, fault_case, matrix, reference_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return reference_run(tmp_path_factory)


@pytest.fixture
def emulator(tmp_path: Path) -> Iterator[str]:
    with run_emulator(tmp_path / "exp", RID) as base_url:
        yield base_url


@pytest.mark.parametrize("case", matrix("anthropic"))
def test_the_run_survives_the_fault_without_paying_twice(tmp_path: Path, emulator: str, reference: dict[str, Any],
                                                         case: str) -> None:
    fault_case(tmp_path, emulator, reference, "anthropic", case)
