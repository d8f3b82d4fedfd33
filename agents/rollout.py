"""Multi-turn group rollouts: a policy plays B tasks x G siblings on the group runner, one row per turn
(CRAFT_SPEC.md section 1), with episode bookkeeping, padded tensors for the trainer and teacher scoring.

Randomness: the reply of slot s at turn k of training step n is sampled with the seed
`sample_seed(seed, n, s, k)` (a SeedSequence of the four), and the runner is reset with `reset_seed(seed, n)`, from
which it derives each group's env seed; so a rollout depends only on (seed, step, tasks, model), never on the number
of environment workers, which worker holds a slot, or how many rollouts came before (a resumed run replays exactly).
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from craft_bench.agents.engine import (
    HFEngine,
    SamplingParams,
    response_logprobs,
    right_pad,
)
from craft_bench.agents.episodes import summarize
from craft_bench.agents.policy import Policy
from craft_bench.agents.prompts import PromptConfig
from craft_bench.envs.group_runner import GroupRunner


@dataclass(frozen=True)
class Row:
    """One turn of one episode: what the student saw, what it sampled, what the teacher would see."""

    prompt_ids: list[int]
    teacher_prompt_ids: list[int] | None
    response_ids: list[int]
    logprobs: list[float]
    """The sampler's log-probs of `response_ids`."""
    group_id: int
    episode_id: int
    """The step-wide slot that played the episode (unique within a step, across data-parallel ranks too)."""
    turn_idx: int
    reply: str
    """The decoded reply."""
    action: str
    """What the environment received (the empty command when the reply could not be parsed)."""
    parsed: bool
    """The reply held a parseable action (False: the step is an invalid action)."""
    action_valid: bool
    """The environment accepted the action (parseable and admissible)."""
    reward: float


@dataclass
class Episode:
    """Per-episode outcome. `episode_id` is the step-wide slot (the runner's slot plus the block's first slot); its
    return is `episodes.episode_return(won, n_invalid)`."""

    episode_id: int
    group_id: int
    task_id: str
    task_type: str
    won: bool = False
    progress: float = 0.0
    n_steps: int = 0
    n_invalid: int = 0
    env_return: float = 0.0
    """The sum of the environment's rewards (1 on the winning step)."""
    final_info: dict[str, Any] = field(default_factory=dict)
    """Outcome keys of the last info (`dataset`, `task_score`), copied into evaluation records."""


@dataclass
class RolloutTensors:
    """What the trainer needs of a rollout as tensors: responses right-padded, `response_mask` marks tokens.
    (Prompts stay lists: the scoring function pads them per micro-batch.)"""

    response_ids: torch.Tensor  # (rows, T) long
    response_mask: torch.Tensor  # (rows, T) bool
    sampler_logp: torch.Tensor  # (rows, T) float32, 0 on padding
    group_id: torch.Tensor  # (rows,) long
    episode_id: torch.Tensor  # (rows,) long
    turn_idx: torch.Tensor  # (rows,) long


@dataclass
class RolloutBatch:
    """Every row of a rollout (grouped by episode, turns in order) and every episode's outcome."""

    rows: list[Row]
    episodes: list[Episode]
    env_steps: int = 0
    generated_tokens: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Namespaced summary statistics of the rollout for a log (episode statistics from `episodes.summarize`)."""
        summary = summarize(self.episodes)
        rows = self.rows
        seconds = self.timings.get("rollout_s", 0.0)
        generate_seconds = self.timings.get("generate_s", 0.0)
        return {
            "rollout/success": summary.success,
            "rollout/progress": summary.progress_mean,
            "rollout/episode_len": summary.steps_mean,
            "rollout/invalid_rate": summary.invalid_rate,
            "rollout/unparsed_rate": sum(not r.parsed for r in rows) / max(1, len(rows)),
            "rollout/response_len": float(np.mean([len(r.response_ids) for r in rows])) if rows else 0.0,
            "rollout/tokens_per_s": self.generated_tokens / generate_seconds if generate_seconds else 0.0,
            "env/steps_per_s": self.env_steps / seconds if seconds else 0.0,
            "time/rollout_s": seconds,
        }

    def to_tensors(self, device: str | torch.device = "cpu") -> RolloutTensors:
        """The rows' responses, sampler log-probs and (group, episode, turn) ids as tensors."""
        if not self.rows:
            raise ValueError("the rollout has no rows")
        response_ids, response_mask = right_pad([r.response_ids for r in self.rows], 0, device)
        sampler_logp, _ = right_pad([r.logprobs for r in self.rows], 0.0, device, dtype=torch.float32)
        return RolloutTensors(
            response_ids=response_ids,
            response_mask=response_mask.bool(),
            sampler_logp=sampler_logp,
            group_id=torch.tensor([r.group_id for r in self.rows], dtype=torch.long, device=device),
            episode_id=torch.tensor([r.episode_id for r in self.rows], dtype=torch.long, device=device),
            turn_idx=torch.tensor([r.turn_idx for r in self.rows], dtype=torch.long, device=device),
        )


