"""Tests of `--method base` (the untrained model, SDAR's "Vanilla") and of the one identity: a base run evaluates and
writes eval.csv/result.csv with train_steps 0 and no training outputs, its id ignores training-only settings, resume
and eval-only of a finished base run change nothing, and a run directory's id is its leaderboard entry's id."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
from test_run_cli import refused, small_args

from craft_bench.agents.trainer import CHECKPOINT_FILE, CONFIG_FILE, EVAL_FILE, FINAL_MODEL_DIR, METRICS_FILE
from craft_bench.leaderboard.identity import config_id, run_config
from craft_bench.leaderboard.schema import read_table
from craft_bench.leaderboard.store import entry_name
from craft_bench.run import EVAL_ONLY_FILE, RESULT_FILE, build_configs, parse_args, run_id, run_name
from craft_bench.run import main as run_main


def _configs(*argv: str):
    return build_configs(parse_args(list(argv)))


def _base_name(*extra: str) -> str:
    (config,) = _configs("--method", "base", *extra)
    return run_name(config)


# ---------------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("extra", [("--steps", "7"), ("--set", "lr=0.003"), ("--set", "group_size=8"),
                                   ("--set", "tasks_per_step=2"), ("--set", "temperature=0.7"),
                                   ("--set", "ppo_epochs=2")])
def test_the_base_run_ignores_training_only_settings(extra):
    assert _base_name(*extra) == _base_name()


@pytest.mark.parametrize("extra", [("--set", "max_new_tokens=9"), ("--set", "eval_episodes=5"),
                                   ("--set", "eval_temperature=0.5"), ("--set", "max_turns=4"),
                                   ("--set", "history_turns=1"), ("--set", "tiny_budget=\"test\""),
                                   ("--set", "env_kwargs={\"topk\": 5}"), ("--set", "progress_reward=5"),
                                   ("--env", "craft/TextWorld-v0"),
                                   ("--seeds", "1")])
def test_the_base_run_depends_on_every_setting_that_changes_evaluation(extra):
    assert _base_name(*extra) != _base_name()


def test_base_takes_the_presets_evaluation_protocol_but_no_options():
    (base,) = _configs("--method", "base", "--preset", "paper")
    assert base.method_options == {} and base.eval_episodes == 128 and base.max_new_tokens == 512
    assert "has no options" in refused(["--method", "base", "--option", "lam=0.5"])
    base, craft = _configs("--method", "base,craft", "--option", "lam=0.5")  # the option is craft's
    assert base.method_options == {} and craft.method_options["lam"] == 0.5
    assert run_name(base) == _base_name()


def test_base_and_trained_methods_share_one_command_and_seeds_multiply():
    configs = _configs("--method", "base,grpo", "--seeds", "0,1")
    assert [(c.method, c.seed) for c in configs] == [("base", 0), ("grpo", 0), ("base", 1), ("grpo", 1)]
    assert "unknown method(s) ['bass']" in refused(["--method", "bass"])


# ---------------------------------------------------------------------------------------------------- end to end
def _row(run_dir: Path, name: str = RESULT_FILE) -> pd.Series:
    return read_table(run_dir / name).iloc[0]


@pytest.fixture(scope="module")
def base_and_grpo(model_dir, tmp_path_factory):
    """One command: base and grpo (1 step), seeds 0 and 1, on the counter env with a random tiny Llama."""
    out = tmp_path_factory.mktemp("runs")
    argv = small_args(model_dir, out, "--method", "base,grpo", "--steps", "1", "--seeds", "0,1")
    assert run_main(argv) == 0
    return argv, out, {(c.method, c.seed): out / run_name(c) for c in build_configs(parse_args(argv))}


def test_a_base_run_evaluates_the_untrained_model_and_writes_no_training_outputs(base_and_grpo):
    argv, _, dirs = base_and_grpo
    base_dir = dirs["base", 0]
    names = {p.name for p in base_dir.iterdir()}
    assert {CONFIG_FILE, EVAL_FILE, RESULT_FILE} <= names
    assert not names & {CHECKPOINT_FILE, METRICS_FILE, FINAL_MODEL_DIR}
    row, grpo = _row(base_dir), _row(dirs["grpo", 0])
    assert (row["method"], row["train_steps"], row["teacher_context"]) == ("base", "0", "none")
    (config,) = [c for c in build_configs(parse_args(argv)) if (c.method, c.seed) == ("base", 0)]
    assert json.loads(row["method_config"]) == run_config(asdict(config), {})
    # The same initial weights as the trained run's row, evaluated on the same episode list.
    assert len(row["policy_sha256"]) == 64 and row["policy_sha256"] == grpo["policy_sha256"]
    assert row["n_eval_episodes"] == grpo["n_eval_episodes"] == "2"
    base_tasks = pd.read_csv(base_dir / EVAL_FILE)["task_id"].tolist()
    assert base_tasks == pd.read_csv(dirs["grpo", 0] / EVAL_FILE)["task_id"].tolist()
    # Greedy evaluation: every seed of base scores the same.
    assert _row(dirs["base", 1])["success_rate"] == row["success_rate"]


def test_base_is_measured_exactly_as_an_eval_only_of_the_initial_model(base_and_grpo, model_dir, tmp_path):
    """The base row comes from the trainer's own evaluation: the same episodes as evaluating the initial weights of
    any trained run's configuration."""
    argv = small_args(model_dir, tmp_path, "--method", "grpo", "--steps", "3", "--eval-only")
    assert run_main(argv) == 0
    (config,) = build_configs(parse_args(argv))
    initial = pd.read_csv(tmp_path / run_name(config) / EVAL_ONLY_FILE)
    base = pd.read_csv(base_and_grpo[2]["base", 0] / EVAL_FILE)
    pd.testing.assert_frame_equal(base, initial)


