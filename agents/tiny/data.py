"""Expert data for the tiny model: expert and perturbed episodes played on the group runner, every visited state
labelled with the first action of `info["privileged"]["expert_plan"]`. Works for any environment with an expert.

A task draw is one GRPO-style group on `GroupRunner`: `clean_per_task` unperturbed siblings, then
`perturbed_per_task` perturbed ones, all reset from the same seed. A perturbed sibling executes a perturbation
instead of the expert's action with probability `perturb_prob` and then follows the re-planned expert, so the data
shows recovery from mistakes (the labels stay the expert's: DAgger's trick with a fixed expert).

What a perturbation is follows the environment's action format (`info["action_format"]`):
- `choice`: with probability `invalid_share` a stale action (admissible earlier in the episode, not now), which the
  environment rejects; otherwise another admissible action.
- `free`: with probability `invalid_share` a malformed action (the expert's action with its brackets removed, e.g.
  `search who wrote x`), which the syntax check rejects; otherwise a well-formed wrong action: another concrete
  action the state lists, or one the episode already took (a repeated search); malformed when there is none.
Both kinds put the environment's invalid-action feedback into the data, which a model would otherwise meet for the
first time at evaluation and answer by repeating the rejected action.

With `student_labels="search"` the episodes follow the environment's searching expert (`SEARCHING_EXPERTS`), which
knows only what the student prompt shows, and each state carries two labels: the searching expert's for the student
format, the planner's for the teacher format (the privileged block tells the teacher where things are).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from craft_bench.agents.prompts import PromptConfig, as_action_format, student_text
from craft_bench.agents.tiny.budget import TinyBudget
from craft_bench.envs import alfworld_search
from craft_bench.envs.group_runner import GroupRunner
from craft_bench.envs.tasks import split_task_ids

#: Task draws reset together on the runner. A constant of the recipe (not a knob): the reset seeds depend on it.
TASKS_PER_RESET = 16

#: Environments with a searching expert: (plan, observation, admissible actions, accepted actions so far) -> action.
SearchingExpert = Callable[[Sequence[str], str, Sequence[str], Sequence[str]], "str | None"]
SEARCHING_EXPERTS: dict[str, SearchingExpert] = {
    env_id: lambda plan, obs, admissible, accepted: alfworld_search.searching_action(
        plan, obs, admissible, alfworld_search.location_after(accepted))
    for env_id in ("craft/ALFWorldGen-v0", "craft/ALFWorld-v0")
}


@dataclass(frozen=True)
class ExpertRecord:
    """One state of an expert or perturbed episode and the expert's action there."""

    task_id: str
    student: str
    """The student prompt text (`student_text`, in the environment's action format)."""
    privileged: str
    """The teacher block (`info["privileged"]["text"]`)."""
    action: str
    """The label of the student format (and of the teacher format when `teacher_action` is None)."""
    teacher_action: str | None = None
    """The planner's action where it differs from `action` (searching-expert labels), else None."""


@dataclass
class CollectionStats:
    """What collecting expert episodes produced."""

    tasks: int = 0
    """Distinct tasks drawn."""
    episodes: int = 0
    episodes_won: int = 0
    steps: int = 0
    records: int = 0
    perturbations: int = 0
    invalid_actions: int = 0
    """Executed actions the environment rejected as invalid (perturbations meant to be invalid, mostly)."""
    planner_failures: int = 0
    """Episodes cut short because the expert plan was empty (or, for `choice`, not admissible) before a win."""


@dataclass
class _Episode:
    """The bookkeeping of one slot while it plays."""

    task_id: str
    perturb_prob: float
    rng: np.random.Generator
    history: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    seen: dict[str, None] = dataclasses.field(default_factory=dict)
    """Every action listed admissible so far (the stale candidates)."""
    accepted: list[str] = dataclasses.field(default_factory=list)
    """Executed actions the environment accepted (the well-formed wrong candidates of a free-form format)."""
    records: list[ExpertRecord] = dataclasses.field(default_factory=list)
    abandoned: bool = False


