"""Tests of `python -m craft_bench.run` as a careless or hostile user drives it: bad settings are refused by name
before anything is created, one process per run directory, --set values name the run, --eval-only never touches
the training outputs, a forged checkpoint never runs, and a failed start leaves nothing behind."""

from __future__ import annotations

import functools
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch
from fake_envs import COUNTER_ENV_ID

from craft_bench.agents import precision
from craft_bench.agents.checkpoint import digest_path, file_sha256
from craft_bench.agents.methods import METHOD_NAMES
from craft_bench.agents.tiny.budget import BUDGETS, ENV_DEFAULT_BUDGETS
from craft_bench.agents.trainer import CHECKPOINT_FILE, CONFIG_FILE, FINAL_MODEL_DIR, METRICS_FILE
from craft_bench.leaderboard.schema import config_id
from craft_bench.leaderboard.store import load_submissions
from craft_bench.run import (
    EVAL_ONLY_FILE,
    EVAL_ONLY_RESULT_FILE,
    RESULT_FILE,
    build_configs,
    parse_args,
    run_id,
    run_name,
)
from craft_bench.run import main as run_main


def small_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--env", COUNTER_ENV_ID, "--model", str(model_dir), "--out", str(out), "--no-progress", "--num-workers", "1",
        "--set", "tasks_per_step=2", "--set", "group_size=2", "--set", "max_turns=3", "--set", "max_new_tokens=4",
        "--set", "eval_split=\"train\"", "--set", "eval_episodes=2", "--set", "micro_batch_rows=4", *extra,
    ]


def refused(argv: list[str], capsys=None) -> str:
    """The one-line error of a refused command line."""
    with pytest.raises(SystemExit) as info:
        run_main(argv)
    message = str(info.value.code)
    assert message.startswith("error: ") and "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("setting, expected", [
    ("temperature=-1", r"temperature=-1: must be >= 0"),
    ("top_p=5", r"top_p=5: must be in \(0, 1\]"),
    ("eval_temperature=-3", r"eval_temperature=-3: must be >= 0"),
    ("history_turns=-2", r"history_turns=-2: must be >= 0"),
    ("lr=abc", r"lr='abc': must be a number"),
    ("steps=2.5", r"steps=2.5: must be an integer"),
    ("num_workers=-1", r"num_workers=-1: must be >= 0"),
    ("histroy_turns=2", r"unknown field 'histroy_turns' \(did you mean history_turns"),
])
def test_bad_settings_are_refused_by_name_before_anything_is_created(setting, expected, tmp_path):
    out = tmp_path / "runs"
    message = refused(["--method", "craft", "--out", str(out), "--set", setting])
    assert pd.Series([message]).str.contains(expected).item(), message
    assert not out.exists()


@pytest.mark.parametrize("setting, flag", [("seed=3", "--seeds"), ("method=\"grpo\"", "--method")])
def test_set_of_a_flag_field_points_to_the_flag(setting, flag, tmp_path):
    message = refused(["--method", "craft", "--out", str(tmp_path / "runs"), "--set", setting])
    assert f"use {flag}" in message
    assert not (tmp_path / "runs").exists()


def test_negative_seed_is_refused(tmp_path):
    assert "seed=-1: must be >= 0" in refused(["--method", "craft", "--seeds", "0,-1", "--out", str(tmp_path / "r")])


def test_unknown_env_lists_the_valid_ids_in_one_line(tmp_path):
    message = refused(["--method", "craft", "--env", "craft/Nope-v0", "--out", str(tmp_path / "runs")])
    assert "unknown environment 'craft/Nope-v0'" in message and "craft/ALFWorldGen-v0" in message
    assert not (tmp_path / "runs").exists()


def test_missing_model_path_says_it_does_not_exist(tmp_path):
    message = refused(["--method", "craft", "--model", "/nonexistent/path", "--out", str(tmp_path / "runs")])
    assert "--model /nonexistent/path: no such file or directory" in message
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_cuda_device_without_cuda_is_one_clear_line(tmp_path):
    message = refused(["--method", "craft", "--device", "cuda", "--out", str(tmp_path / "runs")])
    assert "--device cuda" in message and ("no CUDA support" in message or "no CUDA device" in message)
    assert not (tmp_path / "runs").exists()