def test_resume_and_eval_only_of_a_finished_base_run_change_nothing(base_and_grpo, capsys):
    argv, _, dirs = base_and_grpo
    base_dir = dirs["base", 0]
    before = {p.name: p.read_bytes() for p in base_dir.iterdir() if p.is_file() and p.name != ".lock"}
    only_base = [*argv[: argv.index("--method")], "--method", "base", "--seeds", "0"]
    capsys.readouterr()
    for flag in ("--resume", "--eval-only"):
        assert run_main([*only_base, flag]) == 0
        assert "already evaluated" in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in base_dir.iterdir() if p.is_file() and p.name != ".lock"} == before
    assert "already holds a run" in refused(only_base)


def test_the_run_directory_id_is_the_leaderboard_entry_id(base_and_grpo):
    """One identity: run directory name, config.json's run_id and the leaderboard's config id of the result row are
    one string, for base and for trained runs."""
    argv, _, dirs = base_and_grpo
    for config in build_configs(parse_args(argv)):
        run_dir = dirs[config.method, config.seed]
        row = _row(run_dir)
        recorded = json.loads((run_dir / CONFIG_FILE).read_text())["run_id"]
        assert run_dir.name.split("__")[3] == recorded == config_id(row["method_config"]) == run_id(config)
        assert config_id(row["method_config"]) in entry_name(row)


def test_resume_of_a_base_run_refuses_a_model_whose_weights_changed(model_dir, tmp_path):
    import shutil

    from test_engine import random_llama
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    argv = small_args(model, tmp_path / "runs", "--method", "base")
    assert run_main(argv) == 0
    # The same name, other weights: a rebuilt model.
    random_llama(len(AutoTokenizer.from_pretrained(model)), seed=1).save_pretrained(model)
    message = refused([*argv, "--resume"])
    assert "was measured on initial weights" in message and "--overwrite" in message
    assert run_main([*argv, "--overwrite", "--privileged-eval"]) == 0
    assert (tmp_path / "runs" / run_name(build_configs(parse_args(argv))[0]) / "eval_privileged.csv").is_file()
    assert run_main([*argv, "--resume"]) == 0
    # Other weights again: --overwrite must not leave the old weights' privileged evaluation beside the new row.
    random_llama(len(AutoTokenizer.from_pretrained(model)), seed=2).save_pretrained(model)
    assert run_main([*argv, "--overwrite"]) == 0
    assert not (tmp_path / "runs" / run_name(build_configs(parse_args(argv))[0]) / "eval_privileged.csv").exists()


def test_privileged_eval_plays_the_base_episodes_on_the_teacher_prompt_once(base_and_grpo, monkeypatch, capsys):
    """--privileged-eval on a finished base run adds eval_privileged.csv (the same episodes, acted on the teacher
    prompt) and leaves the base row as it was; a second call has nothing to do."""
    from craft_bench.agents.trainer import Trainer
    from craft_bench.run import PRIVILEGED_EVAL_FILE

    argv, _, dirs = base_and_grpo
    base_dir = dirs["base", 1]
    result_before = (base_dir / RESULT_FILE).read_bytes()
    calls = []
    original = Trainer.evaluate

    def spy(self, act_on="student"):
        calls.append(act_on)
        return original(self, act_on=act_on)

    monkeypatch.setattr(Trainer, "evaluate", spy)
    only_base = [*argv[: argv.index("--method")], "--method", "base", "--seeds", "1", "--privileged-eval"]
    capsys.readouterr()
    assert run_main([*only_base, "--resume"]) == 0
    assert calls == ["teacher"]
    assert "on the teacher prompt (privileged block shown)" in capsys.readouterr().err
    privileged = pd.read_csv(base_dir / PRIVILEGED_EVAL_FILE)
    assert privileged["task_id"].tolist() == pd.read_csv(base_dir / EVAL_FILE)["task_id"].tolist()
    assert (base_dir / RESULT_FILE).read_bytes() == result_before
    assert run_main([*only_base, "--resume"]) == 0
    assert calls == ["teacher"] and "already evaluated" in capsys.readouterr().err


def test_privileged_eval_needs_the_base_method():
    assert "--privileged-eval evaluates the untrained model" in refused(["--method", "grpo", "--privileged-eval"])
