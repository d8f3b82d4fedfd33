"""Tests of the training loop and the run CLI: every method end to end, resume after an interruption (including
kill -9) equals the uninterrupted run, outputs a leaderboard accepts, and clear errors for bad input."""

from __future__ import annotations

import csv
import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from craft_bench.agents.engine import distinct_rows
from craft_bench.agents.methods import METHOD_NAMES
from craft_bench.agents.trainer import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    TrainConfig,
    Trainer,
)
from fake_envs import COUNTER_ENV_ID, PICK_PLACE_ENV_ID

from craft_bench.leaderboard import validate_rows
from craft_bench.run import main as run_main
from craft_bench.run import run_config_of

TESTS_DIR = Path(__file__).parent


def small_config(model_dir: Path, **overrides) -> TrainConfig:
    values = dict(
        env_id=COUNTER_ENV_ID, model=str(model_dir), steps=2, tasks_per_step=2, group_size=2, max_turns=3,
        max_new_tokens=4, eval_split="train", eval_episodes=2, num_workers=1, micro_batch_rows=4,
    )
    values.update(overrides)
    return TrainConfig(**values)


def numeric_metrics(path: Path) -> pd.DataFrame:
    """metrics.csv without wall-clock columns, which legitimately differ between runs."""
    frame = pd.read_csv(path)
    return frame[[c for c in frame.columns if not c.startswith("time/") and c != "env/steps_per_s"]]


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_every_method_trains_and_evaluates(method, model_dir, tmp_path):
    options = {"alpha": 0.01} if method in ("craft", "grpo") else {}
    config = small_config(model_dir, method=method, steps=1, method_options=options)
    trainer = Trainer(config, tmp_path, progress=False)
    try:
        trainer.train()
        records = trainer.evaluate()
    finally:
        trainer.close()
    metrics = pd.read_csv(tmp_path / METRICS_FILE)
    assert metrics["step"].tolist() == [0]
    assert torch.isfinite(torch.tensor(metrics["loss/total"].values)).all()
    assert (tmp_path / CHECKPOINT_FILE).exists()
    assert [r["task_id"] for r in records] == trainer.eval_tasks
    if method == "grpo":
        assert not any(c.startswith("sdar/") or c == "loss/distill" for c in metrics.columns)


def test_grpo_never_scores_a_teacher(model_dir, tmp_path, monkeypatch):
    import craft_bench.agents.trainer as trainer_module

    def forbidden(*args, **kwargs):
        raise AssertionError("grpo must not score a teacher")

    monkeypatch.setattr(trainer_module, "score_teacher", forbidden)
    trainer = Trainer(small_config(model_dir, method="grpo", steps=1), tmp_path, progress=False)
    try:
        trainer.train()
    finally:
        trainer.close()
    assert trainer.reference is None and trainer.ema is None


def test_resume_after_interruption_equals_uninterrupted_run(model_dir, tmp_path):
    config = small_config(model_dir, method="craft", steps=3, method_options={"alpha": 0.01, "teacher": "ema"})
    whole = Trainer(config, tmp_path / "whole", progress=False)
    whole.train()
    whole.close()

    first = Trainer(small_config(model_dir, method="craft", steps=1, method_options={"alpha": 0.01, "teacher": "ema"}), tmp_path / "cut", progress=False)
    first.train()
    first.close()
    # A row of a step the checkpoint does not hold (a kill between the metrics write and the checkpoint) is dropped.
    with (tmp_path / "cut" / METRICS_FILE).open("a") as handle:
        handle.write("1" + ",0" * (len(numeric_metrics(tmp_path / "whole" / METRICS_FILE).columns) + 5) + "\n")
    resumed = Trainer(config, tmp_path / "cut", progress=False)
    assert resumed.load_checkpoint()
    assert resumed.state.step == 1
    resumed.train()
    resumed.close()

    pd.testing.assert_frame_equal(
        numeric_metrics(tmp_path / "whole" / METRICS_FILE), numeric_metrics(tmp_path / "cut" / METRICS_FILE), check_exact=True
    )
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert whole.method.state_dict() == resumed.method.state_dict()


