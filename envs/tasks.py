"""Listing a split's task ids: the one place that asks an environment which tasks a split holds.
Task lists are cheap by the environment contract (no engine work), so this makes an env, reads it and closes it."""

from __future__ import annotations

from typing import Any

import gymnasium as gym


def split_task_ids(env_id: str, split: str, env_kwargs: dict[str, Any] | None = None) -> list[str]:
    """The sorted task ids of `split` of `env_id`, made with `env_kwargs` (any `split` in them is overridden)."""
    env = gym.make(env_id, disable_env_checker=True, **{**(env_kwargs or {}), "split": split})
    try:
        return list(env.unwrapped.task_ids)
    finally:
        env.close()
