"""Tests of the untrained `base` entry on the built leaderboard: it stands in its table beside the trained methods,
and "success vs grpo" compares it with the GRPO entry evaluated under its own protocol: its one greedy number against
each GRPO seed, or seed by seed when evaluation samples."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from test_leaderboard import _row

from craft_bench.agents.trainer import TrainConfig
from craft_bench.leaderboard import write_result_csv
from craft_bench.leaderboard.build import build
from craft_bench.leaderboard.identity import run_config
from craft_bench.leaderboard.store import submit


def _config(method: str, **settings) -> dict:
    values = {**asdict(TrainConfig(**settings)), "method": method}
    return run_config(values, {} if method == "base" else {"alpha": 0.01})


def _submit(tmp_path, root, name: str, rows: list[dict]) -> None:
    run = tmp_path / name
    run.mkdir()
    write_result_csv(run / "result.csv", rows)
    submit(run, root)


def _lines(root) -> dict[str, str]:
    build(root)
    return {line.split(" | ")[1].strip("` "): line for line in (root / "LEADERBOARD.md").read_text().splitlines()
            if line.startswith("| ") and " | `" in line and "success" not in line and "method_config" not in line}


def test_base_is_compared_with_the_grpo_entry_of_its_evaluation_protocol(tmp_path):
    root = tmp_path / "lb"
    rates = {0: 0.4, 1: 0.5, 2: 0.6}
    # Two GRPO entries in one table: one evaluated on 48 episodes (the base's protocol), one on 96.
    for episodes, shift in ((48, 0.0), (96, 0.2)):
        _submit(tmp_path, root, f"grpo{episodes}", [
            _row(seed=s, success_rate=r + shift, method_config=_config("grpo", eval_episodes=episodes))
            for s, r in rates.items()])
    # The base row records no training settings: lr and steps of the GRPO runs do not matter.
    _submit(tmp_path, root, "base", [_row(method="base", train_steps=0, seed=s, success_rate=0.2,
                                          method_config=_config("base", eval_episodes=48)) for s in (0, 1, 2)])
    lines = _lines(root)
    base_line = next(line for line in lines.values() if line.startswith("| base "))
    grpo48 = next(key for key, line in lines.items() if line.startswith("| grpo ") and "| 0.500 ± " in line)
    # 0.2 - (0.4, 0.5, 0.6) = (-0.2, -0.3, -0.4): -0.300 ± t(0.975, 2) · 0.1 / sqrt(3) = ± 0.248. The table holds two
    # GRPO entries, so the cell names the one it is taken against.
    assert base_line.endswith(f"| -0.300 [-0.548, -0.052] (n=3) vs `{grpo48}` |")


@pytest.mark.parametrize("later", [{"train_env_kwargs": {"n_games": 256}}, {"train_dtype": "bfloat16"}])
def test_a_training_only_setting_added_later_does_not_hide_the_grpo_entry_from_base(later, tmp_path):
    # train_env_kwargs (RL's own task pool) and train_dtype (evaluation runs in float32 regardless) are recorded by
    # GRPO and never by base: the protocols still match.
    root = tmp_path / "lb"
    _submit(tmp_path, root, "grpo", [_row(seed=s, success_rate=0.5, method_config=_config("grpo", **later))
                                     for s in (0, 1)])
    _submit(tmp_path, root, "base", [_row(method="base", train_steps=0, seed=s, success_rate=0.2,
                                          method_config=_config("base")) for s in (0, 1)])
    base_line = next(line for line in _lines(root).values() if line.startswith("| base "))
    assert "| -0.300 " in base_line and "(n=2)" in base_line


def test_without_a_grpo_entry_of_its_protocol_base_says_so(tmp_path):
    root = tmp_path / "lb"
    _submit(tmp_path, root, "grpo", [_row(seed=0, method_config=_config("grpo", max_new_tokens=99))])
    _submit(tmp_path, root, "base", [_row(method="base", train_steps=0, method_config=_config("base"))])
    base_line = next(line for line in _lines(root).values() if line.startswith("| base "))
    assert base_line.endswith("| — (no grpo entry with its evaluation settings) |")


def test_base_is_compared_with_every_grpo_configuration_of_its_protocol(tmp_path):
    root = tmp_path / "lb"
    # Two GRPO configurations (a preset and a sweep point) evaluated like the base: both are measured against it.
    for lr, rates in ((1e-3, {0: 0.1, 1: 0.2, 2: 0.3}), (1e-4, {0: 0.5, 1: 0.5, 2: 0.8})):
        _submit(tmp_path, root, f"grpo{lr}", [_row(seed=s, success_rate=r, method_config=_config("grpo", lr=lr))
                                              for s, r in rates.items()])
    _submit(tmp_path, root, "base", [_row(method="base", train_steps=0, seed=s, success_rate=0.4,
                                          method_config=_config("base")) for s in (0, 1, 2)])
    lines = _lines(root)
    base_line = next(line for line in lines.values() if line.startswith("| base "))
    ids = {lr: next(key for key, line in lines.items() if line.startswith("| grpo ") and f"{rate}" in line)
           for lr, rate in ((1e-3, "0.200"), (1e-4, "0.600"))}
    # 0.4 - (0.1, 0.2, 0.3) = (0.3, 0.2, 0.1): +0.200 ± t(0.975, 2) · 0.1 / sqrt(3) = ± 0.248.
    # 0.4 - (0.5, 0.5, 0.8) = (-0.1, -0.1, -0.4): -0.200 ± 4.303 · 0.1732 / sqrt(3) = ± 0.430.
    cell = base_line.rsplit(" | ", 1)[1]
    assert f"+0.200 [-0.048, +0.448] (n=3) vs `{ids[1e-3]}`" in cell
    assert f"-0.200 [-0.630, +0.230] (n=3) vs `{ids[1e-4]}`" in cell


def test_a_sampled_base_is_paired_with_grpo_seed_by_seed(tmp_path):
    root = tmp_path / "lb"
    grpo = {0: 0.4, 1: 0.5, 2: 0.6}
    base = {0: 0.3, 1: 0.3, 2: 0.6}  # differences -0.1, -0.2, 0.0: mean -0.1, sd 0.1, as in the paired test
    _submit(tmp_path, root, "grpo", [_row(seed=s, success_rate=r, method_config=_config("grpo", eval_temperature=0.5))
                                     for s, r in grpo.items()])
    _submit(tmp_path, root, "base", [_row(method="base", train_steps=0, seed=s, success_rate=r,
                                          method_config=_config("base", eval_temperature=0.5)) for s, r in base.items()])
    base_line = next(line for line in _lines(root).values() if line.startswith("| base "))
    assert base_line.endswith("| -0.100 [-0.348, +0.148] (n=3) |")


def test_one_base_row_stands_in_the_table_of_every_trained_configuration(tmp_path):
    root = tmp_path / "lb"
    for lr in (1e-4, 1e-3):
        _submit(tmp_path, root, f"grpo{lr}", [_row(seed=0, method_config=_config("grpo", lr=lr))])
    _submit(tmp_path, root, "base", [_row(method="base", train_steps=0, method_config=_config("base"))])
    build(root)
    (table,) = [t for t in (root / "LEADERBOARD.md").read_text().split("### ") if t.startswith("craft/")]
    rows = [line for line in table.splitlines() if line.startswith(("| base ", "| grpo "))]
    assert len(rows) == 3 and sum(line.startswith("| base ") for line in rows) == 1
