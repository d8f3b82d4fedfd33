"""`python -m craft_bench.bench train`: one full training step of the embedded default timed phase by phase, each
phase's tokens/s against this machine's plain forward(+backward) throughput of the same model, and TRL's GRPOTrainer
beside craft-bench's `grpo` on the same model, batch and a single-turn task.

Phases come from the trainer's own `time/*` metrics (generation, env, scoring of θ_old + teacher + reference,
update); the tokens each phase processes are counted by wrapping the scoring function and the engine's `generate`
for the timed step only (counting changes no result). One warm-up step (worker start-up, first-call overheads) runs
before the timed one. The limits are measured on the timed step's own update rows: a plain `model(ids).loss`
forward through the transformer (LM head on the last position only), and forward + backward, over the same
micro-batches; a phase near 100% of its limit has nothing left to gain but fewer or shorter sequences. Generation
runs with a KV cache and counts prompt + new tokens, so it can exceed the forward limit.

The TRL comparison (optional `bench` extra: `pip install craft-bench[bench]`) plays the first turn of B training tasks
as a single-turn task (reward: the reply is the expert's first action), G completions each, one update, with
`GRPOTrainer` (β = 0, one iteration, CPU) and with craft-bench's `grpo` at `max_turns=1`; both time one step after a
warm-up step and report the median step time over `--repeat` timed steps (a single-turn step takes a second or two,
so one step's time is mostly noise on a shared machine). Both get the same `--train-dtype` (TRL's `bf16`, the
Trainer's CPU autocast) and `--attn`. If TRL is missing or fails, the table says so and why.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from craft_bench.agents import rollout as rollout_module
from craft_bench.agents import trainer as trainer_module
from craft_bench.agents.engine import distinct_rows
from craft_bench.agents.presets import preset_values
from craft_bench.agents.trainer import METRICS_FILE, TrainConfig, Trainer

#: Phases of a step, as (label, metrics.csv column, which limit applies: fwd or fwd+bwd).
PHASES = (
    ("generation", "time/generate_s", "fwd"),
    ("env", "time/env_s", None),
    ("scoring (θ_old + teacher + ref)", "time/score_s", "fwd"),
    ("update", "time/update_s", "fwd+bwd"),
)


@dataclass
class TokenCounts:
    """Tokens processed per phase during the counted step (prompt + response tokens of every scored row)."""

    generate_prompt: int = 0
    generate_new: int = 0
    score: int = 0
    update: int = 0
    update_rows: list[tuple[list[int], list[int]]] = field(default_factory=list)


@contextlib.contextmanager
def count_tokens(trainer: Trainer, counts: TokenCounts) -> Iterator[None]:
    """Count what the trainer processes: scoring calls without grad are `score`, with grad `update`; generate calls
    count prompt and new tokens. Restores every wrapped function on exit."""
    originals: list[tuple[Any, str, Any]] = []

    def wrap_scoring(module: Any) -> None:
        original = getattr(module, "response_logprobs", None)
        if original is None:
            return

        def counted(model, prompts, responses, *args, **kwargs):
            processed = list(zip(prompts, responses))
            if kwargs.get("distinct"):  # only the distinct rows go through the model
                processed = [processed[i] for i in distinct_rows(prompts, responses)[0]]
            tokens = sum(len(p) + len(r) for p, r in processed)
            if torch.is_grad_enabled():
                counts.update += tokens
                counts.update_rows.extend((list(p), list(r)) for p, r in processed)
            else:
                counts.score += tokens
            return original(model, prompts, responses, *args, **kwargs)

        originals.append((module, "response_logprobs", original))
        module.response_logprobs = counted

    for module in (trainer_module, rollout_module):
        wrap_scoring(module)
    engine = trainer.policy.engine
    generate = engine.generate

    def counted_generate(prompt_ids, sampling, seeds, *args, **kwargs):
        out = generate(prompt_ids, sampling, seeds, *args, **kwargs)
        counts.generate_prompt += sum(len(p) for p in prompt_ids)
        counts.generate_new += sum(len(g.token_ids) for g in out)
        return out

    engine.generate = counted_generate
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
        engine.generate = generate


def plain_throughput(model: torch.nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_id: int,
                     micro_batch: int, backward: bool) -> float:
    """Tokens/s of a plain forward (or forward + backward of a scalar of the last logits) over `rows` (prompt +
    response, right padded, `micro_batch` rows per pass); pad tokens are not counted."""
    sequences = [p + r for p, r in rows]
    tokens = sum(len(s) for s in sequences)
    model.train(backward)
    tick = time.perf_counter()
    for start in range(0, len(sequences), micro_batch):
        chunk = sequences[start:start + micro_batch]
        width = max(len(s) for s in chunk)
        ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in chunk])
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in chunk])
        with torch.set_grad_enabled(backward):
            # Every token through the transformer, the LM head on the last position only: the trainer's scoring also
            # keeps only response positions for the head, so a full-vocabulary head everywhere would be no limit.
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits
            loss = logits.float().logsumexp(-1).mean()
            if backward:
                loss.backward()
    elapsed = time.perf_counter() - tick
    model.zero_grad(set_to_none=True)
    model.eval()
    return tokens / elapsed


def timed_step(config: TrainConfig, run_dir: Path, timed_steps: int = 1,
               measure_limits: bool = True) -> tuple[dict[str, float], TokenCounts, dict[str, float], Trainer]:
    """Warm-up step 0, then `timed_steps` steps, the last one counted; returns the last step's metrics row, its token
    counts and the plain limits (empty without `measure_limits`); every step's row is in run_dir's metrics.csv."""
    trainer = Trainer(config, run_dir, progress=False)
    counts = TokenCounts()
    train_step = trainer.train_step

    def count_last_step_only(step: int) -> dict[str, float]:
        if step == timed_steps:  # earlier steps' counts are dropped: the table counts the last step only
            vars(counts).update(vars(TokenCounts()))
        return train_step(step)

    try:
        # One run, so that the warm-up step does for the timed one what any step does for the next (reset_ahead
        # starts its resets), and nothing runs in the background once the last timed step is done.
        trainer.config.steps = 1 + timed_steps
        trainer.train_step = count_last_step_only  # type: ignore[method-assign]
        with count_tokens(trainer, counts):
            trainer.train()
        row = pd.read_csv(run_dir / METRICS_FILE).iloc[-1].to_dict()
        limits = {}
        if measure_limits:
            with trainer._train_precision():  # the limit at the step's own compute dtype
                limits = {kind: plain_throughput(trainer.model, counts.update_rows, trainer.pad_id,
                                                 config.micro_batch_rows, backward)
                          for kind, backward in (("fwd", False), ("fwd+bwd", True))}
    finally:
        trainer.close()
    return row, counts, limits, trainer


def phase_table(row: dict[str, float], counts: TokenCounts, limits: dict[str, float]) -> list[str]:
    """The markdown rows of the phase table."""
    tokens = {
        "time/generate_s": counts.generate_prompt + counts.generate_new,
        "time/env_s": None,
        "time/score_s": counts.score,
        "time/update_s": counts.update,
    }
    lines = ["| phase | seconds | share of step | tokens | tokens/s | % of plain limit |", "|---|---|---|---|---|---|"]
    step_s = float(row.get("time/step_s", math.nan))
    for label, column, limit in PHASES:
        seconds = float(row.get(column, math.nan))
        n = tokens[column]
        rate = n / seconds if n is not None and seconds > 0 else math.nan
        share = f"{seconds / step_s:.0%}" if step_s > 0 else "n/a"
        percent = f"{rate / limits[limit]:.0%} of {limit}" if limit and not math.isnan(rate) else "-"
        lines.append(f"| {label} | {seconds:.3f} | {share} | {n if n is not None else '-'} | "
                     f"{'-' if math.isnan(rate) else f'{rate:,.0f}'} | {percent} |")
    lines.append(f"| whole step | {step_s:.3f} | 100% | {counts.generate_prompt + counts.generate_new + counts.score + counts.update} | - | - |")
    lines.append(f"| limit: plain forward | - | - | - | {limits['fwd']:,.0f} | 100% |")
    lines.append(f"| limit: plain forward + backward | - | - | - | {limits['fwd+bwd']:,.0f} | 100% |")
    return lines


# ---------------------------------------------------------------------------------------------------- TRL
def single_turn_prompts(config: TrainConfig, tokenizer, n_tasks: int) -> list[dict[str, str]]:
    """The first turn of the first `n_tasks` training tasks as text prompts with the expert's first action."""
    import gymnasium as gym

    from craft_bench.agents.prompts import PromptConfig, format_prompt, student_text

    env_kwargs = {**config.env_kwargs, **config.train_env_kwargs, "split": config.train_split, "max_steps": 1}
    env = gym.make(config.env_id, **env_kwargs)
    rows = []
    try:
        for index in range(n_tasks):
            obs, info = env.reset(seed=config.seed, options={"task_index": index})
            text = student_text(info["goal"], [], obs, info["admissible_actions"], PromptConfig(config.history_turns),
                                info.get("action_format"))
            plan = info["privileged"]["expert_plan"]
            rows.append({"prompt": format_prompt(tokenizer, text, info.get("action_format")),
                         "expert": plan[0] if plan else ""})
    finally:
        env.close()
    return rows


