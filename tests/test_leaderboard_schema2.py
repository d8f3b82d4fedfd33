"""Tests of leaderboard schema 2 and the run identity: schema-1 files read unchanged, task_score and policy_sha256,
base rows, one config id for every result-changing setting, the weights hash, and the paired t interval against GRPO
on hand-computed cases."""

from __future__ import annotations

import math
import shutil
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest

from craft_bench.leaderboard import SCHEMA_VERSION, LeaderboardValidationError, validate_rows, write_result_csv
from craft_bench.leaderboard.build import build, paired_difference, t_quantile, versus_grpo
from craft_bench.leaderboard.identity import NEUTRAL_SETTINGS, config_id, run_config, weights_sha256
from craft_bench.leaderboard.schema import LEADERBOARD_COLUMNS, LEADERBOARD_COLUMNS_V1, read_table, validate_csv
from craft_bench.leaderboard.store import entry_name, load_submissions, submit
from test_leaderboard import _row, _write_run

REPO = Path(__file__).resolve().parents[1]
POLICY_A, POLICY_B = "a1" * 32, "b2" * 32


def _problem_text(rows) -> str:
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_rows(rows)
    return str(caught.value)


# --- schema 1 files are read as they are ---------------------------------------------------------------------------

def _write_schema1_file(root: Path) -> Path:
    """One seed-0 row in schema 1's columns, as the first leaderboard wrote its files; returns the file."""
    (root / "submissions").mkdir(parents=True)
    old_row = {k: v for k, v in _text(_row(seed=0)).items() if k in LEADERBOARD_COLUMNS_V1}
    old_path = root / "submissions" / f"{entry_name({**old_row, 'policy_sha256': 'unknown'})}.csv"
    pd.DataFrame([old_row], columns=list(LEADERBOARD_COLUMNS_V1)).to_csv(old_path, index=False, lineterminator="\n")
    return old_path


def test_schema1_submissions_read_as_unknown_weights_without_task_score(tmp_path):
    # The committed leaderboard holds only current rows since issue 10 regenerated it; a schema-1 file written as
    # the first leaderboard's were still reads, with unknown initial weights and no task score.
    root = tmp_path / "lb"
    _write_schema1_file(root)
    frame = load_submissions(root)
    assert list(frame.columns) == list(LEADERBOARD_COLUMNS) and len(frame) == 1
    assert set(frame["schema_version"]) == {"1"}
    assert set(frame["policy_sha256"]) == {"unknown"} and set(frame["task_score"]) == {"NA"}


def test_the_committed_leaderboard_reads_in_the_current_schema():
    frame = load_submissions(REPO / "leaderboard")
    assert list(frame.columns) == list(LEADERBOARD_COLUMNS) and len(frame) > 0
    assert set(frame["schema_version"]) == {str(SCHEMA_VERSION)}


def test_a_schema1_file_keeps_its_name_and_is_rewritten_in_the_current_schema_only_when_touched(tmp_path):
    root = tmp_path / "lb"
    old_path = _write_schema1_file(root)
    assert len(validate_csv(old_path)) == 1
    submit(_write_run(tmp_path / "run", [1], [0.5]), root)  # same entry, unknown weights: joins the old file
    stored = read_table(old_path)
    assert list(stored.columns) == list(LEADERBOARD_COLUMNS)
    assert dict(zip(stored["seed"], stored["schema_version"])) == {"0": "1", "1": SCHEMA_VERSION}


def _text(row: dict) -> dict:
    return {k: str(v) for k, v in row.items()}


def test_a_file_of_a_newer_schema_is_refused_by_name():
    message = _problem_text([{**_row(), "schema_version": "4"}])
    assert "row 1, column 'schema_version'" in message and "reads schemas 1, 2, 3" in message


# --- task_score and policy_sha256 ----------------------------------------------------------------------------------

def test_task_score_is_a_rate_or_NA_and_never_empty():
    assert _row()["task_score"] == "NA"
    validate_rows([_row(task_score=0.75), _row(seed=1, task_score="NA")])
    assert "missing value" in _problem_text([{**_row(), "task_score": ""}])
    assert "outside [0, 1]" in _problem_text([{**_row(), "task_score": 1.2}])
    assert "'NA' (not applicable)" in _problem_text([{**_row(), "task_score": "n/a"}])


