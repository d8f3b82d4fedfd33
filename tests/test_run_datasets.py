"""Tests of per-dataset results (issue 11) and task scores (issue 12) in the harness: eval.csv gets a `dataset` and a
`task_score` column from the episodes' info, the result row its `per_dataset` success and `task_score`, and the
leaderboard a per-dataset table with the macro average over datasets."""

from __future__ import annotations

import json
from typing import Any

import gymnasium as gym
import pandas as pd
import pytest
from craft_bench.agents.trainer import EVAL_FILE
from fake_envs import CounterEnv
from test_leaderboard import _row
from test_run_cli import small_args

from craft_bench.leaderboard import (
    LeaderboardValidationError,
    validate_rows,
    write_result_csv,
)
from craft_bench.leaderboard.build import build, summarise
from craft_bench.leaderboard.schema import (
    NOT_APPLICABLE,
    macro_average,
    per_dataset_success,
    read_table,
)
from craft_bench.leaderboard.store import load_submissions, submit
from craft_bench.run import RESULT_FILE, build_configs, parse_args, run_name
from craft_bench.run import main as run_main

DATASET_ENV_ID = "craft_test/DatasetCounter-v0"


class DatasetCounterEnv(CounterEnv):
    """The counter, with a dataset per task (its target's parity) and a graded score (the progress), as Search-QA
    and WebShop report them in `info`."""

    def _extra_info(self) -> dict[str, Any]:
        return {"dataset": "even" if self._target % 2 == 0 else "odd", "task_score": self._progress}


if DATASET_ENV_ID not in gym.registry:
    gym.register(id=DATASET_ENV_ID, entry_point=f"{__name__}:DatasetCounterEnv")


# ---------------------------------------------------------------------------------------------------- pure parts
def test_per_dataset_success_and_its_macro_average_on_a_hand_computed_case():
    records = [{"dataset": "nq", "won": True}, {"dataset": "nq", "won": False}, {"dataset": "nq", "won": False},
               {"dataset": "hotpotqa", "won": 1}]
    per_dataset = per_dataset_success(records)
    assert per_dataset == {"hotpotqa": {"success_rate": 1.0, "n": 1}, "nq": {"success_rate": 1 / 3, "n": 3}}
    # Each dataset weighs the same: (1 + 1/3) / 2, not the pooled 2/4.
    assert macro_average(per_dataset) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="record 2: needs 'dataset'"):
        per_dataset_success([{"dataset": "nq", "won": True}, {"won": True}])


def test_per_dataset_cells_are_NA_or_a_nonempty_object_of_rates_and_counts():
    validate_rows([_row(per_dataset={"nq": {"success_rate": 0.5, "n": 4}}), _row(seed=1)])
    assert _row()["per_dataset"] == NOT_APPLICABLE
    for bad, message in [({}, "empty object"), ({"nq": 0.5}, "expected"), ({"nq": {"success_rate": 2, "n": 4}},
                                                                            "needs a success rate"),
                         ({"nq": {"success_rate": 0.5, "n": 0}}, "n >= 1")]:
        with pytest.raises(LeaderboardValidationError, match=message):
            validate_rows([{**_row(), "per_dataset": json.dumps(bad)}])


def test_the_leaderboard_reports_success_per_dataset_and_the_macro_average(tmp_path):
    root = tmp_path / "lb"
    seeds = {0: {"nq": 0.5, "hotpotqa": 0.1}, 1: {"nq": 0.3, "hotpotqa": 0.3}}
    for seed, rates in seeds.items():
        run = tmp_path / f"run{seed}"
        run.mkdir()
        per_dataset = {name: {"success_rate": rate, "n": 10} for name, rate in rates.items()}
        write_result_csv(run / RESULT_FILE, [_row(seed=seed, success_rate=0.3, per_dataset=per_dataset)])
        submit(run, root)
    (record,) = summarise(load_submissions(root))
    # Macro averages per seed: (0.5 + 0.1) / 2 = 0.3 and (0.3 + 0.3) / 2 = 0.3: mean 0.3, SE 0.
    assert record["macro_average"] == pytest.approx(0.3) and record["macro_average_se"] == pytest.approx(0.0)
    # nq: 0.5 and 0.3 -> mean 0.4, SE = sd / sqrt(2) = 0.1414 / 1.4142 = 0.1.
    assert record["datasets"]["nq"] == pytest.approx((0.4, 0.1))
    build(root)
    text = (root / "LEADERBOARD.md").read_text()
    assert "success, macro avg over datasets" in text
    line = next(line for line in text.splitlines() if line.startswith("| grpo ") and "0.400 ± 0.100" in line)
    assert line.endswith("| 0.200 ± 0.100 | 0.400 ± 0.100 | 0.300 ± 0.000 |")  # hotpotqa, nq, macro


# ---------------------------------------------------------------------------------------------------- end to end
def test_a_run_writes_dataset_and_task_score_per_episode_and_per_dataset_success(model_dir, tmp_path):
    argv = small_args(model_dir, tmp_path, "--method", "base", "--env", DATASET_ENV_ID, "--num-workers", "0",
                      "--set", "eval_episodes=4")
    assert run_main(argv) == 0
    (config,) = build_configs(parse_args(argv))
    run_dir = tmp_path / run_name(config)
    episodes = pd.read_csv(run_dir / EVAL_FILE)
    assert len(episodes) == 4 and {"dataset", "task_score"} <= set(episodes.columns)
    row = read_table(run_dir / RESULT_FILE).iloc[0]
    expected = {name: {"success_rate": float(group["won"].mean()), "n": len(group)}
                for name, group in episodes.groupby("dataset")}
    assert json.loads(row["per_dataset"]) == expected and set(expected) == {"even", "odd"}
    assert float(row["task_score"]) == pytest.approx(episodes["task_score"].mean())