def collect_expert_records(
    env_id: str,
    budget: TinyBudget,
    seed: int,
    *,
    env_kwargs: dict[str, Any] | None = None,
    split: str | None = None,
    workers: int = 0,
    progress: bool = True,
) -> tuple[list[ExpertRecord], CollectionStats]:
    """Expert and perturbed episodes on `budget.n_train_tasks` task draws of `split` (default: the budget's
    `collect_split`), as labelled states.

    Draws are a seeded shuffle of the split (cycled when the split is smaller); each episode's perturbations come
    from a generator derived from (seed, draw, sibling) and the runner's reset seeds from (seed, reset), so the
    data does not depend on `workers` (0: the envs run in this process). Exact duplicate states (a perturbed
    episode often repeats the clean one's first states) are kept once, first occurrence first.
    """
    if budget.clean_per_task + budget.perturbed_per_task < 1:
        raise ValueError("the budget plays no episode per task")
    searcher = None
    if budget.student_labels == "search":
        if env_id not in SEARCHING_EXPERTS:
            raise ValueError(f"student_labels='search' needs a searching expert, and {env_id} has none; "
                             f"environments with one: {', '.join(sorted(SEARCHING_EXPERTS))}")
        searcher = SEARCHING_EXPERTS[env_id]
    split = budget.collect_split if split is None else split
    task_ids = split_task_ids(env_id, split, env_kwargs)
    if not task_ids:
        raise ValueError(f"{env_id} has no tasks in split {split!r}")
    order = np.random.default_rng(np.random.SeedSequence([seed, 0])).permutation(len(task_ids))
    draws = [task_ids[int(order[i % len(order)])] for i in range(budget.n_train_tasks)]
    group_size = budget.clean_per_task + budget.perturbed_per_task
    prompt_config = PromptConfig(history_turns=budget.history_turns)
    stats = CollectionStats(tasks=len(set(draws)))
    records: dict[tuple[str, str, str], ExpertRecord] = {}
    runner_kwargs = {**(env_kwargs or {}), "split": split, "max_steps": budget.max_episode_steps}
    bar = tqdm(total=len(draws), desc=f"tiny model: expert episodes on {env_id}", unit="task", disable=not progress)
    with GroupRunner(env_id, runner_kwargs, num_workers=workers) as runner:
        for reset_index, start in enumerate(range(0, len(draws), TASKS_PER_RESET)):
            chunk = draws[start : start + TASKS_PER_RESET]
            episodes = [
                _Episode(
                    task_id=task,
                    perturb_prob=0.0 if sibling < budget.clean_per_task else budget.perturb_prob,
                    rng=np.random.default_rng(np.random.SeedSequence([seed, 1, start + index, sibling])),
                )
                for index, task in enumerate(chunk)
                for sibling in range(group_size)
            ]
            _play(runner, chunk, group_size, int(np.random.SeedSequence([seed, 3, reset_index]).generate_state(1)[0]),
                  episodes, budget.invalid_share, prompt_config, stats, searcher)
            for episode in episodes:
                for record in episode.records:
                    records.setdefault((record.student, record.privileged, record.action, record.teacher_action), record)
            bar.update(len(chunk))
            bar.set_postfix(records=len(records), won=f"{stats.episodes_won}/{stats.episodes}")
    bar.close()
    stats.records = len(records)
    return list(records.values()), stats