def test_policy_sha256_is_hex_or_unknown_and_separates_keys_entries_and_tables(tmp_path):
    assert "policy_sha256" in _problem_text([{**_row(), "policy_sha256": "ABC"}])
    rows = [_row(policy_sha256=POLICY_A), _row(policy_sha256=POLICY_B)]
    validate_rows(rows)  # same seed, other initial weights: not a duplicate
    assert entry_name(rows[0]) != entry_name(rows[1]) and entry_name(rows[0]).endswith("__pa1a1a1a1")
    root = tmp_path / "lb"
    for policy in (POLICY_A, POLICY_B):
        run = tmp_path / policy[:2]
        run.mkdir()
        write_result_csv(run / "result.csv", [_row(seed=s, policy_sha256=policy) for s in (0, 1)])
        submit(run, root)
    build(root)
    text = (root / "LEADERBOARD.md").read_text()
    assert text.count("### craft/TextWorld-v0") == 2
    assert f"initial weights sha256 `{POLICY_A[:12]}`" in text and f"initial weights sha256 `{POLICY_B[:12]}`" in text


def test_task_score_column_appears_only_for_environments_that_report_it(tmp_path):
    root = tmp_path / "lb"
    run = tmp_path / "shop"
    run.mkdir()
    write_result_csv(run / "result.csv", [_row(seed=s, env_id="craft/WebShopGen-v0", task_score=v)
                                          for s, v in ((0, 0.5), (1, 0.7))])
    submit(run, root)
    submit(_write_run(tmp_path / "tw", [0], [0.5]), root)
    build(root)
    tables = (root / "LEADERBOARD.md").read_text().split("### ")
    shop = next(t for t in tables if t.startswith("craft/WebShopGen-v0"))
    textworld = next(t for t in tables if t.startswith("craft/TextWorld-v0"))
    assert "task score" in shop and "| 0.600 ± 0.100 |" in shop
    assert "task score" not in textworld


# --- base rows -----------------------------------------------------------------------------------------------------

def test_base_is_a_method_whose_rows_are_untrained():
    validate_rows([_row(method="base", train_steps=0, method_config={"eval_temperature": 0.0})])
    message = _problem_text([_row(method="grpo"), {**_row(), "method": "base", "train_steps": 5}])
    assert "row 2, column 'train_steps'" in message and "untrained" in message


# --- one identity --------------------------------------------------------------------------------------------------

def _settings(**overrides):
    from craft_bench.agents.trainer import TrainConfig

    return asdict(TrainConfig(**overrides))


METHOD = {"alpha": 0.01, "lam": 0.01}


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"steps": 30}, {"tasks_per_step": 8}, {"group_size": 8},
                                    {"max_turns": 20}, {"history_turns": 1}, {"temperature": 0.7},
                                    {"eval_temperature": 0.5}, {"eval_episodes": 96}, {"tiny_budget": "quick"}])
def test_every_result_changing_setting_changes_the_config_id(change):
    assert config_id(run_config(_settings(**change), METHOD)) != config_id(run_config(_settings(), METHOD))


def test_two_learning_rates_are_two_entries_not_two_seeds():
    rows = [_row(method_config=run_config(_settings(lr=lr), METHOD)) for lr in (1e-4, 1e-3)]
    validate_rows(rows)  # one seed each: a duplicate key before, two entries now
    assert entry_name(rows[0]) != entry_name(rows[1])


def test_settings_that_do_not_change_results_keep_the_config_id():
    reference = config_id(run_config(_settings(), METHOD))
    for change in ({"num_workers": 7}, {"checkpoint_every": 5}, {"micro_batch_rows": 8}, {"seed": 3}):
        assert config_id(run_config(_settings(**change), METHOD)) == reference
    assert set(NEUTRAL_SETTINGS) <= set(_settings())


def test_a_new_trainer_field_is_assumed_to_change_results():
    assert run_config({**_settings(), "brand_new_knob": 1}, METHOD)["train"]["brand_new_knob"] == 1


def test_run_config_is_the_rows_method_config_and_the_id_survives_a_csv_round_trip(tmp_path):
    config = run_config(_settings(lr=3e-4), METHOD)
    assert config["eval_temperature"] == 0.0 and config["train"]["lr"] == 3e-4 and config["lam"] == 0.01
    write_result_csv(tmp_path / "result.csv", [_row(method_config=config)])
    assert config_id(read_table(tmp_path / "result.csv").loc[0, "method_config"]) == config_id(config)


def test_base_run_config_leaves_out_training_only_settings():
    base = run_config(_settings(method="base"), {})
    assert "lr" not in base["train"] and "max_turns" in base["train"]
    assert config_id(run_config(_settings(method="base", lr=1e-3), {})) == config_id(base)
    with pytest.raises(ValueError, match="train"):
        run_config(_settings(), {"train": 1})


