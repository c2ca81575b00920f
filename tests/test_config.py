from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.control.config import ConfigError, expand_trials, load_config
from tests.conftest import write_config


def test_default_config_is_valid_and_expands_to_distinct_trials(config_dir: Path) -> None:
    cfg = load_config(config_dir / "experiment.yaml")
    trials = expand_trials(cfg)
    assert len(trials) >= 2
    assert len({t.slug for t in trials}) == len(trials)
    assert all(Path(p).is_absolute() for ps in cfg.prompt_sets.values() for p in (ps.control, ps.treatment))


def test_slug_follows_original_scheme(config_dir: Path) -> None:
    path = write_config(config_dir, sweep=None, trials=[{"prompt_set": "excellence", "model": "gpt-oss-120b",
                                                         "top_p": 0.95, "top_k": 40}])
    (trial,) = expand_trials(load_config(path))
    assert trial.slug == "gpt-oss-120b-excellence-tp095-tk40-mx256-512"
    assert trial.model_id == "accounts/fireworks/models/gpt-oss-120b"
    assert trial.top_p == 0.95 and trial.top_k == 40


def test_models_sharing_a_short_name_get_distinct_slugs(config_dir: Path) -> None:
    path = write_config(config_dir, sweep={"models": ["accounts/a/models/llama", "accounts/b/models/llama"]},
                        model_aliases={})
    slugs = [t.slug for t in expand_trials(load_config(path))]
    assert len(slugs) == 2 and len(set(slugs)) == 2


def test_trials_use_their_own_parameters(config_dir: Path) -> None:
    path = write_config(config_dir, sweep=None, trials=[
        {"model": "gpt-oss-20b", "prompt_set": "concise", "top_p": 0.9, "top_k": 10,
         "max_new_tokens": {"closed_book": 64, "open_book": 128}}])
    (trial,) = expand_trials(load_config(path))
    assert trial.model_id.endswith("gpt-oss-20b")
    assert (trial.max_tokens_for("closed"), trial.max_tokens_for("open")) == (64, 128)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"temps": [0.2, 0.2]}, "share the label"),
    ({"temps": [3.0]}, "temps"),
    ({"samples_per_item": {"0.0": 1}}, "no entry for temperature 0.7"),
    ({"samples_per_item": {"0.0": 0, "0.7": 1}}, "samples_per_item"),
    ({"prompt_sets": {"../evil": {"control": "prompts/control_system.txt", "treatment": "prompts/control_system.txt"}},
      "default_prompt_set": None, "sweep": None}, "prompt set name"),
    ({"prompt_sets": {"x": {"control": "prompts/nope.txt", "treatment": "prompts/control_system.txt"}},
      "default_prompt_set": None, "sweep": None}, "does not exist"),
    ({"default_prompt_set": "missing"}, "default_prompt_set"),
    ({"typo_key": 1}, "typo_key"),
    ({"top_p": 1.5}, "top_p"),
    ({"provider": {"name": "azure"}}, "provider.name"),
    ({"provider": {"name": "openai", "api": "anthropic"}}, "provider"),
    ({"pricing": {"providers": {"fireworks": {"m": {"input_per_mtok": 1}}}}}, "pricing"),
])
def test_invalid_configs_name_the_key(config_dir: Path, changes: dict, needle: str) -> None:
    path = write_config(config_dir, "bad.yaml", **changes)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "b.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_duplicate_trials_refused(config_dir: Path) -> None:
    path = write_config(config_dir, sweep=None, trials=[{"prompt_set": "concise"}, {"prompt_set": "concise"}])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(path)


def test_samples_keys_normalized(config_dir: Path) -> None:
    raw = yaml.safe_load((config_dir / "experiment.yaml").read_text())
    raw["samples_per_item"] = {0: 1, 0.7: 2}
    (config_dir / "n.yaml").write_text(yaml.safe_dump(raw))
    assert load_config(config_dir / "n.yaml").samples_per_item == {"0.0": 1, "0.7": 2}