def _play(
    runner: GroupRunner,
    tasks: Sequence[str],
    group_size: int,
    reset_seed: int,
    episodes: list[_Episode],
    invalid_share: float,
    prompt_config: PromptConfig,
    stats: CollectionStats,
    searcher: SearchingExpert | None = None,
) -> None:
    """Play one reset's episodes to the end in lockstep, filling each `_Episode`'s records."""
    observations, infos = runner.reset(list(tasks), group_size, seed=reset_seed)
    stats.episodes += len(episodes)
    while any(runner.active):
        actions: list[str | None] = [None] * len(episodes)
        for slot, episode in enumerate(episodes):
            if runner.active[slot]:
                actions[slot] = _next_action(episode, observations[slot], infos[slot], invalid_share, prompt_config,
                                             stats, searcher)
        for slot, result in enumerate(runner.step(actions)):
            if result is None:
                continue
            stats.steps += 1
            episode = episodes[slot]
            if not episode.abandoned:
                valid = bool(result.info["action_valid"])
                stats.invalid_actions += int(not valid)
                if valid:
                    episode.accepted.append(actions[slot])
            observations[slot], infos[slot] = result.obs, result.info
            if result.done:
                stats.episodes_won += int(bool(result.info["won"]))


def _next_action(
    episode: _Episode,
    observation: str,
    info: dict[str, Any],
    invalid_share: float,
    prompt_config: PromptConfig,
    stats: CollectionStats,
    searcher: SearchingExpert | None = None,
) -> str:
    """Record the state with the expert's label and return the action to execute (the expert's or a perturbation).
    With a `searcher` the student's label and the executed action are the searching expert's, the teacher's label
    the planner's. An episode whose expert has no usable plan is abandoned: it sends the empty command, which every
    environment rejects without engine work, until the runner truncates it."""
    if episode.abandoned:
        return ""
    action_format = info["action_format"]
    kind = as_action_format(action_format).kind
    plan = info["privileged"]["expert_plan"]
    admissible = list(info["admissible_actions"])
    if not plan or (kind == "choice" and plan[0] not in admissible):
        stats.planner_failures += 1
        episode.abandoned = True
        return ""
    expert = plan[0]
    teacher_action = None
    if searcher is not None:
        searched = searcher(plan, observation, admissible, episode.accepted)
        if searched is not None and searched != expert:
            expert, teacher_action = searched, plan[0]
    student = student_text(info["goal"], episode.history, observation, admissible, prompt_config, action_format)
    episode.records.append(ExpertRecord(episode.task_id, student, info["privileged"]["text"], expert, teacher_action))
    episode.seen.update(dict.fromkeys(admissible))
    action = expert
    if episode.perturb_prob > 0 and episode.rng.random() < episode.perturb_prob:
        action = perturbation(expert, admissible, list(episode.seen), episode.accepted, kind, invalid_share,
                              episode.rng)
        stats.perturbations += 1
    episode.history.append((observation, action))
    return action


def perturbation(
    expert_action: str,
    admissible: Sequence[str],
    seen: Sequence[str],
    taken: Sequence[str],
    kind: str,
    invalid_share: float,
    rng: np.random.Generator,
) -> str:
    """A deviation from the expert, by action format (the module docstring says which and why).

    `seen`: every action listed admissible earlier in the episode; `taken`: the actions the episode executed and
    the environment accepted.
    """
    if kind == "choice":
        current = set(admissible)
        stale = [a for a in seen if a not in current]
        if stale and rng.random() < invalid_share:
            return stale[int(rng.integers(len(stale)))]
        others = [a for a in admissible if a != expert_action]
        return others[int(rng.integers(len(others)))] if others else expert_action
    if rng.random() < invalid_share:
        return malformed(expert_action)
    wrong = [a for a in dict.fromkeys([*admissible, *taken]) if a != expert_action]
    return wrong[int(rng.integers(len(wrong)))] if wrong else malformed(expert_action)


def malformed(action: str) -> str:
    """The action with its syntax broken: brackets removed (`search[x y]` -> `search x y`), or, for an action
    without brackets, its first word only."""
    stripped = " ".join(re.sub(r"[\[\]]", " ", action).split())
    return stripped if stripped != action else (action.split() or [""])[0]