@contextlib.contextmanager
def _without_trl_deprecation_warnings() -> Iterator[None]:
    """TRL 1.16 calls transformers' deprecated `gradient_checkpointing` names (FutureWarnings that are TRL's, not
    craft-bench's); the comparison hides those and no other warning."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*deprecated", category=FutureWarning)
        yield


def trl_step(model_path: str, config: TrainConfig, run_dir: Path, repeat: int = 1) -> dict[str, Any]:
    """One warm-up and `repeat` timed GRPOTrainer steps on the single-turn task (their median); raises ImportError
    without TRL."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from craft_bench.agents.policy import stop_token_ids
    from craft_bench.agents.prompts import parse_action, uses_chat_template
    from craft_bench.envs.base import normalize_action

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    if config.attn_implementation is not None:  # the same attention kernel as craft-bench's step
        model.set_attn_implementation(config.attn_implementation)
    chat = uses_chat_template(tokenizer)
    rows = single_turn_prompts(config, tokenizer, config.tasks_per_step)
    expert = {r["prompt"]: r["expert"] for r in rows}

    def reward(prompts, completions, **kwargs):
        return [float(normalize_action(parse_action(c, chat) or "") == normalize_action(expert[p]))
                for p, c in zip(prompts, completions)]

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.tick = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.tick)

    batch = config.tasks_per_step * config.group_size
    with _without_trl_deprecation_warnings():
        args = GRPOConfig(
            output_dir=str(run_dir), per_device_train_batch_size=batch, num_generations=config.group_size,
            max_completion_length=config.max_new_tokens, max_steps=1 + repeat, learning_rate=config.lr, beta=0.0,
            num_iterations=1, temperature=config.temperature, use_cpu=True, report_to="none",
            # bf16 on CPU is the Trainer's autocast, as craft-bench's train_dtype="bfloat16" is.
            bf16=config.train_dtype == "bfloat16",
            logging_steps=1000, save_strategy="no", seed=config.seed, disable_tqdm=True,
            # The same stop rule as craft-bench's policy (EOS, and newlines in the plain format), so both generate
            # replies of the same length.
            generation_kwargs={"eos_token_id": stop_token_ids(tokenizer, chat)},
        )
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in rows] * (1 + repeat))
    # TRL prints its log dicts with tqdm disabled.
    with _without_trl_deprecation_warnings(), contextlib.redirect_stdout(io.StringIO()):
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        trainer.train()
    return {"step_s": statistics.median(times[1:])}