def test_resume_refuses_a_different_config(model_dir, tmp_path):
    trainer = Trainer(small_config(model_dir, method="sdar", steps=1), tmp_path, progress=False)
    trainer.train()
    trainer.close()
    other = Trainer(small_config(model_dir, method="sdar", steps=2, lr=3e-4), tmp_path, progress=False)
    try:
        with pytest.raises(ValueError, match="lr"):
            other.load_checkpoint()
    finally:
        other.close()


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import fake_envs  # registers the test env
    from craft_bench.agents.trainer import TrainConfig, Trainer

    def main():
        config = TrainConfig(**{config!r})
        trainer = Trainer(config, {run_dir!r}, progress=False)
        trainer.load_checkpoint()
        trainer.train()
        trainer.close()

    if __name__ == "__main__":
        main()
    """
)


def test_kill_9_mid_run_then_resume_equals_uninterrupted_run(model_dir, tmp_path):
    # Both runs are separate processes with the same thread settings, so "exactly" can mean bit for bit.
    values = dict(
        env_id=COUNTER_ENV_ID, model=str(model_dir), steps=4, tasks_per_step=2, group_size=2, max_turns=3,
        max_new_tokens=4, eval_split="train", eval_episodes=2, num_workers=1, method="sdar",
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}

    def script_for(run_dir: Path) -> Path:
        script = run_dir.parent / f"{run_dir.name}.py"
        script.write_text(KILL_SCRIPT.format(tests=str(TESTS_DIR), config=values, run_dir=str(run_dir)))
        return script

    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    assert subprocess.run([sys.executable, str(script_for(whole_dir))], env=env, timeout=600).returncode == 0

    script = script_for(killed_dir)
    process = subprocess.Popen([sys.executable, str(script)], env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (killed_dir / CHECKPOINT_FILE).exists():
            assert process.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint after 300 s"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)  # the trainer and its environment workers, mid-run
    finally:
        process.wait()
    with (killed_dir / METRICS_FILE).open() as handle:
        done_before_kill = len(list(csv.DictReader(handle)))
    assert done_before_kill < values["steps"]

    assert subprocess.run([sys.executable, str(script)], env=env, timeout=600).returncode == 0
    pd.testing.assert_frame_equal(numeric_metrics(whole_dir / METRICS_FILE), numeric_metrics(killed_dir / METRICS_FILE), check_exact=True)
    expected = torch.load(whole_dir / CHECKPOINT_FILE, weights_only=False)
    final = torch.load(killed_dir / CHECKPOINT_FILE, weights_only=False)
    for name, value in expected["model"].items():
        assert torch.equal(value, final["model"][name]), name
    assert expected["method"] == final["method"]


def cli(model_dir: Path, out: Path, *extra: str) -> int:
    return run_main([
        "--env", COUNTER_ENV_ID, "--model", str(model_dir), "--out", str(out), "--no-progress", "--num-workers", "1",
        "--set", "tasks_per_step=2", "--set", "group_size=2", "--set", "max_turns=3", "--set", "max_new_tokens=4",
        "--set", "eval_split=\"train\"", "--set", "eval_episodes=2", *extra,
    ])


def test_cli_runs_several_methods_and_seeds_and_writes_leaderboard_rows(model_dir, tmp_path, capsys):
    assert cli(model_dir, tmp_path, "--method", "grpo,sdar", "--seeds", "0,1", "--steps", "1") == 0
    runs = sorted(p.name for p in tmp_path.iterdir())
    assert len(runs) == 4
    for run in tmp_path.iterdir():
        for name in ("config.json", "metrics.csv", "eval.csv", "result.csv", "checkpoint.pt", "final_model"):
            assert (run / name).exists(), f"{run.name} lacks {name}"
        rows = pd.read_csv(run / "result.csv", dtype=str, keep_default_na=False).to_dict("records")
        validate_rows(rows)
        assert len(pd.read_csv(run / "eval.csv")) == 2
    out = capsys.readouterr().out
    assert "mean success over seeds" in out and "sdar" in out


def test_cli_refuses_to_overwrite_and_resumes(model_dir, tmp_path):
    assert cli(model_dir, tmp_path, "--method", "opsd", "--steps", "1") == 0
    with pytest.raises(SystemExit, match="--resume"):
        cli(model_dir, tmp_path, "--method", "opsd", "--steps", "1")
    # --resume of a finished run has nothing left to do; the step count is part of the configuration's identity, so
    # more steps are another run, in another directory, and the first run stays as it was.
    assert cli(model_dir, tmp_path, "--method", "opsd", "--steps", "1", "--resume") == 0
    (first,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert pd.read_csv(first / METRICS_FILE)["step"].tolist() == [0]
    assert cli(model_dir, tmp_path, "--method", "opsd", "--steps", "2", "--resume") == 0
    (second,) = [p for p in tmp_path.iterdir() if p.is_dir() and p != first]
    assert pd.read_csv(second / METRICS_FILE)["step"].tolist() == [0, 1]
    assert pd.read_csv(first / METRICS_FILE)["step"].tolist() == [0]
    assert cli(model_dir, tmp_path, "--method", "opsd", "--steps", "2", "--eval-only") == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "ppo"], "unknown method"),
        (["--method", "craft", "--seeds", "a,b"], "--seeds"),
        (["--method", "craft", "--set", "group_size=0"], "group_size"),
        (["--method", "craft", "--set", "nonsense=1"], "nonsense"),
        (["--method", "craft", "--set", "group_size"], "NAME=VALUE"),
    ],
)
def test_cli_rejects_bad_input_by_name(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run_main([*args, "--out", str(tmp_path)])


def test_config_rejects_unknown_fields_and_bad_values():
    with pytest.raises(ValueError, match="unknown TrainConfig field"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="tasks_per_step"):
        TrainConfig(tasks_per_step=0)


def test_a_metric_that_appears_mid_run_widens_metrics_csv(model_dir, tmp_path):
    trainer = Trainer(small_config(model_dir, method="grpo", steps=0), tmp_path, progress=False)
    try:
        trainer._append_metrics({"step": 0, "seed": 0, "env/success": 0.5})
        trainer._append_metrics({"step": 1, "seed": 0, "env/success": 0.25, "craft/new": 1.0})
    finally:
        trainer.close()
    frame = pd.read_csv(tmp_path / METRICS_FILE)
    assert list(frame.columns) == ["step", "seed", "env/success", "craft/new"]
    assert frame["env/success"].tolist() == [0.5, 0.25] and frame["craft/new"].isna().tolist() == [True, False]


@pytest.mark.parametrize("teacher", ["old", "ref", "ema"])
def test_the_methods_teacher_option_chooses_the_teacher_weights(teacher, model_dir, tmp_path, monkeypatch):
    # After one step, θ is perturbed so that θ_old, the reference (initial weights) and the EMA all differ; the
    # second step's teacher log-probs must then be exactly a direct scoring of its rollout with the chosen weights.
    import copy

    import craft_bench.agents.trainer as trainer_module
    from craft_bench.agents.rollout import score_teacher

    config = small_config(model_dir, method="sdar", steps=2, ema_decay=0.5, method_options={"teacher": teacher})
    trainer = Trainer(config, tmp_path, progress=False)
    seen = {}
    real_collect, real_prepare = trainer_module.collect_rollouts, trainer.method.prepare

    def collect(*args, **kwargs):
        seen["rollout"] = real_collect(*args, **kwargs)
        return seen["rollout"]

    def prepare(batch, step=None, reduce=None):
        seen["teacher_logp"] = batch.teacher_logp.clone()
        return real_prepare(batch, step, reduce)

    monkeypatch.setattr(trainer_module, "collect_rollouts", collect)
    monkeypatch.setattr(trainer.method, "prepare", prepare)
    try:
        initial = copy.deepcopy(trainer.model)
        trainer.train_step(0)
        after_step = copy.deepcopy(trainer.model)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in trainer.model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        trainer.train_step(1)
    finally:
        trainer.close()
    assert trainer.teacher == teacher
    assert (trainer.reference is not None) == (teacher == "ref")
    assert (trainer.ema is not None) == (teacher == "ema")
    ema = copy.deepcopy(initial)
    with torch.no_grad():
        for target, source in zip(ema.parameters(), after_step.parameters()):
            target.mul_(0.5).add_(source, alpha=0.5)
    perturbed = copy.deepcopy(after_step)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for parameter in perturbed.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    candidates = {"old": perturbed, "ref": initial, "ema": ema}
    scores = {
        name: score_teacher(weights.eval(), seen["rollout"], pad_token_id=trainer.pad_id, micro_batch=config.micro_batch_rows)
        for name, weights in candidates.items()
    }
    assert torch.equal(seen["teacher_logp"], scores[teacher])
    mask = seen["rollout"].to_tensors().response_mask
    for name, other in scores.items():
        if name != teacher:
            assert (seen["teacher_logp"] - other)[mask].abs().max() > 1e-3, f"{teacher} teacher looks like {name}"


def test_fast_step_options_give_the_same_training_up_to_float_rounding(model_dir, tmp_path):
    # θ_old from the sampler's own log-probs, two rollout waves and explicit thread counts change how the step is
    # computed, not what it computes: the same episodes, and losses equal up to float rounding.
    def metrics(name: str, **overrides) -> pd.DataFrame:
        config = small_config(model_dir, method="craft", method_options={"alpha": 0.01}, steps=2, temperature=1.0,
                              num_workers=2, **overrides)
        trainer = Trainer(config, tmp_path / name, progress=False)
        try:
            trainer.train()
        finally:
            trainer.close()
        return numeric_metrics(tmp_path / name / METRICS_FILE)

    slow = metrics("slow")
    fast = metrics("fast", old_logprobs="rollout", rollout_waves=2, torch_threads=1, rollout_threads=1)
    assert list(fast.columns) == list(slow.columns)
    for column in ("env/success", "env/invalid_rate", "env/steps_mean", "rollout/rows", "rollout/tokens"):
        assert fast[column].tolist() == slow[column].tolist(), column
    for column in ("loss/total", "loss/pg", "loss/distill", "optim/grad_norm"):
        assert fast[column].tolist() == pytest.approx(slow[column].tolist(), rel=1e-4, abs=1e-6), column
    assert (fast["rollout/sampler_logp_gap"] == 0).all()


def test_old_logprobs_from_the_rollout_need_the_sampler_to_be_the_policy():
    with pytest.raises(ValueError, match="old_logprobs='rollout' needs engine='hf', temperature=1"):
        TrainConfig(old_logprobs="rollout", temperature=0.7)
    with pytest.raises(ValueError, match="rollout_waves must be >= 1"):
        TrainConfig(rollout_waves=0)
    with pytest.raises(ValueError, match="old_logprobs must be"):
        TrainConfig(old_logprobs="cached")
    # "auto" (the CPU preset's) resolves when the config is made, so config.json and the identity record what ran.
    assert TrainConfig(old_logprobs="auto").old_logprobs == "rollout"
    assert TrainConfig(old_logprobs="auto", temperature=0.7).old_logprobs == "rescore"
    assert TrainConfig(old_logprobs="auto", engine="vllm").old_logprobs == "rescore"


def test_train_env_kwargs_set_the_training_pool_only(model_dir, tmp_path):
    # RL on a larger pool than the evaluation's: the training runner plays it; evaluation and the model do not move.
    config = small_config(model_dir, method="grpo", steps=1, eval_split="valid", env_kwargs={"num_tasks": 4},
                          train_env_kwargs={"num_tasks": 40})
    trainer = Trainer(config, tmp_path, progress=False)
    try:
        assert len(trainer.train_tasks) == 40 and len(trainer.eval_tasks) == 2
        trainer.train()
        assert trainer.train_runner.env_kwargs["num_tasks"] == 40
        trainer.evaluate()
        assert trainer._eval_runner.env_kwargs["num_tasks"] == 4
    finally:
        trainer.close()
    assert run_config_of(config)["train"]["train_env_kwargs"] == {"num_tasks": 40}
    assert "train_env_kwargs" not in run_config_of(small_config(model_dir))["train"]  # earlier runs keep their ids
    with pytest.raises(ValueError, match=r"train_env_kwargs may not set \['split'\]"):
        small_config(model_dir, train_env_kwargs={"split": "valid"})
    with pytest.raises(ValueError, match=r"env_kwargs may not set \['max_steps'\]"):
        small_config(model_dir, env_kwargs={"max_steps": 3})



def test_train_dtype_autocasts_every_training_forward_and_no_evaluation_forward(model_dir, tmp_path):
    # bfloat16 covers generation, the θ_old/teacher/reference scores and the update's forward; evaluation stays
    # float32, so the result of an evaluation does not depend on how the model was trained.
    config = small_config(model_dir, method="craft", method_options={"alpha": 0.01}, steps=1, temperature=1.0,
                          train_dtype="bfloat16", attn_implementation="eager")
    trainer = Trainer(config, tmp_path / "bf16", progress=False)
    calls: list[tuple[str, bool, torch.dtype | None]] = []

    def recording(name: str, module: torch.nn.Module) -> None:
        forward = module.forward

        @functools.wraps(forward)  # keeps the signature the engine inspects
        def recorded(*args, **kwargs):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            calls.append((name, torch.is_grad_enabled(), dtype))
            return forward(*args, **kwargs)

        module.forward = recorded

    try:
        assert trainer.model.config._attn_implementation == "eager"
        assert trainer.reference.config._attn_implementation == "eager"  # the frozen copy inherits the kernel
        recording("policy", trainer.model)
        recording("reference", trainer.reference)
        trainer.train()
        training, calls[:] = list(calls), []
        trainer.evaluate()
        evaluation = list(calls)
    finally:
        trainer.close()
    assert {name for name, _, _ in training} == {"policy", "reference"}
    assert any(grad for _, grad, _ in training)  # the update's differentiable forward was among them
    assert {dtype for _, _, dtype in training} == {torch.bfloat16}
    assert evaluation and {dtype for _, _, dtype in evaluation} == {None}


def test_train_dtype_is_a_recorded_training_setting_and_attention_a_neutral_one(model_dir):
    assert run_config_of(small_config(model_dir, train_dtype="bfloat16"))["train"]["train_dtype"] == "bfloat16"
    plain = run_config_of(small_config(model_dir))
    assert "train_dtype" not in plain["train"]  # float32, the legacy value: earlier runs keep their ids
    assert run_config_of(small_config(model_dir, attn_implementation="eager")) == plain
    with pytest.raises(ValueError, match="train_dtype must be one of"):
        TrainConfig(train_dtype="float16")
    with pytest.raises(ValueError, match="attn_implementation must be None or a kernel name"):
        TrainConfig(attn_implementation="")


def test_reset_ahead_gives_the_same_run_and_drops_a_reset_meant_for_another_step(model_dir, tmp_path):
    def run(name: str, **overrides) -> tuple[pd.DataFrame, Trainer]:
        config = small_config(model_dir, method="grpo", steps=3, num_workers=1, **overrides)
        trainer = Trainer(config, tmp_path / name, progress=False)
        runner, threads = trainer.train_runner, []
        reset = runner.reset

        def recorded(*args, **kwargs):
            threads.append(threading.current_thread().name.split("_")[0])
            return reset(*args, **kwargs)

        runner.reset = recorded
        try:
            if overrides.get("reset_ahead"):
                trainer._start_reset_ahead(7)  # a reset for a step this run never plays: waited for, then dropped
            trainer.train()
            assert trainer._reset_ahead is None  # the last step starts none
        finally:
            trainer.close()
        return numeric_metrics(tmp_path / name / METRICS_FILE), threads

    plain, plain_threads = run("plain")
    ahead, ahead_threads = run("ahead", reset_ahead=True)
    pd.testing.assert_frame_equal(ahead, plain)
    assert plain_threads == ["MainThread"] * 3
    # The unused step-7 reset, step 0's own (after dropping it), then steps 1 and 2 reset ahead.
    assert ahead_threads == ["reset-ahead", "MainThread", "reset-ahead", "reset-ahead"]


def test_a_reset_started_ahead_must_be_this_rollouts(model_dir, tmp_path):
    from craft_bench.agents.rollout import collect_rollouts, reset_seed

    trainer = Trainer(small_config(model_dir, method="grpo", steps=1, num_workers=0), tmp_path, progress=False)
    try:
        tasks, block = trainer._step_tasks(0)
        runner = trainer.train_runner
        sampling = trainer.policy.sampling(1.0, 1.0, 4)
        wrong = lambda: runner.reset(tasks, 2, seed=reset_seed(0, 1), first_group=block.start)
        with pytest.raises(ValueError, match="the reset started ahead does not match this rollout"):
            collect_rollouts(runner, trainer.policy, tasks, 2, sampling=sampling, seed=0, step=0, reset=wrong)
        trainer._start_reset_ahead(1)
    finally:
        trainer.close()
    assert trainer._reset_ahead is None  # close() waited for the reset in flight before closing its runner


@pytest.mark.parametrize("method", ["craft", "adaptive_cringe"])
def test_distinct_rows_gives_the_same_update_from_fewer_forward_rows(method, model_dir, tmp_path, monkeypatch):
    # Siblings share their first prompt and, greedily, their replies: with distinct_rows each
    # distinct row goes through the model once (scoring and update), every row still counts in the loss, and the
    # step's losses, gradient norm and new weights equal the plain step's up to float rounding. craft has teacher and
    # reference passes; adaptive_cringe also takes the student's full logits.
    import craft_bench.agents.trainer as trainer_module

    score = trainer_module.response_logprobs

    def run(name: str, distinct: bool) -> tuple[pd.DataFrame, dict[str, torch.Tensor], list[int]]:
        forward_rows: list[int] = []

        def counted(model, prompts, responses, *args, **kwargs):
            forward_rows.append(len(distinct_rows(prompts, responses)[0]) if kwargs.get("distinct") else len(prompts))
            return score(model, prompts, responses, *args, **kwargs)

        monkeypatch.setattr(trainer_module, "response_logprobs", counted)
        config = small_config(model_dir, env_id=PICK_PLACE_ENV_ID, method=method, steps=1, group_size=4,
                              temperature=0.0, lr=1e-2,
                              distinct_rows=distinct, method_options={"alpha": 0.01} if method == "craft" else {})
        trainer = Trainer(config, tmp_path / name, progress=False)
        try:
            trainer.train()
            weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        finally:
            trainer.close()
        return numeric_metrics(tmp_path / name / METRICS_FILE), weights, forward_rows

    plain, plain_weights, plain_rows = run("plain", False)
    deduped, deduped_weights, deduped_rows = run("distinct", True)
    assert sum(deduped_rows) < sum(plain_rows), (deduped_rows, plain_rows)  # there were repeats, and they were skipped
    pd.testing.assert_frame_equal(deduped, plain, check_exact=False, rtol=1e-4, atol=1e-6)
    # AdamW's first step moves a weight by about lr = 1e-2 whatever its gradient's size, so where a gradient is
    # near zero, rounding can move it by more than its own size: 1e-4 still tells a wrong gradient apart.
    for key, value in plain_weights.items():
        torch.testing.assert_close(deduped_weights[key], value, rtol=1e-4, atol=1e-4)
