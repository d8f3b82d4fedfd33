"""The training loop of craft-bench: group rollouts, advantages, teacher/reference scoring, loss, update, log, checkpoint.
One loop for every method; a method changes only the loss (agents/methods), and asks only for the scores it needs.

What one step does, top to bottom (CRAFT_SPEC.md section 1-2):
1. sample B training tasks from (seed, step); play G siblings of each on the group runner, one row per turn;
2. returns (`episodes.episode_return`) and the method's group advantages;
3. score the rollout under θ_old (the parameters that sampled it), the teacher (the weights the method's `needs`
   names, on the privileged prompt) and the reference policy, each only if the method needs it, all with the one
   scoring function `engine.response_logprobs` (same batching and padding);
4. `method.prepare` on the whole step (token count, gate, Pillar 1 credit, λ/α in force: all of θ_old, computed once
   per rollout); then `ppo_epochs` passes over mini-batches of `mini_batch_rows` rows, each one optimizer update
   with its own token-mean denominator (loss and backward per micro-batch inside it); then
   `method.end_step(ctx.stats)` (Pillar 2) and an EMA teacher update if asked for;
5. one row of metrics.csv, then an atomic checkpoint: killed at any point and resumed, a CPU run ends with exactly
   the result of an uninterrupted run (every random draw is derived from (seed, step, ...), never from global state).

Defaults give one update per rollout (θ_old = θ at sampling); the paper preset uses verl/SDAR's mini-batches.
Left out: sequence packing; value functions (GRPO needs none).
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from craft_bench.agents import checkpoint as ckpt
from craft_bench.agents import losses as L
from craft_bench.agents import run_files
from craft_bench.agents.distributed import DataParallel
from craft_bench.agents.engine import (
    distinct_rows,
    micro_batch_order,
    pad_columns,
    response_logprobs,
)
from craft_bench.agents.episodes import episode_return, summarize
from craft_bench.agents.methods import Method, combine_metrics, make_method
from craft_bench.agents.policy import Policy, pad_token_id
from craft_bench.agents.precision import emulated_bfloat16_warning, resolve_train_dtype
from craft_bench.agents.rollout import (
    collect_rollouts,
    evaluate_episodes,
    evaluation_task_ids,
    reset_seed,
    score_teacher,
)
from craft_bench.envs.tasks import split_task_ids

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
EVAL_FILE = "eval.csv"
CONFIG_FILE = "config.json"
FINAL_MODEL_DIR = "final_model"
#: train_dtype values and the autocast dtype each means (None: no autocast).
TRAIN_DTYPES: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


@dataclass
class TrainConfig:
    """Every setting of a run. The defaults are the library's: tiny model, generated ALFWorld tasks, the method's
    own option defaults (α = 0 for every method). The CLI's default `--preset cpu` adds α = 0.01 on top, and
    `--preset paper` is SDAR's GPU setting (both in agents/presets.py)."""

    method: str = "craft"
    """Trainer: grpo, opsd, sdar, skill_sd, rlsd, adaptive_cringe or craft (docs/methods.md)."""
    method_options: dict[str, Any] = field(default_factory=dict)
    """Overrides of the method's documented defaults, e.g. {"p1": False, "lam": 0.02}."""
    env_id: str = "craft/ALFWorldGen-v0"
    """Gymnasium id of the environment."""
    env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra constructor arguments of the environment (split and max_steps are set from the fields below)."""
    train_env_kwargs: dict[str, Any] = field(default_factory=dict)
    """Overrides of `env_kwargs` for the training environment only, e.g. `{"n_games": 256}`: RL draws its tasks from a
    larger pool than the evaluation's, and the tiny model is built (and named) from `env_kwargs` alone."""
    train_split: str = "train"
    """Split the training tasks are drawn from."""
    eval_split: str = "valid"
    """Held-out split of the evaluation episodes."""
    model: str = "tiny"
    """A Hugging Face hub id, a local path, or "tiny" (built offline by craft-bench)."""
    tiny_budget: str = "default"
    """With model="tiny": the build budget of agents/tiny/ (`smoke`, `default`, ...). The tiny model is built for
    `env_id` with seed 0, so every run seed starts from the same checkpoint and seeds differ only in RL."""
    seed: int = 0
    """Run seed: task choice, sampling and CRINGE draws are all derived from it."""
    steps: int = 10
    """Training steps (one rollout batch each, and `ppo_epochs` x mini-batches optimizer updates)."""
    tasks_per_step: int = 4
    """B: distinct tasks per step."""
    group_size: int = 4
    """G: sibling episodes per task (the GRPO group)."""
    max_turns: int = 15
    """Environment max_steps: an episode is truncated after this many actions."""
    history_turns: int = 2
    """H: past (observation, action) pairs in the prompt."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts."""
    top_p: float = 1.0
    """Nucleus of training rollouts."""
    max_new_tokens: int = 24
    """Longest reply in tokens."""
    lr: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables it)."""
    ppo_epochs: int = 1
    """Passes over the step's rows per rollout (verl's ppo_epochs)."""
    mini_batch_rows: int | None = None
    """Rows per optimizer update (verl/SDAR's ppo_mini_batch_size, counted in rows = turns); None: the whole step,
    one update per epoch. Each mini-batch's token mean divides by its own valid-token count."""
    micro_batch_rows: int = 64
    """Rows per forward/backward pass inside a mini-batch: the memory knob; the loss does not depend on it."""
    success_reward: float = 10.0
    """Return of a won episode."""
    invalid_penalty: float = 0.1
    """Return penalty per invalid action."""
    progress_reward: float = 0.0
    """Reward shaping, off by default: the return gains progress_reward x the episode's final progress in [0, 1] (the
    env's `info["progress"]`; ALFWorld: the share of the expert plan done). Unlike the 0/1 win it differs between
    siblings of almost every group, so GRPO has a signal when no sibling wins. The return is no longer the paper's."""
    ema_decay: float = 0.99
    """EMA decay of the teacher when the method's `teacher` option is "ema" (its options: "old", the sampling
    policy, the default; "ref", the initial weights; "ema", an EMA of θ)."""
    eval_episodes: int = 48
    """Evaluation tasks: N tasks evenly spread over the sorted held-out split (all of them when it holds fewer)."""
    eval_samples: int = 1
    """Episodes sampled per evaluation task (sibling draws, as a GRPO group's): the row averages over eval_episodes x
    eval_samples episodes. Sampling each task several times shrinks the evaluation's sampling noise, which at
    temperature 1 and a 10% success rate hides differences of a few points (README, "Learning on the embedded
    default"); with greedy evaluation the samples are identical, so leave it at 1 there."""
    eval_temperature: float = 0.0
    """Evaluation temperature (0 = greedy)."""
    num_workers: int | None = None
    """Environment worker processes (default: the number of cores; with env_workers="ray", the cluster's CPUs)."""
    env_workers: str = "local"
    """Where environment workers run: "local" processes, "ray" actors (extra `ray`), or "inprocess" (debugging).
    Results do not depend on it."""
    ray_address: str | None = None
    """With env_workers="ray": None starts or joins a local Ray, "auto" or "ray://host:10001" joins a cluster."""
    engine: str = "hf"
    """Rollout engine: "hf" (the trainer's own model) or "vllm" (extra `vllm`; weights synced after every step).
    Teacher, reference and θ_old scoring always run on the trainer's model."""
    vllm_options: dict[str, Any] = field(default_factory=dict)
    """With engine="vllm": overrides of agents.vllm_engine.VLLMConfig (gpu_memory_utilization, tensor_parallel_size,
    max_num_batched_tokens, sleep_between_rollouts, ...)."""
    old_logprobs: str = "rescore"
    """Where θ_old's log-probs come from. "rescore": the rollout's rows scored again by `response_logprobs`, as verl
    computes old_log_prob. "rollout": the sampler's own log-probs, made by the same weights during generation, so
    the same numbers up to float rounding between the cached and the full forward pass; it saves a forward pass
    over every prompt. Needs engine="hf", temperature=1 and top_p=1 (otherwise the sampler's distribution is not π).
    "auto" (the CPU preset's choice) becomes "rollout" where that is allowed, else "rescore", when the config is made."""
    rollout_waves: int = 1
    """The step's episodes split into this many waves that take turns: while the env workers step one wave, the
    policy samples the replies of the next, so env stepping and generation overlap (2 on a 2-core machine). Sampled
    tokens depend on it only through float rounding of batched generation (which rows share a forward pass)."""
    torch_threads: int | None = None
    """torch threads for scoring and the update (None: torch's setting when the trainer starts, by default one per
    physical core)."""
    rollout_threads: int | None = None
    """torch threads while rollouts play (None: as torch_threads); with local env workers stepping at the same time,
    fewer threads than cores avoids oversubscribing the cores."""
    reset_ahead: bool = False
    """Reset the next step's games in the env workers while this step scores and updates (a background thread waits
    on them), so the next rollout starts without waiting for its resets. The same resets with the same seeds: results
    do not change. It pays when a core is free for the env workers during the update (torch_threads below the
    cores); docs/benchmarks.md has the measurement."""
    distinct_rows: bool = False
    """Score and update each distinct (prompt, response) row once: rows that repeat one (GRPO siblings share their
    first prompt, and often their first replies and the turns after) share its forward pass, and the loss still counts
    every row, so the gradient is the same sum. The θ_old, teacher and reference scores and the update's forward skip
    the repeats (18% of the tokens in the ALFWorldGen step docs/benchmarks.md times); results change by float
    rounding only (which rows share a forward pass)."""
    train_dtype: str = "float32"
    """Compute dtype of training's forward passes (rollout generation, θ_old/teacher/reference scoring, the update's
    forward): "float32", or "bfloat16" (torch.autocast: matmuls and attention in bfloat16; weights, gradients,
    optimizer state and every log-softmax stay float32), as verl and TRL train. A speed option that changes results
    beyond float rounding (sampled tokens differ), so a run records it; evaluation always runs in float32,
    so a bfloat16 run stands beside the same `base` row. On CPU it pays only with bfloat16 matmul instructions
    (AVX512-BF16, AMX) and a model wide enough for its matmuls to outweigh autocast's casts; without them torch
    emulates bfloat16 and the step is many times slower (12x measured): docs/benchmarks.md has the measurements.
    "auto" (the CPU preset's choice) becomes "bfloat16" where the device multiplies bfloat16 natively, else
    "float32", when the config is made (`agents.precision`)."""
    attn_implementation: str | None = None
    """Attention kernel of the policy (and of its reference and EMA copies), set after loading with transformers'
    `set_attn_implementation`: None keeps the model's own (sdpa by default), or "eager", "sdpa", ... Every kernel
    computes exact attention, so results change by float rounding only. On this project's CPU, "eager" made the
    step faster at train_dtype="bfloat16" and slightly slower at float32 (docs/benchmarks.md)."""
    device: str = "cpu"
    """torch device of the policy."""
    checkpoint_every: int = 1
    """Steps between checkpoints (1: a kill loses no finished step)."""
    on_nonfinite: str = "stop"
    """A NaN or inf loss or gradient: "stop" raises at that step (the last good checkpoint is kept), "skip" drops
    that optimizer update and counts it in optim/skipped_updates."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps",):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("tasks_per_step", "group_size", "max_turns", "max_new_tokens", "micro_batch_rows", "checkpoint_every", "eval_episodes", "eval_samples", "ppo_epochs"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mini_batch_rows is not None and self.mini_batch_rows < 1:
            problems.append(f"mini_batch_rows must be >= 1 or None, got {self.mini_batch_rows}")
        if not 0 <= self.ema_decay < 1:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if self.engine not in ("hf", "vllm"):
            problems.append(f"engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.env_workers not in ("local", "ray", "inprocess"):
            problems.append(f"env_workers must be 'local', 'ray' or 'inprocess', got {self.env_workers!r}")
        if self.on_nonfinite not in ("stop", "skip"):
            problems.append(f"on_nonfinite must be 'stop' or 'skip', got {self.on_nonfinite!r}")
        if self.old_logprobs == "auto":  # resolved here, so the config (and its identity) records what was done
            self.old_logprobs = "rollout" if self.sampler_is_policy else "rescore"
        if self.old_logprobs not in ("rescore", "rollout"):
            problems.append(f"old_logprobs must be 'rescore', 'rollout' or 'auto', got {self.old_logprobs!r}")
        elif self.old_logprobs == "rollout" and not self.sampler_is_policy:
            problems.append(
                "old_logprobs='rollout' needs engine='hf', temperature=1 and top_p=1 (the sampler's log-probs are then "
                f"π_θ_old's own); got engine={self.engine!r}, temperature={self.temperature}, top_p={self.top_p}: "
                "use old_logprobs='rescore'"
            )
        for name in ("env_kwargs", "train_env_kwargs"):
            reserved = sorted({"split", "max_steps"} & set(getattr(self, name)))
            if reserved:
                problems.append(f"{name} may not set {reserved}: the split comes from train_split / eval_split and "
                                "max_steps from max_turns")
        kernel = self.attn_implementation
        if kernel is not None and (not isinstance(kernel, str) or not kernel):
            problems.append(f"attn_implementation must be None or a kernel name such as 'eager', got {kernel!r}")
        # "auto" is resolved here, as old_logprobs is: the config records the dtype it trains in.
        self.train_dtype = resolve_train_dtype(self.train_dtype, self.device)
        if self.train_dtype not in TRAIN_DTYPES:
            problems.append(f"train_dtype must be one of {sorted(TRAIN_DTYPES)} or 'auto', got {self.train_dtype!r}")
        if self.rollout_waves < 1:
            problems.append(f"rollout_waves must be >= 1, got {self.rollout_waves}")
        for name in ("torch_threads", "rollout_threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 or None, got {getattr(self, name)}")
        if problems:
            raise ValueError("invalid TrainConfig: " + "; ".join(problems))

    @property
    def sampler_is_policy(self) -> bool:
        """Whether training samples come from π_θ itself (engine hf, temperature 1, top_p 1), so that the sampler's
        log-probs are θ_old's."""
        return self.engine == "hf" and self.temperature == 1.0 and self.top_p == 1.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a dict (e.g. config.json), rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


@dataclass
class TrainState:
    """What a checkpoint restores."""

    step: int = 0
    """Steps finished."""
    wall_clock_s: float = 0.0
    """Training time spent so far, across resumes."""
    env_steps: int = 0
    env_time_s: float = 0.0
    world_size: int = 1
    """Data-parallel processes that made the checkpoint: a resume must use as many (batched sampling rounds
    differently with another split of the groups, so the continuation would not be the same run)."""


class Trainer:
    """Owns the policy, optimizer, method and environment runners of one run directory."""

    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        progress: bool = True,
        loggers: list | None = None,
        data_parallel: DataParallel | None = None,
    ):
        # Data parallel (agents/distributed.py): each rank plays a block of whole groups; rank 0 writes the files.
        self.dp = data_parallel or DataParallel()
        self.dp.check_groups(config.tasks_per_step)
        self.config = config
        slow_dtype = emulated_bfloat16_warning(config.train_dtype, config.device)
        if slow_dtype:  # said once per run, before hours go into a step that bfloat16 emulation makes 12x slower
            warnings.warn(slow_dtype, stacklevel=2)
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.progress = progress
        self.loggers = list(loggers or [])
        self.method: Method = make_method(config.method, **config.method_options)
        tiny_options = (
            {"env_id": config.env_id, "env_kwargs": config.env_kwargs, "budget": config.tiny_budget, "progress": progress}
            if config.model == "tiny" else None
        )
        self.policy = Policy.from_pretrained(config.model, device=config.device, tiny_options=tiny_options)
        self.model: torch.nn.Module = self.policy.engine.model  # type: ignore[attr-defined]
        if config.attn_implementation is not None:  # before the frozen copies below, which inherit it
            self.model.set_attn_implementation(config.attn_implementation)
        self.pad_id = pad_token_id(self.policy.tokenizer)
        self.torch_threads = config.torch_threads or torch.get_num_threads()
        self.rollout_threads = config.rollout_threads or self.torch_threads
        # vLLM samples the rollouts (and evaluation episodes); every score and the update stay on self.model.
        self.vllm = None
        if config.engine == "vllm":
            from craft_bench.agents import tiny
            from craft_bench.agents.models import resolve_model_source
            from craft_bench.agents.vllm_engine import VLLMConfig, VLLMEngine

            source = tiny.tiny_model_path(**tiny_options) if config.model == "tiny" else resolve_model_source(config.model)
            self.vllm = VLLMEngine(source, VLLMConfig(**config.vllm_options))
            self.policy.engine = self.vllm
        needs = self.method.needs
        # Which weights teach is the method's record of needs (from its `teacher` option); None: no teacher pass.
        self.teacher = needs.teacher
        self.reference = _frozen_copy(self.model) if (needs.reference or self.teacher == "ref") else None
        self.ema = _frozen_copy(self.model) if self.teacher == "ema" else None
        # The differentiable forward goes through the DDP wrapper (gradients averaged over ranks) or, under FSDP2, a
        # sharded copy; sampling and the no-grad scores use the model itself, which every rank holds whole.
        self.train_model = self.dp.prepare_model(self.model)
        self.optimizer = torch.optim.AdamW(self.train_model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.state = TrainState(world_size=self.dp.world_size)
        # Evaluation (like the tiny model) sees env_kwargs; the training env may widen its pool (train_env_kwargs).
        self._eval_env_kwargs = {**config.env_kwargs, "max_steps": config.max_turns}
        self._train_env_kwargs = {**self._eval_env_kwargs, **config.train_env_kwargs}
        self._train_runner: Any = None  # a GroupRunner, started on first use: an evaluation never pays for its workers
        # reset_ahead: (step, future of the train runner's reset for that step), started during the step before.
        self._reset_ahead: tuple[int, Future] | None = None
        self._reset_executor: ThreadPoolExecutor | None = None
        self._eval_runner = None  # started on first evaluation: a training-only process never pays for its workers
        self.eval_info: dict[str, Any] | None = None  # info of the first evaluation episode, set by evaluate()
        self.train_tasks = split_task_ids(config.env_id, config.train_split, self._train_env_kwargs)
        # The protocol's fixed episode list: evenly spread over the sorted split, so every task type is represented.
        self.eval_tasks = evaluation_task_ids(split_task_ids(config.env_id, config.eval_split, self._eval_env_kwargs),
                                              config.eval_episodes)
        if len(self.train_tasks) < config.tasks_per_step:
            raise ValueError(
                f"split {config.train_split!r} of {config.env_id} has {len(self.train_tasks)} tasks, fewer than "
                f"tasks_per_step={config.tasks_per_step}"
            )

    # ------------------------------------------------------------------------------------------------ the loop
    def train(self) -> TrainState:
        """Run the remaining steps; every finished step is in metrics.csv and the checkpoint."""
        config = self.config
        start = self.state.step
        steps = range(start, config.steps)
        bar = _progress(steps, desc=f"train {config.method} seed {config.seed}", enabled=self.progress, initial=start, total=config.steps)
        for step in bar:
            tick = time.perf_counter()
            row = self.train_step(step)
            self.state.step = step + 1
            self.state.wall_clock_s += time.perf_counter() - tick
            row["time/step_s"] = time.perf_counter() - tick
            # Every rank holds the same weights, optimizer and method state after a step: rank 0 writes them.
            if self.dp.is_main:
                self._append_metrics(row)
                if self.state.step % config.checkpoint_every == 0 or self.state.step == config.steps:
                    self.save_checkpoint()
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(success=f"{row['env/success']:.2f}", loss=f"{row.get('loss/total', float('nan')):.3f}")
        return self.state

    def train_step(self, step: int) -> dict[str, float]:
        """One rollout batch, `ppo_epochs` x mini-batches optimizer updates; returns the step's metrics row."""
        with torch_threads(self.torch_threads):
            return self._train_step(step)

    def _train_step(self, step: int) -> dict[str, float]:
        config, method, model = self.config, self.method, self.model
        needs = method.needs
        # 1. Rollouts: B tasks drawn from (seed, step) only, so a resumed run draws the same ones; this rank plays
        #    its block of whole groups, numbered as in the whole step.
        tasks, block = self._step_tasks(step)
        sampling = self.policy.sampling(config.temperature, config.top_p, config.max_new_tokens)
        reset = self._take_reset_ahead(step)
        with torch_threads(self.rollout_threads), self._train_precision():
            rollout = collect_rollouts(
                self.train_runner, self.policy, tasks, config.group_size, sampling=sampling,
                seed=config.seed, step=step, history_turns=config.history_turns, with_teacher=needs.teacher is not None,
                first_group=block.start, waves=config.rollout_waves, reset=reset,
            )
        if config.reset_ahead and step + 1 < config.steps:
            self._start_reset_ahead(step + 1)
        if self.vllm is not None:
            self.vllm.sleep()  # frees the accelerator for the update when sleep mode is on; a no-op otherwise
        # 2. Returns and GRPO advantages, per episode, then broadcast to every turn of the episode.
        episodes = rollout.episodes
        returns = L.episode_returns(
            torch.tensor([e.won for e in episodes]), torch.tensor([e.n_invalid for e in episodes]),
            config.success_reward, config.invalid_penalty,
            torch.tensor([float(e.progress) for e in episodes]), config.progress_reward,
        )
        episode_adv = method.advantages(returns, torch.tensor([e.group_id for e in episodes]))
        tensors = rollout.to_tensors()
        prompts = [r.prompt_ids for r in rollout.rows]
        responses = [r.response_ids for r in rollout.rows]

        # 3. Scores of θ_old, the teacher and the reference, all by response_logprobs in micro-batches of
        #    micro_batch_rows, so Δ = lp_T - lp_old subtracts numbers made the same way (or θ_old's from the sampler).
        tick = time.perf_counter()
        model.eval()
        with torch.no_grad(), self._train_precision():
            if config.old_logprobs == "rollout":
                old_logp, mask = tensors.sampler_logp, tensors.response_mask
            else:
                old_logp, mask = response_logprobs(model, prompts, responses, pad_token_id=self.pad_id,
                                                   micro_batch=config.micro_batch_rows, distinct=config.distinct_rows)
            teacher_logp = None
            if needs.teacher is not None:
                teacher = {"old": model, "ref": self.reference, "ema": self.ema}[needs.teacher]
                teacher_logp = score_teacher(teacher, rollout, pad_token_id=self.pad_id, micro_batch=config.micro_batch_rows,
                                             distinct=config.distinct_rows)
            ref_logp = None
            if needs.reference:
                ref_logp, _ = response_logprobs(self.reference, prompts, responses, pad_token_id=self.pad_id,
                                                micro_batch=config.micro_batch_rows, distinct=config.distinct_rows)
        score_s = time.perf_counter() - tick
        full = L.TokenBatch(
            logp=None, old_logp=old_logp, ref_logp=ref_logp, teacher_logp=teacher_logp, mask=mask,
            advantages=episode_adv[tensors.episode_id - block.start * config.group_size], group_id=tensors.group_id,
            episode_id=tensors.episode_id,
            turn_idx=tensors.turn_idx, tokens=tensors.response_ids if needs.tokens else None,
        )

        # 4. Everything of θ_old once (gate, credit, λ/α), then the updates: mini-batches of rows in order, each with
        #    its own token-mean denominator; micro-batches inside a mini-batch only bound memory.
        tick = time.perf_counter()
        ctx = method.prepare(full, step=step, reduce=self.dp.sum)
        model.train()
        self.train_model.train()
        width = mask.shape[1]
        # Mini-batches are global (agents/distributed.py): this rank's rows of each, possibly none, so every rank
        # takes part in the same updates and N processes cut the step as one process does.
        mini_parts = self.dp.mini_batch_parts(full.rows, config.mini_batch_rows)
        updates: list[dict[str, float]] = []
        grad_norms: list[float] = []
        skipped = 0
        for _epoch in range(config.ppo_epochs):
            for part in mini_parts:
                start, stop = part.start, part.stop
                (n_update,) = self.dp.sum([float(mask[start:stop].sum())])
                update_ctx = ctx.with_tokens(n_update)
                self.optimizer.zero_grad(set_to_none=True)
                parts, losses = [], []
                # Micro-batches of rows of similar lengths (less padding); the token mean's denominator is the
                # mini-batch's, so the loss does not depend on how its rows are grouped.
                idle = start == stop  # no row of this mini-batch here: a stand-in row with a zero loss joins the sync
                # The rows that go through the model: each distinct one once with distinct_rows, else every row.
                # `repeats[k]` lists the mini-batch rows that take forward row k's log-probs.
                if config.distinct_rows and not idle:
                    firsts, inverse = distinct_rows(prompts[start:stop], responses[start:stop])
                else:
                    firsts, inverse = list(range(stop - start)), list(range(stop - start))
                repeats: list[list[int]] = [[] for _ in firsts]
                for row, first in enumerate(inverse):
                    repeats[first].append(start + row)
                micro_batches = [None] if idle else micro_batch_order(
                    [len(prompts[start + i]) for i in firsts], [len(responses[start + i]) for i in firsts],
                    config.micro_batch_rows,
                )
                if self.dp.sharded:  # every FSDP forward is a collective: as many micro-batches on every rank
                    micro_batches += [None] * (int(self.dp.max(len(micro_batches))) - len(micro_batches))
                for number, chunk in enumerate(micro_batches):
                    stand_in = chunk is None
                    forward = [0] if stand_in else [start + firsts[k] for k in chunk]
                    index = [0] if stand_in else [row for k in chunk for row in repeats[k]]
                    # The forward row of each loss row; None when no row repeats another (the identity).
                    spread = None if len(index) == len(forward) else torch.tensor(
                        [n for n, k in enumerate(chunk) for _ in repeats[k]])
                    rows = torch.tensor(index)
                    # Gradients accumulate locally over a rank's micro-batches; the last one synchronises the ranks.
                    with self._no_sync(last=number == len(micro_batches) - 1):
                        # Autocast covers the model's forward only; the loss is float32 math on float32 log-probs,
                        # and backward runs each op in its forward's dtype.
                        with self._train_precision():
                            scored = response_logprobs(
                                self.train_model, [prompts[i] for i in forward], [responses[i] for i in forward],
                                pad_token_id=self.pad_id, return_logits=needs.logits,
                            )
                        micro = full.select(rows)
                        micro.logp = pad_columns(scored[0] if spread is None else scored[0][spread], width)
                        if needs.logits:
                            micro.logits = pad_columns(scored[2] if spread is None else scored[2][spread], width)
                        loss, metrics = method.loss(micro, update_ctx.select(rows))
                        if stand_in:
                            loss = loss * 0.0
                            metrics = {k: 0.0 if k.startswith("loss/") else v for k, v in metrics.items()}
                        (loss * self.dp.loss_scale).backward()
                    parts.append(metrics)
                    losses.append(loss.detach())
                # The non-finite guard (issue 15 #6), one decision for every rank: "stop" raises here, before this
                # step's metrics row and checkpoint, so the last good checkpoint stays; "skip" drops this update.
                problem = ckpt.nonfinite_problem(step, losses, self.dp.gradient_view(self.train_model))
                (ranks_bad,) = self.dp.sum([float(problem is not None)])
                if not ranks_bad:
                    grad_norms.append(_clip_gradients(self.train_model, config.grad_clip))
                    self.optimizer.step()
                    self.dp.copy_full_weights(self.train_model, model)  # FSDP2: the whole model gets the update
                elif config.on_nonfinite == "stop":
                    raise ckpt.NonFiniteError((problem or f"step {step}: a NaN or inf on another rank") + ckpt.NONFINITE_ADVICE)
                else:
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
                updates.append(combine_metrics(parts))
        metrics = _mean_over_updates(updates)
        if skipped < len(updates):  # a step whose every update was skipped leaves Pillar 2 and the EMA as they were
            method.end_step(ctx.stats)
            if self.ema is not None:
                _ema_update(self.ema, model, config.ema_decay)
        update_s = time.perf_counter() - tick
        sync_s = 0.0
        if self.vllm is not None:  # the next rollout samples from the updated weights, or the run stops
            tick = time.perf_counter()
            self.vllm.sync_weights(model)
            sync_s = time.perf_counter() - tick

        # 5. The metrics row, of the whole step: with several ranks, episodes are gathered and loss shares summed.
        rows_total, tokens_total, env_steps = self.dp.sum([full.rows, float(mask.sum()), rollout.env_steps])
        if self.dp.world_size > 1:
            episodes = [episode for part in self.dp.gather(episodes) for episode in part]
            loss_keys = sorted(key for key in metrics if key.startswith("loss/"))
            metrics.update(zip(loss_keys, self.dp.sum([metrics[key] for key in loss_keys])))
        self.state.env_steps += int(env_steps)
        self.state.env_time_s += rollout.timings["env_s"]
        summary = summarize(episodes, config.success_reward, config.invalid_penalty, config.progress_reward)
        return {
            "step": step,
            "seed": config.seed,
            "env/success": summary.success,
            "env/return_mean": summary.return_mean,
            "env/progress_mean": summary.progress_mean,
            "env/steps_mean": summary.steps_mean,
            "env/invalid_rate": summary.invalid_rate,
            "env/steps_per_s": rollout.env_steps / max(rollout.timings["env_s"], 1e-9),
            "rollout/rows": rows_total,
            "rollout/tokens": tokens_total,
            "rollout/sampler_logp_gap": _sampler_gap(tensors.sampler_logp, old_logp, mask, config.temperature, config.top_p),
            "optim/grad_norm": sum(grad_norms) / len(grad_norms) if grad_norms else math.nan,
            "optim/lr": config.lr,
            "optim/updates": float(len(updates)),
            "optim/skipped_updates": float(skipped),
            **metrics,
            "time/rollout_s": rollout.timings["rollout_s"],
            "time/generate_s": rollout.timings["generate_s"],
            "time/env_s": rollout.timings["env_s"],
            "time/score_s": score_s,
            "time/update_s": update_s,
            "time/sync_s": sync_s,
        }

    def _step_tasks(self, step: int) -> tuple[list[str], range]:
        """This rank's tasks of training step `step` and its block of the step's groups: B tasks drawn from (seed,
        step) only, so a resumed run (and a reset started a step ahead) draws the same ones."""
        rng = np.random.default_rng([self.config.seed, step])
        tasks = [self.train_tasks[i] for i in rng.choice(len(self.train_tasks), self.config.tasks_per_step, replace=False)]
        block = self.dp.group_block(len(tasks))
        return tasks[block.start : block.stop], block

    def _start_reset_ahead(self, step: int) -> None:
        """Start step `step`'s reset of the train runner in a background thread (reset_ahead); the env workers reset
        while this process scores and updates."""
        tasks, block = self._step_tasks(step)
        runner = self.train_runner
        if self._reset_executor is None:
            self._reset_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reset-ahead")
        future = self._reset_executor.submit(runner.reset, tasks, self.config.group_size,
                                             seed=reset_seed(self.config.seed, step), first_group=block.start)
        self._reset_ahead = (step, future)

    def _take_reset_ahead(self, step: int) -> Callable[[], tuple[list, list]] | None:
        """The reset started ahead for `step` (its `result`, which waits and re-raises an env error), or None. A
        reset started for another step is waited for and dropped, so the runner is never used by two threads."""
        if self._reset_ahead is None:
            return None
        ahead, future = self._reset_ahead
        self._reset_ahead = None
        if ahead == step:
            return future.result
        with contextlib.suppress(Exception):  # an unneeded reset's failure concerns nobody: this step resets again
            future.result()
        return None

    def _train_precision(self) -> contextlib.AbstractContextManager:
        """Autocast to `train_dtype` for training's forward passes; a no-op at float32 (evaluation never uses it)."""
        dtype = TRAIN_DTYPES[self.config.train_dtype]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.config.device).type, dtype=dtype)

    @property
    def train_runner(self) -> Any:
        """The GroupRunner of the training split (its workers start on first use)."""
        if self._train_runner is None:
            self._train_runner = self._make_runner(self.config.train_split, self._train_env_kwargs)
        return self._train_runner

    def _make_runner(self, split: str, env_kwargs: dict[str, Any]) -> Any:
        """A GroupRunner of `split` with the config's env made with `env_kwargs`, and the config's worker pool."""
        from craft_bench.envs.group_runner import GroupRunner

        config = self.config
        env_kwargs = {**env_kwargs, "split": split}
        # "local" leaves the choice to the runner, which plays in this process when num_workers is 0.
        pool = None if config.env_workers == "local" else config.env_workers
        return GroupRunner(config.env_id, env_kwargs, config.num_workers, pool=pool, ray_address=config.ray_address)

    def _no_sync(self, last: bool):
        """Inside: backward accumulates this rank's gradients without synchronising (all but the last micro-batch).
        FSDP2 reduce-scatters every micro-batch's gradients into the sharded ones instead."""
        if self.dp.world_size == 1 or last or self.dp.sharded:
            return contextlib.nullcontext()
        return self.dp.accelerator.no_sync(self.train_model)

    # ------------------------------------------------------------------------------------------------ evaluation
    def evaluate(self, act_on: str = "student") -> list[dict[str, Any]]:
        """The fixed held-out episode list at the stated temperature; one record per episode, in task order.
        `act_on="teacher"` plays the same episodes on the teacher prompt (the privileged block, then the student's
        prompt): how well the policy does when it is shown the privileged context."""
        config = self.config
        if self._eval_runner is None:
            self._eval_runner = self._make_runner(config.eval_split, self._eval_env_kwargs)
        with torch_threads(self.rollout_threads):
            records = evaluate_episodes(
                self._eval_runner, self.policy, self.eval_tasks, samples=config.eval_samples,
                temperature=config.eval_temperature, seed=config.seed,
                max_new_tokens=config.max_new_tokens, history_turns=config.history_turns, act_on=act_on,
                waves=config.rollout_waves, progress=self.progress,
            )
        for record in records:
            record["return"] = episode_return(float(record["won"]), record["invalid_actions"], config.success_reward,
                                              config.invalid_penalty, float(record["progress"]), config.progress_reward)
        # What the result row needs to know about the environment (version, data hash, privileged keys) is in any
        # episode's info: keep one rather than making and resetting another env to ask again.
        self.eval_info = self._eval_runner.last_infos[0]
        return records

    # ------------------------------------------------------------------------------------------------ checkpoints
    def save_checkpoint(self) -> None:
        """Atomically replace the checkpoint: a kill during the write leaves the previous one intact."""
        payload = {
            "state": asdict(self.state),
            "model": self.model.state_dict(),
            "optimizer": None if self.dp.sharded else self.optimizer.state_dict(),  # FSDP2: sharded, not resumable
            "method": self.method.state_dict(),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "config": asdict(self.config),
        }
        ckpt.save_checkpoint(self.run_dir / CHECKPOINT_FILE, payload)

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint if there is one, and drop metrics rows of steps it does not contain.

        Loading is weights-only and checks the digest and finiteness (agents/checkpoint.py): a damaged or forged
        file raises CheckpointError naming it. A resume may change the fields of run_files.RESUME_MAY_CHANGE."""
        path = self.run_dir / CHECKPOINT_FILE
        if not path.exists():
            if self.dp.is_main:
                run_files.truncate_metrics(self.run_dir / METRICS_FILE, 0)
            return False
        self.dp.check_resumable(self.run_dir)
        payload = ckpt.load_checkpoint(path, self.config.device)
        differing = run_files.config_differences(payload["config"], asdict(self.config), asdict(TrainConfig()))
        if differing:
            raise ValueError(
                f"{self.run_dir}: the checkpoint was made with a different config ({', '.join(differing)} differ); "
                "resume with the same settings or start a new run directory"
            )
        self.model.load_state_dict(payload["model"])
        if self.vllm is not None:
            self.vllm.sync_weights(self.model)
        if payload["optimizer"] is None:
            raise ValueError(f"{self.run_dir}: the checkpoint was made under FSDP2 and holds no optimizer state; it "
                             "cannot be resumed: start a new run directory")
        self.optimizer.load_state_dict(payload["optimizer"])
        self.method.load_state_dict(payload["method"])
        if self.ema is not None and payload["ema"] is not None:
            self.ema.load_state_dict(payload["ema"])
        state = TrainState(**payload["state"])
        if state.world_size != self.dp.world_size:
            raise ValueError(
                f"{self.run_dir}: the checkpoint was made by {state.world_size} data-parallel process(es), this run has "
                f"{self.dp.world_size}; resume with the same number of processes or start a new run directory"
            )
        self.state = state
        if self.dp.is_main:
            run_files.truncate_metrics(self.run_dir / METRICS_FILE, self.state.step)
        return True

    def save_final_model(self) -> Path:
        """The trained policy, loadable with AutoModelForCausalLM / AutoTokenizer."""
        target = self.run_dir / FINAL_MODEL_DIR
        self.model.save_pretrained(target)
        self.policy.tokenizer.save_pretrained(target)
        return target

    def close(self) -> None:
        self._take_reset_ahead(-1)  # a reset in flight finishes before its runner closes
        if self._reset_executor is not None:
            self._reset_executor.shutdown(wait=True)
            self._reset_executor = None
        if self._train_runner is not None:
            self._train_runner.close()
        if self._eval_runner is not None:
            self._eval_runner.close()
        if self.vllm is not None:
            self.vllm.close()

    # ------------------------------------------------------------------------------------------------ logging
    def _append_metrics(self, row: dict[str, float]) -> None:
        """Append one row (fsync'd); a metric that first appears mid-run widens the file, a torn last line left by a
        kill is dropped first (agents/run_files.py)."""
        run_files.append_metrics(self.run_dir / METRICS_FILE, row)
        for logger in self.loggers:
            logger.log(row, step=int(row["step"]))


# ---------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the duration, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    clone = copy.deepcopy(model)
    clone.eval()
    for parameter in clone.parameters():
        parameter.requires_grad_(False)
    return clone


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for target, source in zip(ema.parameters(), model.parameters()):
        target.mul_(decay).add_(source.detach(), alpha=1 - decay)


def _mean_over_updates(updates: list[dict[str, float]]) -> dict[str, float]:
    """One row for a step's updates: each `loss/*` entry is the mean over the updates (each already the sum of its
    micro-batch shares); step-wide metrics are the same in every update and are taken from the first."""
    merged = dict(updates[0])
    if len(updates) == 1:
        return merged
    for key in merged:
        if key.startswith("loss/"):
            merged[key] = sum(u[key] for u in updates) / len(updates)
    return merged


def _clip_gradients(model: torch.nn.Module, max_norm: float) -> float:
    parameters = [p for p in model.parameters() if p.grad is not None]
    if not parameters:
        return 0.0
    if max_norm > 0 or hasattr(parameters[0].grad, "full_tensor"):
        # FSDP2's sharded gradients: clip_grad_norm_ reduces the norm over the ranks (inf: measure, never clip).
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm if max_norm > 0 else math.inf)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in parameters])))


def _sampler_gap(sampler_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, temperature: float, top_p: float) -> float:
    """Mean |sampler log-prob - recomputed θ_old log-prob|: a health check of token-in/token-out scoring, which
    should be float rounding at T = 1 and top_p = 1. NaN otherwise: a tempered or nucleus-renormalised sampler's
    log-probs are those of another distribution than the model's (with top_p < 1 they are larger)."""
    if temperature != 1.0 or top_p < 1.0 or not mask.any():
        return math.nan
    width = min(sampler_logp.shape[1], old_logp.shape[1])
    gap = (sampler_logp[:, :width] - old_logp[:, :width]).abs()[mask[:, :width]]
    return float(gap.mean())


def _progress(iterable, desc: str, enabled: bool, initial: int = 0, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, initial=initial, total=total, dynamic_ncols=True)
