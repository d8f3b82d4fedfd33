"""Greedy success of a (tiny) model on held-out tasks, on the student prompt or on its teacher prompt.
Plays through the harness's own evaluation (`agents.rollout.evaluate_episodes`); this module sits above the policy."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from craft_bench.agents.policy import Policy
from craft_bench.agents.prompts import PromptConfig
from craft_bench.agents.rollout import evaluate_episodes, evaluation_task_ids
from craft_bench.agents.tiny.build import DEFAULT_ENV_ID, default_workers, load_metadata
from craft_bench.envs.group_runner import GroupRunner
from craft_bench.envs.tasks import split_task_ids


@dataclass(frozen=True)
class EvalResult:
    """Greedy success of a model on a fixed list of tasks."""

    env_id: str
    split: str
    with_privileged: bool
    n_episodes: int
    successes: int
    success_rate: float
    steps_mean: float
    invalid_action_rate: float
    seconds: float


def evaluate_success(
    model_path: str | Path,
    env_id: str = DEFAULT_ENV_ID,
    split: str = "valid",
    n_episodes: int = 50,
    with_privileged: bool = False,
    max_steps: int | None = None,
    batch_size: int = 32,
    workers: int | None = None,
    progress: bool = True,
    env_kwargs: dict[str, Any] | None = None,
) -> EvalResult:
    """Greedy success of a model on a fixed task list of `split` (`evaluation_task_ids`), one episode per task;
    with `with_privileged` the model acts on its teacher prompt. `max_steps=None` keeps the environment's own episode
    cap. `workers=0` runs the envs in this process."""
    try:
        prompt_config = PromptConfig(**load_metadata(model_path)["prompt_config"])
    except FileNotFoundError:
        prompt_config = PromptConfig()
    policy = Policy.from_pretrained(str(model_path), max_batch_size=batch_size, prompt_config=prompt_config)
    started = time.perf_counter()
    env_kwargs = {**(env_kwargs or {}), "split": split}
    if max_steps is not None:  # else the environment's own cap (ALFWorld 50, Search-QA 4, WebShop 15)
        env_kwargs["max_steps"] = max_steps
    tasks = evaluation_task_ids(split_task_ids(env_id, split, env_kwargs), n_episodes)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(tasks), desc=f"eval {env_id}:{split} privileged={with_privileged}", disable=not progress)
    with GroupRunner(env_id, env_kwargs, num_workers=default_workers() if workers is None else workers) as runner:
        for start in range(0, len(tasks), batch_size):
            chunk = tasks[start : start + batch_size]
            records += evaluate_episodes(
                runner, policy, chunk, temperature=0.0, act_on="teacher" if with_privileged else "student"
            )
            bar.update(len(chunk))
    bar.close()
    wins = sum(bool(r["won"]) for r in records)
    steps = sum(int(r["steps"]) for r in records)
    invalid = sum(int(r["invalid_actions"]) for r in records)
    return EvalResult(
        env_id=env_id, split=split, with_privileged=with_privileged, n_episodes=len(tasks), successes=wins,
        success_rate=wins / len(tasks), steps_mean=steps / len(tasks), invalid_action_rate=invalid / max(1, steps),
        seconds=round(time.perf_counter() - started, 1),
    )
