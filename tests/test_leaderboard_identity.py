"""Tests of the run identity's declared groups (leaderboard.identity): every TrainConfig field is declared exactly
once (key, neutral, training-only or evaluation), an undeclared field is caught, and each group acts on the config id
as declared, for trained methods and for the untrained `base` model."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict
from typing import Any

import pytest

from craft_bench.agents.trainer import TrainConfig
from craft_bench.leaderboard.identity import (
    EVALUATION_SETTINGS,
    KEY_SETTINGS,
    LATER_METHOD_OPTIONS,
    LATER_SETTINGS,
    NEUTRAL_SETTINGS,
    TRAINING_ONLY_SETTINGS,
    config_id,
    run_config,
    undeclared_settings,
)
from craft_bench.leaderboard.schema import EVAL_TEMPERATURE

GROUPS = {"key": KEY_SETTINGS, "neutral": tuple(NEUTRAL_SETTINGS), "training-only": TRAINING_ONLY_SETTINGS,
          "evaluation": EVALUATION_SETTINGS}
FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]
METHOD = {"alpha": 0.01, "lam": 0.01}


def test_every_trainconfig_field_is_declared_in_exactly_one_group():
    """A new TrainConfig field must be declared: neutral (with the reason) if it provably cannot change results,
    training-only if it changes training but not an untrained evaluation, evaluation if it changes any row."""
    assert undeclared_settings(FIELDS) == [], (
        "declare each new TrainConfig field in craft_bench/leaderboard/identity.py: NEUTRAL_SETTINGS (with the reason "
        "it cannot change results), TRAINING_ONLY_SETTINGS or EVALUATION_SETTINGS")
    declared = [name for names in GROUPS.values() for name in names]
    assert sorted(name for name in set(declared) if declared.count(name) > 1) == []
    assert sorted(set(declared) - set(FIELDS)) == [], "a declared name is not a TrainConfig field (renamed or removed?)"


def test_a_field_added_to_trainconfig_without_a_declaration_is_caught():
    grown = dataclasses.make_dataclass("Grown", [("brand_new_knob", int, dataclasses.field(default=3))],
                                       bases=(TrainConfig,))
    assert undeclared_settings(f.name for f in dataclasses.fields(grown)) == ["brand_new_knob"]
    # Until declared, it is recorded for every method, base included: it can split an id, never merge two.
    settings = {**asdict(TrainConfig()), "brand_new_knob": 3}
    assert run_config(settings, METHOD)["train"]["brand_new_knob"] == 3
    assert run_config({**settings, "method": "base"}, {})["train"]["brand_new_knob"] == 3


def _changed(value: Any) -> Any:
    """A different value of the same kind (the identity hashes values; it does not validate them)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, str):
        return value + "_other"
    if isinstance(value, dict):
        return {**value, "other": 1}
    return 7  # None


def _ids(name: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """(trained id before, after) and (base id before, after) when setting `name` changes."""
    settings = asdict(TrainConfig())
    other = {**settings, name: _changed(settings[name])}
    trained = (config_id(run_config(settings, METHOD)), config_id(run_config(other, METHOD)))
    base_settings, base_other = {**settings, "method": "base"}, {**other, "method": "base"}
    if name == "method":
        base_other["method"] = "base"
    base = (config_id(run_config(base_settings, {})), config_id(run_config(base_other, {})))
    return trained, base


@pytest.mark.parametrize("name", EVALUATION_SETTINGS + (EVAL_TEMPERATURE,))
def test_an_evaluation_setting_changes_the_id_of_trained_and_base_rows(name):
    (trained, trained_after), (base, base_after) = _ids(name)
    assert trained != trained_after and base != base_after


@pytest.mark.parametrize("name", TRAINING_ONLY_SETTINGS)
def test_a_training_only_setting_changes_trained_ids_and_never_the_base_id(name):
    (trained, trained_after), (base, base_after) = _ids(name)
    assert trained != trained_after and base == base_after


@pytest.mark.parametrize("name", [n for n in NEUTRAL_SETTINGS if n not in ("method_options", EVAL_TEMPERATURE)]
                         + list(KEY_SETTINGS))
def test_neutral_and_key_settings_never_enter_method_config(name):
    (trained, trained_after), (base, base_after) = _ids(name)
    assert trained == trained_after and base == base_after


def test_base_has_no_method_options_and_its_config_holds_only_evaluation_settings():
    config = run_config({**asdict(TrainConfig(lr=1e-3, steps=99)), "method": "base"}, {})
    assert set(config) == {EVAL_TEMPERATURE, "train"}
    assert set(config["train"]) == set(EVALUATION_SETTINGS) - set(LATER_SETTINGS)
    with pytest.raises(ValueError, match="has no options"):
        run_config({**asdict(TrainConfig()), "method": "base"}, {"lam": 0.01})


@pytest.mark.parametrize("name", sorted(LATER_SETTINGS))
def test_a_later_setting_at_its_legacy_value_keeps_the_ids_of_rows_made_before_it_existed(name):
    """A setting added after rows were published is left out at the value that reproduces the old behaviour (the
    id of a config without the field at all), and recorded at any other value."""
    settings = asdict(TrainConfig())
    assert settings[name] == LATER_SETTINGS[name], "the default must reproduce the behaviour from before the setting"
    before = {key: value for key, value in settings.items() if key != name}
    for method, options in (("craft", METHOD), ("base", {})):
        assert run_config({**settings, "method": method}, options) == run_config({**before, "method": method}, options)
        changed = run_config({**settings, "method": method, name: _changed(settings[name])}, options)
        if method == "base" and name in TRAINING_ONLY_SETTINGS:  # the untrained model never records those
            assert name not in changed["train"]
        else:
            assert changed["train"][name] == _changed(settings[name])


@pytest.mark.parametrize("name", sorted(LATER_METHOD_OPTIONS))
def test_a_later_method_option_at_its_legacy_value_keeps_the_ids_of_rows_made_before_it_existed(name):
    from craft_bench.agents.methods import make_method

    settings = {**asdict(TrainConfig()), "method": "craft"}
    resolved = make_method("craft").config
    assert resolved[name] == LATER_METHOD_OPTIONS[name], "the default must reproduce the behaviour from before it"
    before = {key: value for key, value in resolved.items() if key != name}
    assert run_config(settings, resolved) == run_config(settings, before)
    other = make_method("craft", **{name: "episode"}).config
    assert run_config(settings, other)[name] == "episode"
    assert config_id(run_config(settings, other)) != config_id(run_config(settings, resolved))


def test_the_committed_leaderboard_ids_are_the_ids_head_computes():
    """Every entry of leaderboard/submissions is named by the config id that this code computes for its row's
    settings (through the harness's own `run_id`, so the method's resolved options count too), so a user who reruns a
    row's command lands in the same entry."""
    from pathlib import Path

    from craft_bench.leaderboard.schema import read_table
    from craft_bench.run import run_id

    files = sorted((Path(__file__).parents[1] / "leaderboard" / "submissions").glob("*.csv"))
    assert files, "no committed submissions"
    for path in files:
        for row in read_table(path).to_dict("records"):
            recorded = json.loads(row["method_config"])
            options = {k: v for k, v in recorded.items() if k not in ("train", EVAL_TEMPERATURE)}
            config = TrainConfig(**{**recorded["train"], EVAL_TEMPERATURE: recorded[EVAL_TEMPERATURE],
                                    "method": row["method"], "method_options": options})
            assert run_id(config) == config_id(row["method_config"]) and run_id(config) in path.name, path.name