#: Keys of an episode's last info that evaluation records carry: Search-QA's per-question dataset, WebShop's score.
OUTCOME_KEYS = ("dataset", "task_score")


def reset_seed(seed: int, step: int) -> int:
    """The runner's reset seed for training step `step` (the envs' own randomness: noise, sampled details)."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


def sample_seed(seed: int, step: int, slot: int, turn: int) -> int:
    """The sampling seed of one reply: a function of (run seed, training step, slot, turn) only."""
    return int(np.random.SeedSequence([seed, step, slot, turn]).generate_state(1)[0])


def collect_rollouts(
    runner: GroupRunner,
    policy: Policy,
    task_ids: Sequence[str],
    group_size: int,
    *,
    sampling: SamplingParams,
    seed: int,
    step: int = 0,
    history_turns: int | None = None,
    with_teacher: bool = True,
    act_on: str = "student",
    first_group: int = 0,
    waves: int = 1,
    progress: Callable[[int], None] | None = None,
    reset: Callable[[], tuple[list[Any], list[Any]]] | None = None,
) -> RolloutBatch:
    """Play `task_ids` x `group_size` episodes to the end (the environment's max_steps), one generate call per turn
    of each wave.

    `history_turns` overrides the policy's PromptConfig.history_turns (H). `with_teacher=False` skips the teacher
    prompts (evaluation). `act_on="teacher"` samples from the teacher prompt instead of the student's: it measures
    the privileged teacher itself (its rows' log-probs are then the teacher's, not a student rollout's).
    `first_group` is the step-wide index of the first task's group (a data-parallel rank plays a block of the step's
    groups): group ids, episode ids (global slots) and sampling seeds are numbered from it, so a block played alone
    gives exactly the rows that one process playing every group would.
    `waves` > 1 splits the slots into waves (slot % waves) that take turns: while the env workers step one wave (in
    a background thread that waits on them), this process samples the next wave's replies. Each reply's seed is
    (seed, step, slot, turn) either way; only float rounding of the batched forward pass depends on which rows share
    it. `progress(n)` is called with the number of episodes that just finished. `reset`, when given, returns the
    (observations, infos) of `runner.reset(task_ids, group_size, seed=reset_seed(seed, step), first_group=...)`
    that the caller started ahead (the trainer's `reset_ahead`); its wait counts as env time.
    Returns the rows ordered by (episode_id, turn_idx). `timings["env_s"]` is the env time the caller waited for
    (resets, and steps not hidden behind generation).
    """
    if act_on not in ("student", "teacher"):
        raise ValueError(f"act_on must be 'student' or 'teacher', got {act_on!r}")
    if isinstance(waves, bool) or not isinstance(waves, int) or waves < 1:
        raise ValueError(f"waves must be an int >= 1, got {waves!r}")
    needs_privileged = with_teacher or act_on == "teacher"
    if history_turns is not None and history_turns != policy.prompt_config.history_turns:
        policy = _with_prompt_config(policy, replace(policy.prompt_config, history_turns=history_turns))
    started = time.perf_counter()
    if reset is None:
        observations, infos = runner.reset(list(task_ids), group_size, seed=reset_seed(seed, step),
                                           first_group=first_group)
    else:
        observations, infos = reset()
        expected = [task for task in task_ids for _ in range(group_size)]
        first = runner.group_ids[0] if runner.group_ids else first_group
        if runner.task_ids != expected or runner.seed != reset_seed(seed, step) or first != first_group:
            raise ValueError(f"the reset started ahead does not match this rollout: tasks {runner.task_ids} and seed "
                             f"{runner.seed} instead of {expected} and {reset_seed(seed, step)}, first group "
                             f"{first} instead of {first_group}")
    slots = len(observations)
    first_slot = first_group * group_size
    env_time = time.perf_counter() - started
    episodes = [
        Episode(first_slot + slot, int(runner.group_ids[slot]), str(infos[slot]["task_id"]), str(infos[slot]["task_type"]))
        for slot in range(slots)
    ]
    histories: list[list[tuple[str, str]]] = [[] for _ in range(slots)]
    rows_by_slot: list[list[Row]] = [[] for _ in range(slots)]
    active = list(runner.active)
    generate_time = 0.0
    generated = 0

    def act(playing: list[int]) -> tuple[list[Any], list[Any]]:
        prompts = [
            policy.turn_prompts(
                infos[slot]["goal"],
                histories[slot],
                observations[slot],
                infos[slot]["admissible_actions"],
                infos[slot]["privileged"]["text"] if needs_privileged else None,
                sampling.max_new_tokens,
                action_format=infos[slot].get("action_format"),
            )
            for slot in playing
        ]
        seeds = [sample_seed(seed, step, first_slot + slot, len(rows_by_slot[slot])) for slot in playing]
        acting = [p.teacher_ids if act_on == "teacher" else p.student_ids for p in prompts]
        return prompts, policy.act(acting, sampling, seeds)  # type: ignore[arg-type]

    def record(playing: list[int], prompts: list[Any], acts: list[Any], results: dict[int, Any]) -> None:
        finished = 0
        for slot, prompt, act in zip(playing, prompts, acts):
            result = results[slot]
            info = result.info
            valid = bool(info["action_valid"])
            rows_by_slot[slot].append(
                Row(
                    prompt_ids=prompt.student_ids,
                    teacher_prompt_ids=prompt.teacher_ids,
                    response_ids=act.response_ids,
                    logprobs=act.logprobs,
                    group_id=episodes[slot].group_id,
                    episode_id=first_slot + slot,
                    turn_idx=len(rows_by_slot[slot]),
                    reply=act.reply,
                    action=act.env_action,
                    parsed=act.action is not None,
                    action_valid=valid,
                    reward=float(result.reward),
                )
            )
            episode = episodes[slot]
            episode.n_steps += 1
            episode.n_invalid += int(not valid)
            episode.env_return += float(result.reward)
            episode.won = bool(info["won"])
            episode.progress = float(info["progress"])
            episode.final_info = {key: info[key] for key in OUTCOME_KEYS if key in info}
            histories[slot].append((observations[slot], " ".join(act.env_action.split())))
            observations[slot], infos[slot] = result.obs, info
            active[slot] = not (result.terminated or result.truncated)
            finished += not active[slot]
        if progress is not None and finished:
            progress(finished)

    # One wave in flight at the env workers at a time; `pending` is its (slots, prompts, acts, future results).
    wave_slots = [[slot for slot in range(slots) if slot % waves == wave] for wave in range(waves)]
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="env-wave") if waves > 1 else None
    pending: tuple[list[int], list[Any], list[Any], Future] | None = None
    try:
        wave = 0
        while True:
            playing = [slot for slot in wave_slots[wave] if active[slot]]
            acted = None
            if playing:
                tick = time.perf_counter()
                prompts, acts = act(playing)
                generate_time += time.perf_counter() - tick
                generated += sum(len(a.response_ids) for a in acts)
                acted = (playing, prompts, acts)
            if pending is not None:  # the previous wave's env steps ran while this wave generated
                tick = time.perf_counter()
                results = pending[3].result()
                env_time += time.perf_counter() - tick
                record(pending[0], pending[1], pending[2], results)
                pending = None
            if acted is not None:
                step_actions = {slot: a.env_action for slot, a in zip(acted[0], acted[2])}
                if executor is None:
                    tick = time.perf_counter()
                    results = runner.step_slots(step_actions)
                    env_time += time.perf_counter() - tick
                    record(*acted, results)
                else:
                    pending = (*acted, executor.submit(runner.step_slots, step_actions))
            if pending is None and not any(active):
                break
            wave = (wave + 1) % waves
    finally:
        if executor is not None:
            executor.shutdown(wait=True)
    rows = [row for slot_rows in rows_by_slot for row in slot_rows]
    total = time.perf_counter() - started
    return RolloutBatch(
        rows,
        episodes,
        env_steps=len(rows),
        generated_tokens=generated,
        timings={"rollout_s": total, "generate_s": generate_time, "env_s": env_time},
    )


def score_teacher(
    scorer: torch.nn.Module | HFEngine, batch: RolloutBatch, *, pad_token_id: int | None = None,
    micro_batch: int | None = None, distinct: bool = False,
) -> torch.Tensor:
    """log π(y_t | x+, y_<t) for every row's exact response ids: (rows, T) float32, 0 on padding.

    The one scoring function, `engine.response_logprobs`, in row order and micro-batches of `micro_batch` rows: the
    same batching and padding as the trainer's θ_old and reference scores, so the teacher gap Δ = lp_T - lp_old
    subtracts numbers made the same way. T is the longest response of the batch. `scorer` is the model of whichever
    weights teach (θ_old, the reference, an EMA), or an `HFEngine` (its model and pad id are used). `distinct` scores
    each distinct (teacher prompt, response) pair once (`response_logprobs`).
    """
    if not batch.rows:
        raise ValueError("the rollout has no rows")
    if any(r.teacher_prompt_ids is None for r in batch.rows):
        raise ValueError("the rollout was collected with with_teacher=False: it has no teacher prompts to score")
    if isinstance(scorer, HFEngine):
        scorer, pad_token_id = scorer.model, scorer.pad_id if pad_token_id is None else pad_token_id
    if pad_token_id is None:
        raise ValueError("score_teacher needs pad_token_id when given a model")
    prompts = [r.teacher_prompt_ids for r in batch.rows]
    responses = [r.response_ids for r in batch.rows]
    with torch.no_grad():
        logp, _ = response_logprobs(scorer, prompts, responses, pad_token_id=pad_token_id, micro_batch=micro_batch,
                                    distinct=distinct)
    return logp


def evaluate_episodes(
    runner: GroupRunner,
    policy: Policy,
    task_ids: Sequence[str],
    *,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    max_new_tokens: int = 32,
    history_turns: int | None = None,
    act_on: str = "student",
    waves: int = 1,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Play each task `samples` times at `temperature` (0 = greedy; the samples are sibling draws, as a training
    group's) and return one record per episode, in task order (a task's samples together):
    task_id, task_type, won, progress, steps, invalid_actions, env_return, `actions` (the episode's actions as sent
    to the environment, each with whether it was valid: a JSON list of [action, valid] pairs, so what a policy does
    can be read from eval.csv), and dataset / task_score when the env reports them. `act_on="teacher"` evaluates
    the policy on its privileged prompts instead (the teacher's success). `waves` as in `collect_rollouts`;
    `progress` shows a bar of finished episodes."""
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(task_ids) * samples, desc="evaluate", unit="episode", dynamic_ncols=True)
    try:
        batch = collect_rollouts(
            runner,
            policy,
            task_ids,
            samples,
            sampling=policy.sampling(temperature=temperature, max_new_tokens=max_new_tokens),
            seed=seed,
            history_turns=history_turns,
            with_teacher=False,
            act_on=act_on,
            waves=waves,
            progress=bar.update if bar is not None else None,
        )
    finally:
        if bar is not None:
            bar.close()
    actions: dict[int, list[list[Any]]] = {}
    for row in batch.rows:  # ordered by (episode_id, turn_idx)
        actions.setdefault(row.episode_id, []).append([row.action, row.action_valid])
    return [
        {
            "task_id": e.task_id,
            "task_type": e.task_type,
            "won": e.won,
            "progress": e.progress,
            "steps": e.n_steps,
            "invalid_actions": e.n_invalid,
            "env_return": e.env_return,
            "actions": json.dumps(actions.get(e.episode_id, [])),
            **e.final_info,
        }
        for e in batch.episodes
    ]


def evaluation_task_ids(task_ids: Sequence[str], n_episodes: int) -> list[str]:
    """The protocol's fixed episode list: `n_episodes` tasks evenly spread over the sorted split (every task type
    of a split sorted by type is represented), or all of them when the split is smaller."""
    if n_episodes < 1:
        raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
    if n_episodes >= len(task_ids):
        return list(task_ids)
    picks = np.linspace(0, len(task_ids) - 1, n_episodes).round().astype(int)
    return [task_ids[i] for i in picks]


def _with_prompt_config(policy: Policy, config: PromptConfig) -> Policy:
    """A shallow copy of `policy` with another prompt layout (engine and tokenizer shared)."""
    clone = copy.copy(policy)
    clone.prompt_config = config
    return clone
