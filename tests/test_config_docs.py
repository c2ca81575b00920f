"""docs/config.md is generated from the config models and must match them (regenerate it when config.py changes)."""

from __future__ import annotations

import pytest

from pipeline.control.config import ExperimentConfig
from pipeline.control.config_docs import DOC_PATH, REGENERATE, main, render, type_name


def test_checked_in_config_reference_is_current() -> None:
    assert DOC_PATH.read_text(encoding="utf-8") == render(), (
        f"{DOC_PATH.name} is out of date with pipeline/control/config.py; regenerate it with `{REGENERATE}` "
        "and commit the result")


def test_every_key_is_listed_with_a_meaning() -> None:
    text = render()
    assert "(undocumented)" not in text, "give each new config field a description= or a docstring under it"
    for key in ("`model_id`", "`provider.name`", "`provider.download_command`", "`prompt_sets.<name>.control`",
                "`trials[].max_new_tokens.open_book`", "`stats.tost_margins`", "`optional.enable_mixed_effects`"):
        assert f"| {key} |" in text, key
    assert len([line for line in text.splitlines() if line.startswith("| `")]) >= len(ExperimentConfig.model_fields)


def test_types_show_bounds_and_defaults_are_json() -> None:
    text = render()
    assert '| `provider.name` | `"emulator" \\| "fireworks" \\| "openai" \\| "anthropic" \\| "local"` | `"emulator"` |' in text
    assert "| `provider.latency_s` | `float (≥ 0, ≤ 3600)` | `1.0` |" in text
    assert "| `samples_per_item` | `dict[str, int (> 0, ≤ 1000)]` | required |" in text
    assert "| `stats.risk_thresholds` | `list[float (≥ 0, ≤ 1)]` | `[0.0, 0.25, 0.5, 0.75, 1.0]` |" in text
    assert type_name(int | None) == "int | null"


def test_cli_rejects_unknown_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--bogus"]) == 2 and "usage" in capsys.readouterr().err