def test_nonsense_device_logger_and_option_are_refused_before_starting(tmp_path):
    out = str(tmp_path / "runs")
    assert "not a torch device" in refused(["--method", "craft", "--device", "gpu7", "--out", out])
    assert "unknown logger 'nonsense'" in refused(["--method", "craft", "--log", "nonsense", "--out", out])
    assert "unknown option(s) ['bogus']" in refused(["--method", "craft", "--option", "bogus=1", "--out", out])
    assert "cannot be combined" in refused(["--method", "craft", "--eval-only", "--resume", "--out", out])
    assert not (tmp_path / "runs").exists()


def test_a_model_that_fails_to_load_leaves_no_run_directory(tmp_path):
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    out = tmp_path / "runs"
    message = refused(small_args(not_a_model, out, "--method", "grpo", "--steps", "1"))
    assert "could not start the run with --model" in message
    assert not out.exists()  # the corrected rerun is not blocked by a half-made directory


# ---------------------------------------------------------------------------------------------------- run identity
def _name(*extra: str) -> str:
    (config,) = build_configs(parse_args(["--method", "craft", *extra]))
    return run_name(config)


@pytest.mark.parametrize("setting", ["lr=0.0003", "temperature=0.7", "group_size=8", "history_turns=3", "eval_temperature=0.5"])
def test_every_set_value_that_changes_results_changes_the_run_directory(setting):
    assert _name("--set", setting) != _name()


def test_method_options_change_the_run_directory_and_worker_count_does_not():
    assert _name("--option", "lam=0.02") != _name()
    assert _name("--num-workers", "3") == _name("--num-workers", "1")
    assert _name("--seeds", "1").replace("__s1", "__s0") == _name()


def test_presets_carry_each_environments_own_turn_cap_and_reply_length():
    def config(*extra: str):
        (only,) = build_configs(parse_args(["--method", "grpo", *extra]))
        return only

    alfworld, search, shop = (config("--env", env) for env in
                              ("craft/ALFWorldGen-v0", "craft/SearchQAGen-v0", "craft/WebShopGen-v0"))
    assert (alfworld.max_turns, alfworld.max_new_tokens, alfworld.history_turns) == (15, 24, 2)
    assert (search.max_turns, search.max_new_tokens, search.history_turns) == (4, 24, 1)  # SDAR's Search episode
    assert (shop.max_turns, shop.max_new_tokens, shop.history_turns) == (15, 64, 1)  # a search repeats the goal
    for env, budget in ENV_DEFAULT_BUDGETS.items():  # runs show the tiny model the history it was trained on
        assert config("--env", env).history_turns == BUDGETS[budget].history_turns
    assert (alfworld.eval_split, search.eval_split, shop.eval_split) == ("valid", "valid", "test")
    assert config("--env", "craft/WebShopGen-v0", "--preset", "paper").eval_split == "test"
    assert config("--env", "craft/SearchQAGen-v0", "--preset", "paper").max_turns == 4
    assert config("--env", "craft/SearchQAGen-v0", "--set", "max_turns=6").max_turns == 6  # --set still wins


ALL_METHODS = ("base", *METHOD_NAMES)
LEADERBOARD = Path(__file__).resolve().parents[1] / "leaderboard"


@functools.cache
def _published_entries() -> frozenset[tuple[str, str, str, str]]:
    """(env, method, model, config id) of every row in leaderboard/submissions, read by the leaderboard's own loader."""
    rows = load_submissions(LEADERBOARD)
    return frozenset(zip(rows["env_id"], rows["method"], rows["model"], rows["method_config"].map(config_id)))


def _is_published(config) -> bool:
    """Whether leaderboard/submissions holds a row with this run's env, method, model and config id."""
    return (config.env_id, config.method, config.model, run_id(config)) in _published_entries()


def test_the_cpu_preset_on_textworld_is_the_published_cooking_setting():
    """`--env craft/TextWorld-v0` under the cpu preset runs the cooking setting where the tiny model learns."""
    for method in ALL_METHODS:
        (config,) = build_configs(parse_args(["--method", method, "--env", "craft/TextWorld-v0"]))
        assert config.env_kwargs == {"family": "cooking", "level": 1, "n_games": 64}
        assert (config.tiny_budget, config.train_env_kwargs) == ("textworld", {"n_games": 256})
        assert (config.lr, config.steps) == (3e-4, 100)
        # The step rounds as the rows' did: distinct rows and eager attention would change float rounding.
        assert (config.distinct_rows, config.attn_implementation, config.train_dtype) == (False, None, "float32")
    (other,) = build_configs(parse_args(["--method", "grpo", "--env", "craft/TextWorld-v0",
                                         "--set", "env_kwargs={\"n_games\": 4}", "--steps", "3"]))
    assert (other.env_kwargs, other.steps) == ({"n_games": 4}, 3)  # --set and --steps still win