def craft_single_turn(config: TrainConfig, run_dir: Path, repeat: int = 1) -> dict[str, Any]:
    """craft-bench's grpo on the same single-turn shape: max_turns=1, B x G episodes, one update; after the warm-up
    step, the median of `repeat` timed steps (step time, and its env time)."""
    single = TrainConfig(**{**config.__dict__, "method": "grpo", "method_options": {}, "max_turns": 1})
    timed_step(single, run_dir, timed_steps=repeat, measure_limits=False)  # the limits are the phase table's
    rows = pd.read_csv(run_dir / METRICS_FILE).iloc[1:]
    return {"step_s": float(rows["time/step_s"].median()), "env_s": float(rows["time/env_s"].median()),
            "update_s": [float(s) for s in rows["time/update_s"]]}


# ---------------------------------------------------------------------------------------------------- main
AGAINST_COLUMNS = ("generation", "env", "scoring (θ_old + teacher + ref)", "update", "whole step")


def time_revision(revision: str, common: list[str]) -> dict[str, float]:
    """Seconds per phase of the same benchmark run by the code of git revision `revision` (extracted with `git
    archive` into a temporary directory, imported from there in a subprocess); the values of its phase table."""
    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory() as tmp:
        source, shim = Path(tmp) / "source", Path(tmp) / "shim"
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(root), "archive", revision], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
        # The installed layout (pyproject's package-dir): craft_bench/ with agents/ and envs/ inside it.
        package = shim / "craft_bench"
        package.mkdir(parents=True)
        for entry in (source / "craft_bench").iterdir():
            (package / entry.name).symlink_to(entry)
        for name in ("agents", "envs"):
            (package / name).symlink_to(source / name)
        environment = {**os.environ, "PYTHONPATH": str(shim)}
        done = subprocess.run([sys.executable, "-m", "craft_bench.bench", "train", "--no-trl", *common], cwd=shim,
                              env=environment, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the benchmark at {revision} failed:\n{done.stderr[-3000:]}")
    phases = {}
    for line in done.stdout.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in AGAINST_COLUMNS:
            try:
                phases[cells[0]] = float(cells[1])
            except ValueError:
                continue
    return phases


def ddp_step_seconds(processes: int, run_args: list[str], out: Path, threads: int, workers: int) -> float:
    """Seconds of the second training step (the first warms up) of `python -m craft_bench.run` launched by torchrun
    with `processes` gloo ranks (one process: plain python), read from rank 0's metrics.csv `time/step_s`. Each rank
    gets threads / processes torch threads and workers / processes env workers, so N ranks share the cores one
    process would use."""
    per_rank_threads = max(1, threads // processes)
    command = ["-m", "craft_bench.run", *run_args, "--out", str(out), "--no-progress",
               "--num-workers", str(workers // processes),
               "--set", f"torch_threads={per_rank_threads}", "--set", f"rollout_threads={per_rank_threads}"]
    if processes > 1:
        with socket.socket() as sock:  # a free port for the rendezvous
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr", "127.0.0.1",
                   "--master_port", str(port), *command]
    environment = {**os.environ, "OMP_NUM_THREADS": str(per_rank_threads)}
    environment.pop("WORLD_SIZE", None)
    done = subprocess.run([sys.executable, *command], env=environment, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {processes}-process run failed:\n{done.stderr[-3000:]}")
    (metrics,) = list(out.glob(f"*/{METRICS_FILE}"))
    return float(pd.read_csv(metrics)["time/step_s"].iloc[-1])


def ddp_table(args: argparse.Namespace) -> list[str]:
    """`--processes N`: the same two-step run with 1 process and with N data-parallel processes (torchrun, gloo),
    one after the other in this run; the timed step's seconds and the ratio N-process / 1-process."""
    run_args = ["--method", args.method, "--model", args.model, "--env", args.env, "--steps", "2",
                "--seeds", str(args.seed),
                "--set", f"env_kwargs={args.env_kwargs}", "--set", f"tiny_budget={json.dumps(args.budget)}",
                "--set", f"tasks_per_step={args.tasks}", "--set", f"group_size={args.group_size}",
                "--set", f"max_turns={args.max_turns}", "--set", f"max_new_tokens={args.max_new_tokens}",
                "--set", f"micro_batch_rows={args.micro_batch_rows}", "--set", f"rollout_waves={args.waves}",
                "--set", f"old_logprobs={json.dumps(args.old_logprobs)}", "--set", "eval_episodes=1"]
    threads = args.threads or torch.get_num_threads()
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, args.processes):
            seconds[processes] = ddp_step_seconds(processes, run_args, Path(tmp) / f"p{processes}", threads, workers)
    n = args.processes
    lines = [(f"data parallel (torchrun, gloo): method {args.method}, B={args.tasks} G={args.group_size} "
              f"turns<={args.max_turns}, the second of two steps; 1 process: {threads} torch threads, {workers} env "
              f"workers; {n} processes: {max(1, threads // n)} torch threads and {workers // n} env workers each"),
             "| processes | s / step | ratio to 1 process |", "|---|---|---|"]
    for processes, value in seconds.items():
        lines.append(f"| {processes} | {value:.3f} | {value / seconds[1]:.2f}x |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    defaults = preset_values("cpu", "grpo")
    defaults = {name: defaults.get(name, getattr(TrainConfig, name, None)) for name in
                ("num_workers", "torch_threads", "rollout_threads", "rollout_waves", "old_logprobs")}
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny (shipped, or built with --budget) | a local path or hub id")
    parser.add_argument("--budget", default="default", help="tiny-model budget: test | smoke | default (the embedded default)")
    parser.add_argument("--env", default="craft/ALFWorldGen-v0", help="env id (the embedded default)")
    parser.add_argument("--env-kwargs", default="{}", help="JSON dict of env kwargs")
    parser.add_argument("--method", default="craft", help="method of the timed step (cpu preset options)")
    parser.add_argument("--tasks", type=int, default=4, help="B: tasks per step")
    parser.add_argument("--group-size", type=int, default=4, help="G: siblings per task")
    parser.add_argument("--max-turns", type=int, default=15)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--micro-batch-rows", type=int, default=64)
    parser.add_argument("--workers", type=int, default=defaults["num_workers"],
                        help="environment worker processes (0: in process)")
    parser.add_argument("--threads", type=int, default=defaults["torch_threads"],
                        help="torch threads of scoring and the update")
    parser.add_argument("--rollout-threads", type=int, default=defaults["rollout_threads"],
                        help="torch threads while rollouts play")
    parser.add_argument("--waves", type=int, default=defaults["rollout_waves"],
                        help="rollout waves (2: env steps of one wave overlap the next wave's generation)")
    parser.add_argument("--old-logprobs", choices=("rescore", "rollout", "auto"), default=defaults["old_logprobs"],
                        help="θ_old's log-probs: scored again, or the sampler's own")
    parser.add_argument("--train-dtype", choices=[*sorted(trainer_module.TRAIN_DTYPES), "auto"], default="float32",
                        help="compute dtype of the step's forward passes (bfloat16: autocast; auto: bfloat16 where "
                             "the CPU multiplies it natively, else float32); the limits use it too")
    parser.add_argument("--attn", default=None, help="attention kernel (TrainConfig.attn_implementation): eager | sdpa")
    parser.add_argument("--reset-ahead", action="store_true",
                        help="reset the next step's games during this step's scoring and update (TrainConfig.reset_ahead)")
    parser.add_argument("--distinct-rows", action="store_true",
                        help="score and update each distinct (prompt, response) row once (TrainConfig.distinct_rows)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL comparison")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed steps of each side of the TRL comparison after its warm-up (the median is "
                             "reported)")
    parser.add_argument("--against", metavar="REV", action="append", default=[],
                        help="also time the same step with the code of git revision REV (e.g. a commit before a "
                             "speed-up), in a subprocess of this run; repeatable")
    parser.add_argument("--against-threads", type=int, default=1, help="torch threads of the --against runs")
    parser.add_argument("--against-workers", type=int, default=1, help="env workers of the --against runs")
    parser.add_argument("--against-args", default="",
                        help="more options of every --against run, as one string (e.g. \"--train-dtype bfloat16 "
                             "--attn eager\"), for revisions whose benchmark has them; by default each revision runs "
                             "its own defaults")
    parser.add_argument("--processes", type=int, default=1,
                        help="N > 1: only time the step with N data-parallel processes (torchrun, gloo) against 1 "
                             "process, both launched from this run, and print their ratio")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.processes > 1:
        print("\n".join(ddp_table(args)))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    values = preset_values("cpu", args.method)
    config = TrainConfig(
        method=args.method, method_options=values.get("method_options", {}), env_id=args.env,
        env_kwargs=json.loads(args.env_kwargs), model=args.model, tiny_budget=args.budget, seed=args.seed, steps=2,
        tasks_per_step=args.tasks, group_size=args.group_size, max_turns=args.max_turns,
        max_new_tokens=args.max_new_tokens, micro_batch_rows=args.micro_batch_rows, num_workers=args.workers,
        eval_episodes=1, checkpoint_every=1000, torch_threads=args.threads, rollout_threads=args.rollout_threads,
        rollout_waves=args.waves, old_logprobs=args.old_logprobs, train_dtype=args.train_dtype,
        attn_implementation=args.attn, reset_ahead=args.reset_ahead, distinct_rows=args.distinct_rows,
    )
    against = {}
    # The --against runs start in a temporary directory: a model given by a relative path must still be found.
    model_for_against = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    common = ["--model", model_for_against, "--budget", args.budget, "--env", args.env, "--env-kwargs", args.env_kwargs,
              "--method", args.method, "--tasks", str(args.tasks), "--group-size", str(args.group_size),
              "--max-turns", str(args.max_turns), "--max-new-tokens", str(args.max_new_tokens),
              "--micro-batch-rows", str(args.micro_batch_rows), "--seed", str(args.seed),
              "--threads", str(args.against_threads), "--workers", str(args.against_workers),
              *shlex.split(args.against_args)]
    for revision in args.against:
        against[revision] = time_revision(revision, common)
    with tempfile.TemporaryDirectory() as tmp:
        row, counts, limits, trainer = timed_step(config, Path(tmp) / "step")
        model_path = str(getattr(trainer.model, "name_or_path", "") or args.model)
        print(f"model: {model_path} ({sum(p.numel() for p in trainer.model.parameters()):,} parameters); "
              f"env: {args.env}; method: {args.method} {json.dumps(config.method_options)}; B={args.tasks} "
              f"G={args.group_size} turns<={args.max_turns} max_new_tokens={args.max_new_tokens}; "
              f"torch threads {args.threads} (rollouts {args.rollout_threads}), env workers {args.workers}, "
              f"rollout waves {args.waves}, old log-probs {config.old_logprobs}, train dtype {config.train_dtype}, "
              f"attention {args.attn or 'default'}, reset ahead {args.reset_ahead}, distinct rows {args.distinct_rows}")
        print(f"timed step: {int(row['rollout/rows'])} rows, {counts.generate_new} generated tokens\n")
        print("\n".join(phase_table(row, counts, limits)))
        print()
        if against:
            print(f"the same step with older code (torch threads {args.against_threads}, env workers "
                  f"{args.against_workers}; each run's own warm-up and timed step, in this run):")
            print("| code | generation | env | scoring | update | whole step | this code's speed-up |")
            print("|---|---|---|---|---|---|---|")
            step_s = float(row["time/step_s"])
            for revision, phases in against.items():
                print(f"| {revision} | " + " | ".join(f"{phases.get(label, math.nan):.3f}" for label in AGAINST_COLUMNS)
                      + f" | {phases.get('whole step', math.nan) / step_s:.2f}x |")
            print("| this code | " + " | ".join(f"{float(row[c]):.3f}" for c in
                  ("time/generate_s", "time/env_s", "time/score_s", "time/update_s", "time/step_s")) + " | 1.00x |")
            print()
        if args.no_trl:
            print("TRL comparison: skipped (--no-trl)")
            return
        craft = craft_single_turn(config, Path(tmp) / "single", args.repeat)
        completions = args.tasks * args.group_size
        craft_line = (f"| craft-bench grpo | {craft['step_s']:.3f} | {craft['step_s'] - craft['env_s']:.3f} | "
                      f"{completions / craft['step_s']:.1f} |")
        try:
            trl = trl_step(model_path, config, Path(tmp) / "trl", args.repeat)
        except Exception as error:  # noqa: BLE001 - any TRL failure is reported; the craft-bench rows stand
            hint = " (`pip install craft-bench[bench]`)" if isinstance(error, ImportError) else ""
            print(f"TRL comparison: skipped, {type(error).__name__}: {str(error)[:300]}{hint}")
            print(craft_line)
            return
        print(f"single-turn GRPO step (B={args.tasks} prompts x G={args.group_size}, max_new_tokens="
              f"{args.max_new_tokens}, one update; TRL scores by a reward function, craft-bench steps its env; "
              f"median of {args.repeat} timed step(s) after a warm-up):")
        print("| trainer | s / step | s / step without env | completions / s |")
        print("|---|---|---|---|")
        print(craft_line)
        print(f"| TRL GRPOTrainer | {trl['step_s']:.3f} | {trl['step_s']:.3f} | {completions / trl['step_s']:.1f} |")
        print(f"throughput ratio craft-bench / TRL: {trl['step_s'] / craft['step_s']:.2f}x with env, "
              f"{trl['step_s'] / max(craft['step_s'] - craft['env_s'], 1e-9):.2f}x without (> 1: craft-bench is faster)")
        if args.reset_ahead and args.repeat > 1:
            # Each step's update shares the cores with the next step's resets, except the last step's: the spread
            # between them is what resets ahead cost the update (docs/benchmarks.md).
            print("craft-bench update per timed step, s: " + ", ".join(f"{s:.3f}" for s in craft["update_s"])
                  + " (the last one has no resets running behind it)")

if __name__ == "__main__":
    main()
