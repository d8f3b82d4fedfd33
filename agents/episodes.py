"""Episode outcomes: the training return and the summary statistics (success, invalid-action rate, progress).
The one home of these formulas (CRAFT_SPEC.md §2); it imports nothing heavy, so any module can use it.

`episode_return` works on Python numbers and on arrays or tensors alike (it only multiplies and subtracts), so
`losses.episode_returns` applies the very same expression to float32 tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

SUCCESS_REWARD = 10.0
"""Return of a won episode (SDAR / verl-agent's ALFWorld setting)."""
INVALID_PENALTY = 0.1
"""Return penalty per invalid action (SDAR / verl-agent's ALFWorld setting)."""


def episode_return(won: Any, n_invalid: Any, success_reward: float = SUCCESS_REWARD,
                   invalid_penalty: float = INVALID_PENALTY, progress: Any = 0.0, progress_reward: float = 0.0) -> Any:
    """R = success_reward · won - invalid_penalty · n_invalid (CRAFT_SPEC.md §2), plus progress_reward · progress when
    the documented shaping option is on (`TrainConfig.progress_reward`; 0, the spec's return, by default).

    `won`, `n_invalid` and `progress` are numbers (bool/int/float) or arrays/tensors; the result has their type. With
    progress_reward = 0 the shaping term is not added at all, so the spec's return is computed bit for bit.
    """
    value = success_reward * won - invalid_penalty * n_invalid
    if progress_reward:
        value = value + progress_reward * progress
    return value


class Outcome(Protocol):
    """What a summary reads from an episode (rollout.Episode has these attributes)."""

    won: bool
    progress: float
    n_steps: int
    n_invalid: int


@dataclass(frozen=True)
class EpisodeSummary:
    """Means over a set of episodes. `invalid_rate` is invalid actions over all actions (not a mean of rates)."""

    episodes: int
    success: float
    """Fraction of episodes won."""
    return_mean: float
    """Mean of `episode_return` (Python floats, float64)."""
    progress_mean: float
    """Mean of the environment's final progress in [0, 1]."""
    steps_mean: float
    """Mean number of actions per episode."""
    invalid_rate: float
    """Σ n_invalid / Σ n_steps over the episodes (0 when no action was taken)."""


def invalid_rate(n_invalid: Sequence[int], n_steps: Sequence[int]) -> float:
    """Σ n_invalid / Σ n_steps, 0 when no action was taken."""
    return sum(n_invalid) / max(1, sum(n_steps))


def summarize(episodes: Sequence[Outcome], success_reward: float = SUCCESS_REWARD,
              invalid_penalty: float = INVALID_PENALTY, progress_reward: float = 0.0) -> EpisodeSummary:
    """Success, mean return, progress, length and invalid-action rate of `episodes` (any objects with `won`,
    `progress`, `n_steps`, `n_invalid`). An empty list is a ValueError: a summary of nothing has no mean."""
    if not episodes:
        raise ValueError("summarize needs at least one episode")
    n = len(episodes)
    returns = [episode_return(float(e.won), e.n_invalid, success_reward, invalid_penalty, float(e.progress), progress_reward)
               for e in episodes]
    return EpisodeSummary(
        episodes=n,
        success=sum(float(e.won) for e in episodes) / n,
        return_mean=sum(returns) / n,
        progress_mean=sum(float(e.progress) for e in episodes) / n,
        steps_mean=sum(e.n_steps for e in episodes) / n,
        invalid_rate=invalid_rate([e.n_invalid for e in episodes], [e.n_steps for e in episodes]),
    )