@pytest.mark.parametrize("env", ["craft/ALFWorldGen-v0", "craft/SearchQAGen-v0", "craft/WebShopGen-v0",
                                 "craft/TextWorld-v0"])
def test_the_cpu_preset_gives_the_config_ids_of_its_published_rows(env, monkeypatch):
    """The short command (`--method M --env E`) reproduces the leaderboard's rows: ALFWorldGen's under the current
    preset, Search-QA's and WebShop's under the first one, which those environments keep, TextWorld's cooking rows.
    ALFWorldGen's rows trained in bfloat16 on a CPU with bfloat16 matrix instructions, as `train_dtype="auto"`
    chooses there; the next test covers a CPU without them."""
    monkeypatch.setattr(precision, "native_bfloat16", lambda device="cpu": True)
    for method in ALL_METHODS:
        (config,) = build_configs(parse_args(["--method", method, "--env", env]))
        assert _is_published(config), f"no published entry for {env} {method} {run_id(config)}"
    (alfworld,) = build_configs(parse_args(["--method", "grpo"]))
    assert (alfworld.lr, alfworld.steps, alfworld.invalid_penalty, alfworld.method_options["adv_std"]) == (1e-4, 100, 0.0, "none")
    (search,) = build_configs(parse_args(["--method", "grpo", "--env", "craft/SearchQAGen-v0"]))
    assert (search.lr, search.steps, search.invalid_penalty, search.train_dtype) == (1e-3, 10, 0.1, "float32")


def test_on_a_cpu_without_native_bfloat16_the_preset_trains_in_float32_under_its_own_id(monkeypatch):
    """Emulated bfloat16 made the step 12x slower (docs/benchmarks.md), so there the preset trains in float32; that
    changes results, so those runs carry another config id than the bfloat16 rows (GRPO's float32 rows are published
    under their own id), and `base` (which does not train) keeps its published id."""
    monkeypatch.setattr(precision, "native_bfloat16", lambda device="cpu": False)
    (grpo,) = build_configs(parse_args(["--method", "grpo"]))
    (forced,) = build_configs(parse_args(["--method", "grpo", "--set", 'train_dtype="bfloat16"']))
    assert grpo.train_dtype == "float32" and forced.train_dtype == "bfloat16"
    assert run_id(grpo) != run_id(forced)
    assert _is_published(grpo) and _is_published(forced)  # the bfloat16 rows reproduce, slowly, when asked for
    (base,) = build_configs(parse_args(["--method", "base"]))
    assert _is_published(base)


