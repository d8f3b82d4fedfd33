"""Named settings of a training run (`--preset cpu|paper`): TrainConfig overrides plus each method's options.
The one home of presets; `preset_values(name, method)` is what the CLI and any script should use.

`paper` is SDAR's released ALFWorld configuration (built on verl-agent's ALFWorld GRPO script); docs/methods.md
lists every remaining difference from SDAR's code.
"""

from __future__ import annotations

import copy
from typing import Any

from craft_bench.agents.tiny.budget import BUDGETS, ENV_DEFAULT_BUDGETS

CPU_PRESET: dict[str, Any] = {
    # The run: the shipped tiny model, B x G = 4 x 4 episodes of at most 15 turns per step.
    "tiny_budget": "default",
    "steps": 10,
    "tasks_per_step": 4,
    "group_size": 4,
    "max_turns": 15,
    "lr": 1e-3,
    "invalid_penalty": 0.1,
    # Evaluation: sampled at the training temperature on 96 held-out episodes (greedy decoding hides a policy's gains
    # until its argmax flips).
    "eval_episodes": 96,
    "eval_temperature": 1.0,
    # How the step is computed (results equal up to float rounding; docs/benchmarks.md measures each): θ_old from the
    # sampler wherever the sampler is the policy (temperature 1), env steps of one wave overlapping the other wave's
    # generation on one torch thread, then every core for scoring and the update.
    "old_logprobs": "auto",
    "rollout_waves": 2,
    "rollout_threads": 1,
    "method_options": {"alpha": 0.01},
}
"""The embedded CPU setting (`--preset cpu`, the CLI's default). Where its numbers come from (docs/methods.md, "The
CPU preset"): lr 1e-3 from the probe of issue 10 (on a one-token bandit of the tiny model's shape, 30 steps at lr 1e-4
moved p from 0.102 to 0.109, at 1e-3 to 0.27-0.75); 10 steps because a step of the shipped model costs about 48 s on
one core (`bench train`), so that 3 seeds of a method fit in about half an hour; the paper's reward terms (10 for a
win, -0.1 per invalid action), without extra shaping; the spec's method options (λ = 0.01), since no λ sweep fitted
in this budget. Every method keeps the reference KL α = 0.01, as at paper scale, so methods are compared under one
regulariser and CRAFT's Pillars 2-3 have an α to act on."""

CPU_METHOD_OPTIONS: dict[str, dict[str, Any]] = {}
"""Per-method options of the CPU preset on top of CPU_PRESET["method_options"]."""

PAPER_PRESET: dict[str, Any] = {
    "tasks_per_step": 16,
    "group_size": 8,
    "max_turns": 50,
    "history_turns": 2,
    "temperature": 1.0,
    "max_new_tokens": 512,
    "lr": 1e-6,
    "weight_decay": 0.01,
    "grad_clip": 1.0,
    "ppo_epochs": 1,
    "mini_batch_rows": 2048,
    "micro_batch_rows": 8,
    "success_reward": 10.0,
    "invalid_penalty": 0.1,
    "eval_episodes": 128,
    "method_options": {"alpha": 0.01, "h": 0.001},
}
"""SDAR / verl-agent's ALFWorld setting for real models on GPUs: 16 tasks x 8 siblings, 50 turns, history 2,
lr 1e-6, reference KL α = 0.01 (k3, `low_var_kl`), entropy coefficient h = 0.001, returns 10 / -0.1, temperature 1.
Updates per rollout: `ppo_mini_batch_size=256` prompts, which verl multiplies by the rollout count n = 8, so
mini-batches of 2048 rows (turns), one epoch; `micro_batch_rows` is only the memory knob inside a mini-batch."""

PAPER_METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "rlsd": {"lam": 0.5, "warmdown_steps": 100},
}
"""Per-method options of the paper preset on top of PAPER_PRESET["method_options"]: RLSD's λ decays linearly from
0.5 to 0 over SDAR's 100 warm-down steps. Every other method term stays at the spec's defaults (SDAR: λ = 0.01,
β = 5; Skill-SD: c = 0.001, exp(-ℓ) capped at e^20 always; CRAFT's ours-marked choices)."""

SEARCH_QA_IDS = ("craft/SearchQAGen-v0", "craft/SearchQA-v0")
WEBSHOP_IDS = ("craft/WebShopGen-v0", "craft/WebShop-v0")

SEARCH_QA_TURNS = {"max_turns": 4}
"""Search-QA's episode: SDAR's Search environment allows 4 turns (search, search, search, answer)."""

WEBSHOP_EVAL = {"eval_split": "test"}
"""WebShop's held-out goals: its `test` split, the first 500 goals after WebShop's shuffle, which verl-agent and SDAR
evaluate on (WebShop names its splits test/eval/train; there is no `valid`)."""


def _tiny_model_history(env_id: str) -> dict[str, int]:
    """The past turns that `env_id`'s default tiny model was trained on (its budget's history_turns)."""
    return {"history_turns": BUDGETS[ENV_DEFAULT_BUDGETS[env_id]].history_turns}


ENV_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    # The cpu preset runs the tiny model, so its prompts show the history that model was trained on. A WebShop
    # search repeats most of the instruction: 19-41 tokens of its tiny model's tokenizer (p50 30) on the first 96
    # `test` goals, so the default 24 would cut 85 of them.
    "cpu": {
        **{env_id: {**SEARCH_QA_TURNS, **_tiny_model_history(env_id)} for env_id in SEARCH_QA_IDS},
        **{env_id: {**WEBSHOP_EVAL, "max_new_tokens": 64, **_tiny_model_history(env_id)} for env_id in WEBSHOP_IDS},
    },
    "paper": {
        **{env_id: SEARCH_QA_TURNS for env_id in SEARCH_QA_IDS},
        **{env_id: WEBSHOP_EVAL for env_id in WEBSHOP_IDS},
    },
}
"""Per-environment settings of each preset on top of its common ones (WebShop keeps the presets' 15 turns, its
verl-agent episode cap)."""

PRESETS: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {
    "cpu": (CPU_PRESET, CPU_METHOD_OPTIONS),
    "paper": (PAPER_PRESET, PAPER_METHOD_OPTIONS),
}
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def preset_values(name: str, method: str, env_id: str | None = None) -> dict[str, Any]:
    """TrainConfig overrides of preset `name` for `method` on `env_id` (its `ENV_OVERRIDES` applied), its
    `method_options` included (a fresh deep copy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    common, per_method = PRESETS[name]
    values = copy.deepcopy({**common, **ENV_OVERRIDES[name].get(env_id or "", {})})
    values["method_options"] = {**values.get("method_options", {}), **copy.deepcopy(per_method.get(method, {}))}
    return values


def paper_method_options(method: str) -> dict[str, Any]:
    """Every option of `method` under the paper preset: its documented defaults with the preset's overrides."""
    from craft_bench.agents.methods import method_defaults

    return {**method_defaults(method), **preset_values("paper", method)["method_options"]}
