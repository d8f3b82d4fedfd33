"""Registers every `craft/*` environment id with Gymnasium when `craft_bench` is imported.
Entry points are strings, so registering costs nothing until an environment is made."""

from __future__ import annotations

import gymnasium as gym

#: id -> entry point. Bump `-vN` whenever an environment's data, action syntax or reward change.
ENV_IDS: dict[str, str] = {
    "craft/TextWorld-v0": "craft_bench.envs.textworld_env:TextWorldEnv",
    "craft/ALFWorld-v0": "craft_bench.envs.alfworld_env:ALFWorldEnv",
    "craft/ALFWorldGen-v0": "craft_bench.envs.alfworld_env:ALFWorldGenEnv",
    "craft/WebShop-v0": "craft_bench.envs.webshop:WebShopEnv",
    "craft/WebShopGen-v0": "craft_bench.envs.webshop_gen:WebShopGenEnv",
    "craft/SearchQA-v0": "craft_bench.envs.searchqa:SearchQAEnv",
    "craft/SearchQAGen-v0": "craft_bench.envs.searchqa:SearchQAGenEnv",
}


def register_envs() -> None:
    """Register the suite; idempotent, so re-importing never warns about re-registration."""
    for env_id, entry_point in ENV_IDS.items():
        if env_id not in gym.registry:
            # No TimeLimit wrapper: `max_steps` is part of the environment contract and handled by the env itself.
            gym.register(id=env_id, entry_point=entry_point, disable_env_checker=False)