# ---------------------------------------------------------------------------------------------------- one run per dir
def test_a_second_run_into_a_locked_run_directory_is_refused_naming_the_holder(model_dir, tmp_path):
    argv = small_args(model_dir, tmp_path, "--method", "grpo", "--steps", "1")
    (config,) = build_configs(parse_args(argv))
    run_dir = tmp_path / run_name(config)
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from craft_bench.agents.run_files import RunLock
            lock = RunLock({str(run_dir)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = refused(argv)
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by another run (pid {holder.pid} " in message
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]  # the refused run wrote nothing


# ---------------------------------------------------------------------------------------------------- eval-only
def _snapshot(run_dir: Path) -> dict[str, bytes]:
    return {name: (run_dir / name).read_bytes() for name in (CONFIG_FILE, METRICS_FILE, RESULT_FILE, "eval.csv")}


def test_eval_only_after_checkpoint_deletion_evaluates_final_model_and_keeps_training_outputs(model_dir, tmp_path, capsys):
    argv = small_args(model_dir, tmp_path, "--method", "grpo", "--steps", "1")
    assert run_main(argv) == 0
    (config,) = build_configs(parse_args(argv))
    run_dir = tmp_path / run_name(config)
    (run_dir / CHECKPOINT_FILE).unlink()
    before = _snapshot(run_dir)
    capsys.readouterr()

    assert run_main([*argv, "--eval-only"]) == 0
    assert _snapshot(run_dir) == before  # metrics, config and result untouched
    assert "eval-only: evaluating" in capsys.readouterr().err and FINAL_MODEL_DIR in run_dir.as_posix() + "/final_model"
    row = pd.read_csv(run_dir / EVAL_ONLY_RESULT_FILE).iloc[0]
    assert row["train_steps"] == 1  # the trained model, not the initial one
    assert len(pd.read_csv(run_dir / EVAL_ONLY_FILE)) == 2
    # final_model/ is the trained policy: evaluating it gives the training run's own result, with the same
    # initial-weights hash (recorded in config.json at training time).
    trained = pd.read_csv(run_dir / RESULT_FILE, dtype=str).iloc[0]
    assert row["success_rate"] == float(trained["success_rate"])
    assert row["policy_sha256"] == trained["policy_sha256"] and len(trained["policy_sha256"]) == 64


def test_eval_only_with_only_a_checkpoint_says_so_and_refuses_a_forged_one(model_dir, tmp_path, capsys):
    argv = small_args(model_dir, tmp_path, "--method", "grpo", "--steps", "1")
    assert run_main(argv) == 0
    (config,) = build_configs(parse_args(argv))
    run_dir = tmp_path / run_name(config)
    import shutil

    shutil.rmtree(run_dir / FINAL_MODEL_DIR)
    capsys.readouterr()
    assert run_main([*argv, "--eval-only"]) == 0
    assert "checkpoint.pt (no final_model/" in capsys.readouterr().err
    assert pd.read_csv(run_dir / EVAL_ONLY_RESULT_FILE).iloc[0]["train_steps"] == 1

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buffer = io.BytesIO()
    torch.save({"state": {"step": 1}, "model": Payload()}, buffer)
    (run_dir / CHECKPOINT_FILE).write_bytes(buffer.getvalue())
    # The forger rewrites the digest file too: weights-only loading is what refuses the file.
    digest_path(run_dir / CHECKPOINT_FILE).write_text(f"{file_sha256(run_dir / CHECKPOINT_FILE)}  checkpoint.pt\n")
    message = refused([*argv, "--eval-only"])
    assert f"{run_dir / CHECKPOINT_FILE}" in message and "could run code" in message
    assert not marker.exists()


def test_eval_only_without_a_trained_model_evaluates_the_initial_one_and_says_so(model_dir, tmp_path, capsys):
    argv = small_args(model_dir, tmp_path, "--method", "grpo", "--steps", "1", "--eval-only")
    assert run_main(argv) == 0
    (config,) = build_configs(parse_args(argv))
    run_dir = tmp_path / run_name(config)
    assert "the initial model" in capsys.readouterr().err
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", EVAL_ONLY_FILE, EVAL_ONLY_RESULT_FILE]
    assert pd.read_csv(run_dir / EVAL_ONLY_RESULT_FILE).iloc[0]["train_steps"] == 0
    # ... and a training run into the same directory afterwards is not blocked by it.
    assert run_main(argv[:-1]) == 0
    assert (run_dir / RESULT_FILE).exists()
    # --steps is part of the run's identity, never silently ignored: --eval-only --steps 2 names another run, and
    # the message points to the trained one.
    capsys.readouterr()
    other = [*argv[: argv.index("--steps")], "--steps", "2", "--eval-only"]
    assert run_main(other) == 0
    err = capsys.readouterr().err
    assert "the initial model" in err and run_dir.name in err


# ---------------------------------------------------------------------------------------------------- re-evaluation
def test_trained_in_evaluates_a_finished_runs_model_under_another_protocol(model_dir, tmp_path, capsys):
    import json

    from craft_bench.leaderboard.store import submit

    trained = tmp_path / "trained"
    argv = small_args(model_dir, trained, "--method", "opsd", "--steps", "1", "--set", "lr=0.5", "--set", "eval_temperature=1.0")
    assert run_main(argv) == 0
    (source_config,) = build_configs(parse_args(argv))
    source = trained / run_name(source_config)
    before = _snapshot(source)

    # The same run's model under a protocol of 2 tasks x 2 samples: a run directory of its own, under --out.
    out = tmp_path / "reevaluated"
    again = [*small_args(model_dir, out, "--method", "opsd", "--steps", "1", "--set", "lr=0.5", "--set", "eval_temperature=1.0"),
             "--set", "eval_samples=2", "--eval-only", "--trained-in", str(trained)]
    assert run_main(again) == 0
    (config,) = build_configs(parse_args(again))
    run_dir = out / run_name(config)
    assert run_id(config) != run_id(source_config) and _snapshot(source) == before  # the source is only read
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", CONFIG_FILE, "eval.csv", METRICS_FILE, RESULT_FILE]
    record = json.loads((run_dir / CONFIG_FILE).read_text())
    assert record["trained_in"] == str(source) and record["run_id"] == run_id(config)
    assert (run_dir / METRICS_FILE).read_bytes() == (source / METRICS_FILE).read_bytes()  # the same training
    row = pd.read_csv(run_dir / RESULT_FILE, dtype=str).iloc[0]
    theirs = pd.read_csv(source / RESULT_FILE, dtype=str).iloc[0]
    assert (row["n_eval_episodes"], row["train_steps"]) == ("4", "1")
    assert row["policy_sha256"] == theirs["policy_sha256"]  # the initial weights the source trained from
    assert float(row["wall_clock_s"]) > json.loads((source / FINAL_MODEL_DIR / "craft_bench_state.json").read_text())["wall_clock_s"]
    assert json.loads(row["method_config"])["train"]["eval_samples"] == 2
    assert submit(run_dir, tmp_path / "board").added == 1  # ready for the leaderboard, curve included

    # Under the source's own protocol, its model gives exactly the source's evaluation: the trained weights, not
    # the initial ones, are what gets evaluated (OPSD's distillation term at lr 0.5 moved them; GRPO's gradient
    # would be 0 here, where every episode fails alike).
    same = tmp_path / "same"
    assert run_main([*argv[: argv.index("--out")], "--out", str(same), *argv[argv.index("--out") + 2:],
                     "--eval-only", "--trained-in", str(trained)]) == 0
    assert (same / source.name / "eval.csv").read_bytes() == (source / "eval.csv").read_bytes()
    untrained = tmp_path / "untrained"  # (and the initial model's sampled episodes differ from them)
    assert run_main([*argv[: argv.index("--out")], "--out", str(untrained), *argv[argv.index("--out") + 2:], "--eval-only"]) == 0
    assert (untrained / source.name / EVAL_ONLY_FILE).read_bytes() != (source / "eval.csv").read_bytes()
    # A finished re-evaluation is reported, not run again.
    capsys.readouterr()
    assert run_main(again) == 0
    assert "already evaluated" in capsys.readouterr().err


def test_a_failed_reevaluation_leaves_nothing_that_refuses_the_next_try(model_dir, tmp_path, monkeypatch):
    from craft_bench.agents.trainer import Trainer

    trained = tmp_path / "trained"
    assert run_main(small_args(model_dir, trained, "--method", "grpo", "--steps", "1")) == 0
    again = [*small_args(model_dir, tmp_path / "out", "--method", "grpo", "--steps", "1"), "--set", "eval_samples=2",
             "--eval-only", "--trained-in", str(trained)]
    original = Trainer.evaluate

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run_main(again)
    assert not (tmp_path / "out").exists()  # nothing written, the directory it created removed
    monkeypatch.setattr(Trainer, "evaluate", original)
    assert run_main(again) == 0


def test_trained_in_refuses_runs_trained_otherwise_and_bad_combinations(model_dir, tmp_path):
    trained = tmp_path / "trained"
    assert run_main(small_args(model_dir, trained, "--method", "grpo", "--steps", "1")) == 0
    out = tmp_path / "out"
    message = refused([*small_args(model_dir, out, "--method", "grpo", "--steps", "1", "--set", "lr=0.2"),
                       "--eval-only", "--trained-in", str(trained)])
    assert "no finished run there was trained with these settings" in message and "(lr differ)" in message
    message = refused([*small_args(model_dir, out, "--method", "sdar", "--steps", "1"), "--eval-only", "--trained-in", str(trained)])
    assert "holds a final_model/" in message
    assert "needs --eval-only" in refused([*small_args(model_dir, out, "--method", "grpo"), "--trained-in", str(trained)])
    assert "untrained model" in refused([*small_args(model_dir, out, "--method", "base"), "--eval-only", "--trained-in", str(trained)])
    assert "no such directory" in refused([*small_args(model_dir, out, "--method", "grpo"), "--eval-only", "--trained-in", str(tmp_path / "nope")])
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------- resume
def test_resume_with_another_worker_count_continues_the_run(model_dir, tmp_path):
    argv = small_args(model_dir, tmp_path, "--method", "grpo", "--steps", "2")
    (config,) = build_configs(parse_args(argv))
    run_dir = tmp_path / run_name(config)
    assert run_main(argv) == 0
    metrics = (run_dir / METRICS_FILE).read_bytes()
    # Same run (num_workers is not part of its identity), resumed at its end: nothing retrained, nothing refused.
    resumed = [*argv[: argv.index("--num-workers")], *argv[argv.index("--num-workers") + 2:], "--num-workers", "2", "--resume"]
    assert run_main(resumed) == 0
    assert (run_dir / METRICS_FILE).read_bytes() == metrics


# ---------------------------------------------------------------------------------------------------- trainer wiring
WIRING = "needs the lead's wiring of Trainer.save_checkpoint/load_checkpoint/train to agents.checkpoint (issue 15 #1, #6); delete this marker with that wiring"


def test_resume_refuses_a_forged_checkpoint_without_running_it(model_dir, tmp_path):
    argv = small_args(model_dir, tmp_path, "--method", "grpo", "--steps", "1")
    assert run_main(argv) == 0
    (config,) = build_configs(parse_args(argv))
    run_dir = tmp_path / run_name(config)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    buffer = io.BytesIO()
    torch.save({"state": {"step": 1}, "model": Payload()}, buffer)
    (run_dir / CHECKPOINT_FILE).write_bytes(buffer.getvalue())
    digest_path(run_dir / CHECKPOINT_FILE).write_text(f"{file_sha256(run_dir / CHECKPOINT_FILE)}  checkpoint.pt\n")
    with pytest.raises(SystemExit, match="could run code"):
        run_main([*argv, "--resume"])
    assert not marker.exists()


def test_a_nan_step_stops_the_run_and_keeps_the_last_good_checkpoint(model_dir, tmp_path):
    from craft_bench.agents.checkpoint import NonFiniteError, load_checkpoint
    from craft_bench.agents.trainer import TrainConfig, Trainer

    config = TrainConfig(
        env_id=COUNTER_ENV_ID, model=str(model_dir), method="grpo", steps=3, tasks_per_step=2, group_size=2,
        max_turns=3, max_new_tokens=4, eval_split="train", eval_episodes=2, num_workers=1, micro_batch_rows=4,
    )
    trainer = Trainer(config, tmp_path, progress=False)
    save = trainer.save_checkpoint

    def save_then_diverge() -> None:
        save()
        if trainer.state.step == 1:  # the weights blow up after step 0 was checkpointed
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))

    trainer.save_checkpoint = save_then_diverge
    try:
        with pytest.raises(NonFiniteError, match=r"^step 1: "):
            trainer.train()
    finally:
        trainer.close()
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["state"]["step"] == 1
    assert pd.read_csv(tmp_path / METRICS_FILE)["step"].tolist() == [0]