def test_weights_hash_follows_values_dtype_and_names_not_order():
    import torch

    weights = {"b": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a": torch.ones(2)}
    digest = weights_sha256(weights)
    assert digest == weights_sha256(dict(reversed(list(weights.items()))))
    assert len(digest) == 64
    changed = {**weights, "a": torch.tensor([1.0, 1.0 + 2**-20])}
    assert weights_sha256(changed) != digest
    assert weights_sha256({**weights, "a": weights["a"].to(torch.bfloat16)}) != digest
    assert weights_sha256({"c" if k == "a" else k: v for k, v in weights.items()}) != digest


# --- against GRPO: paired t interval -------------------------------------------------------------------------------

@pytest.mark.parametrize(("df", "expected"), [(1, 12.7062047), (2, 4.3026527), (4, 2.7764451), (10, 2.2281389),
                                              (30, 2.0422725), (1000, 1.9623391)])
def test_t_quantile_matches_the_printed_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-6)


def test_t_quantile_matches_scipy_where_available():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 5, 7, 19, 60):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995, 0.05):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-8)


def test_paired_difference_on_a_hand_computed_case():
    # d = (0.5-0.4, 0.7-0.5, 0.6-0.6) = (0.1, 0.2, 0.0); mean 0.1; sd = sqrt((0 + 0.01 + 0.01) / 2) = 0.1;
    # SE = 0.1 / sqrt(3) = 0.0577350; t(0.975, 2) = 4.3026527; half width = 0.2484138.
    mean, low, high, n = paired_difference({0: 0.5, 1: 0.7, 2: 0.6}, {0: 0.4, 1: 0.5, 2: 0.6, 3: 0.9})
    assert n == 3 and mean == pytest.approx(0.1)
    assert (low, high) == pytest.approx((0.1 - 0.2484138, 0.1 + 0.2484138), abs=1e-7)
    # A greedy untrained model is one number: 0.2 against each GRPO seed, d = (-0.2, -0.3, -0.4), same spread.
    mean, low, high, n = paired_difference({0: 0.2}, {0: 0.4, 1: 0.5, 2: 0.6}, constant=True)
    assert (mean, n) == (pytest.approx(-0.3), 3) and (low, high) == pytest.approx((-0.5484138, -0.0515862), abs=1e-7)
    assert paired_difference({0: 0.5}, {0: 0.25})[1:] == (None, None, 1)
    with pytest.raises(ValueError, match="no seed"):
        paired_difference({0: 0.5}, {1: 0.5})
    assert not math.isnan(paired_difference({0: 0.5, 1: 0.5}, {0: 0.5, 1: 0.5})[1])


def test_leaderboard_shows_each_method_against_grpo_with_the_interval(tmp_path):
    root = tmp_path / "lb"
    submit(_write_run(tmp_path / "grpo", [0, 1, 2], [0.4, 0.5, 0.6]), root)
    submit(_write_run(tmp_path / "craft", [0, 1, 2], [0.5, 0.7, 0.6], method="craft"), root)
    base = tmp_path / "base"
    base.mkdir()
    write_result_csv(base / "result.csv", [_row(method="base", train_steps=0, success_rate=0.2,
                                                 method_config={"eval_temperature": 0.0})])
    submit(base, root)
    build(root)
    lines = (root / "LEADERBOARD.md").read_text().splitlines()
    line_of = {m: next(line for line in lines if line.startswith(f"| {m} ")) for m in ("grpo", "craft", "base")}
    assert line_of["craft"].endswith("| +0.100 [-0.148, +0.348] (n=3) |")
    assert line_of["base"].endswith("| -0.300 [-0.548, -0.052] (n=3) |")
    assert line_of["grpo"].endswith("| reference |")
    assert "Student-t interval" in "\n".join(lines)


def test_without_a_single_grpo_entry_there_is_no_comparison():
    entry = {"method": "craft", "method_config": '{"eval_temperature":0}', "by_seed": {0: 0.5}, "temperature": 0}
    assert versus_grpo(entry, [entry]).startswith("—")


def test_committed_leaderboard_builds_to_the_committed_page(tmp_path):
    # The page a reader sees is what the shipped builder makes of the shipped submissions: a change to either
    # without `python -m craft_bench.leaderboard build` fails here.
    root = tmp_path / "lb"
    shutil.copytree(REPO / "leaderboard", root)
    (root / "LEADERBOARD.md").unlink()
    build(root)
    built = (root / "LEADERBOARD.md").read_text()
    assert "success vs grpo" in built
    assert built == (REPO / "leaderboard" / "LEADERBOARD.md").read_text()
