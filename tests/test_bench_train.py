"""Smoke test of `python -m craft_bench.bench train`: with a tiny model and a fake env it prints the phase table
(every phase, its seconds and tokens/s against the plain limits) and says what happened to the TRL comparison."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from fake_envs import COUNTER_ENV_ID

from craft_bench.bench.__main__ import main as bench_main

MODEL = Path(__file__).parent / "data" / "h1_tiny_test_model"
SMALL = ["--model", str(MODEL), "--env", COUNTER_ENV_ID, "--tasks", "2", "--group-size", "2", "--max-turns", "2",
         "--max-new-tokens", "4", "--workers", "0"]


def test_bench_train_prints_every_phase_against_the_plain_limits(capsys):
    threads = torch.get_num_threads()
    try:
        bench_main(["train", *SMALL, "--no-trl"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for phase in ("generation", "env", "scoring (θ_old + teacher + ref)", "update", "whole step",
                  "limit: plain forward", "limit: plain forward + backward"):
        assert phase in rows, out
    for phase in ("generation", "scoring (θ_old + teacher + ref)", "update"):
        cells = [c.strip() for c in rows[phase].split("|")[1:-1]]
        assert float(cells[1]) > 0 and int(cells[3]) > 0 and "% of fwd" in cells[5], rows[phase]
    assert "TRL comparison: skipped (--no-trl)" in out


def test_against_runs_get_the_extra_options_and_find_a_model_given_by_relative_path(capsys, monkeypatch):
    # The --against runs start in a temporary directory, so a relative model path is handed on resolved, and
    # --against-args reaches every one of them.
    from craft_bench.bench import train as bench_train

    seen: dict[str, list[str]] = {}

    def fake_time_revision(revision: str, common: list[str]) -> dict[str, float]:
        seen[revision] = common
        return {"generation": 1.0, "env": 1.0, "scoring": 1.0, "update": 1.0, "whole step": 4.0}

    monkeypatch.setattr(bench_train, "time_revision", fake_time_revision)
    monkeypatch.chdir(MODEL.parent)
    threads = torch.get_num_threads()
    try:
        bench_main(["train", *SMALL, "--model", MODEL.name, "--no-trl", "--against", "abc123",
                    "--against-args", "--train-dtype bfloat16 --attn eager"])
    finally:
        torch.set_num_threads(threads)
    common = seen["abc123"]
    assert common[common.index("--model") + 1] == str(MODEL.resolve())
    assert common[-4:] == ["--train-dtype", "bfloat16", "--attn", "eager"]
    assert "abc123" in capsys.readouterr().out


def test_the_trl_comparison_prints_its_ratio_without_trls_deprecation_warnings(capsys, recwarn):
    pytest.importorskip("trl")
    threads = torch.get_num_threads()
    try:
        bench_main(["train", *SMALL, "--repeat", "2", "--reset-ahead"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "throughput ratio craft-bench / TRL:" in out, out
    updates = next(line for line in out.splitlines() if line.startswith("craft-bench update per timed step, s: "))
    assert len(updates.split(": ", 1)[1].split(" (")[0].split(", ")) == 2, updates
    assert "median of 2 timed step(s)" in out, out
    assert not [w for w in recwarn if "gradient_checkpointing" in str(w.message)], [str(w.message) for w in recwarn]


def test_the_single_turn_side_reports_the_median_of_its_timed_steps(tmp_path):
    # Three timed steps after the warm-up: the reported step time is the median of metrics rows 1-3, never the
    # warm-up's (row 0).
    from craft_bench.agents.trainer import TrainConfig
    from craft_bench.bench import train as bench_train

    config = TrainConfig(method="grpo", env_id=COUNTER_ENV_ID, model=str(MODEL), tasks_per_step=2, group_size=2,
                         max_turns=2, max_new_tokens=4, num_workers=0, eval_episodes=1, checkpoint_every=1000)
    threads = torch.get_num_threads()
    try:
        result = bench_train.craft_single_turn(config, tmp_path / "single", repeat=3)
    finally:
        torch.set_num_threads(threads)
    steps = pd.read_csv(tmp_path / "single" / "metrics.csv")["time/step_s"]
    assert len(steps) == 4
    assert result["step_s"] == float(steps.iloc[1:].median())
    updates = pd.read_csv(tmp_path / "single" / "metrics.csv")["time/update_s"]
    assert result["update_s"] == [float(s) for s in updates.iloc[1:]]


def test_repeat_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_main(["train", *SMALL, "--repeat", "0"])
    assert "--repeat must be at least 1, got 0" in capsys.readouterr().err