def test_skip_policy_drops_a_nonfinite_update_and_the_run_goes_on(model_dir, tmp_path):
    from craft_bench.agents.checkpoint import load_checkpoint
    from craft_bench.agents.trainer import TrainConfig, Trainer

    config = TrainConfig(
        env_id=COUNTER_ENV_ID, model=str(model_dir), method="sdar", steps=3, tasks_per_step=2, group_size=2,
        max_turns=3, max_new_tokens=4, eval_split="train", eval_episodes=2, num_workers=1, micro_batch_rows=4,
        method_options={"teacher": "ema"}, on_nonfinite="skip",
    )
    trainer = Trainer(config, tmp_path, progress=False)
    loss_of = trainer.method.loss

    def nan_at_step_1(micro, ctx):
        loss, metrics = loss_of(micro, ctx)
        return (loss * float("nan") if trainer.state.step == 1 else loss), metrics

    trainer.method.loss = nan_at_step_1
    try:
        trainer.train()
    finally:
        trainer.close()
    metrics = pd.read_csv(tmp_path / METRICS_FILE)
    assert metrics["optim/skipped_updates"].tolist() == [0.0, 1.0, 0.0]
    assert load_checkpoint(tmp_path / CHECKPOINT_FILE)["state"]["step"] == 3  # finite weights, all steps counted
