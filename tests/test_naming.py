from __future__ import annotations

import pytest

from pipeline.naming import (
    fmt_param,
    is_safe_component,
    job_key,
    make_custom_id,
    parse_custom_id,
    remote_id,
    temp_label,
)


@pytest.mark.parametrize(("temp", "label"), [(0.0, "0"), (0.7, "07"), (1.0, "10"), (0.2, "02"), (0.25, "025"),
                                             (1.5, "15"), (2.0, "20")])
def test_temp_labels_are_original_compatible(temp: float, label: str) -> None:
    assert temp_label(temp) == label


def test_temp_labels_unique_over_a_fine_grid() -> None:
    temps = [round(i * 0.05, 2) for i in range(41)] + [0.25, 0.125, 0.333]
    labels = [temp_label(t) for t in temps]
    assert len(set(labels)) == len(set(temps))


@pytest.mark.parametrize(("value", "text"), [(1.0, "1"), (0.95, "095"), (0.9, "09"), (0.0, "0")])
def test_fmt_param_matches_original(value: float, text: str) -> None:
    assert fmt_param(value) == text


@pytest.mark.parametrize("temp", [0.0, 0.7, 0.25, 1.0, 0.125])
def test_custom_id_round_trip(temp: float) -> None:
    cid = make_custom_id("squad_v2", "abc-1", "treatment", temp, 3, "open")
    parsed = parse_custom_id(cid)
    assert str(parsed) == cid
    assert (parsed.dataset, parsed.item_id, parsed.condition, parsed.sample_index, parsed.type) == (
        "squad_v2", "abc-1", "treatment", 3, "open")
    assert float(parsed.temp) == temp
    assert parsed.item_key == "squad_v2|abc-1"


def test_custom_id_format_is_the_originals() -> None:
    assert make_custom_id("triviaqa", "q1", "control", 0.7, 0, "closed") == "triviaqa|q1|control|0.7|0|closed"


@pytest.mark.parametrize("bad", ["a|b|c", "d|i|ctl|0.7|0|open", "d|i|control|x|0|open", "d|i|control|0.7|0|book"])
def test_parse_custom_id_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_custom_id(bad)


def test_make_custom_id_rejects_separator_in_fields() -> None:
    with pytest.raises(ValueError, match="separator"):
        make_custom_id("squad|v2", "x", "control", 0.0, 0, "open")


def test_job_keys_distinct_for_close_temps() -> None:
    assert job_key(0.2, "control", 1) != job_key(0.25, "control", 1)
    assert job_key(0.7, "treatment", 12) == "t07_treatment_p12"


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden", "", "a b", "x" * 200])
def test_unsafe_components(name: str) -> None:
    assert not is_safe_component(name)


def test_remote_ids_are_valid_and_deterministic() -> None:
    import re

    ident = remote_id("ex-t07-cont-p01-" + "x" * 80, key="run|abc|0", suffix="out")
    assert ident == remote_id("ex-t07-cont-p01-" + "x" * 80, key="run|abc|0", suffix="out")
    assert re.fullmatch(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?", ident)
    assert ident.endswith("-out")
    assert remote_id("ex", key="a") != remote_id("ex", key="b")
    assert remote_id("123 Weird_Name", key="k")[0].isalpha()
