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
    # The run: the shipped tiny model, 100 steps of B x G = 4 x 4 episodes of at most 15 turns.
    "tiny_budget": "default",
    "steps": 100,
    "tasks_per_step": 4,
    "group_size": 4,
    "max_turns": 15,
    "lr": 1e-4,
    # Only wins are rewarded (10); an invalid-action penalty taught the shipped model to stop taking objects.
    "invalid_penalty": 0.0,
    # Evaluation: sampled at the training temperature on 96 held-out episodes (greedy decoding hides a policy's gains
    # until its argmax flips).
    "eval_episodes": 96,
    "eval_temperature": 1.0,
    # How the step is computed (docs/benchmarks.md measures each): θ_old from the sampler wherever the sampler is the
    # policy (temperature 1), env steps of one wave overlapping the other wave's generation, the next step's resets
    # during this step's update, each distinct row scored once, and training's forward passes in bfloat16 where the
    # CPU multiplies bfloat16 natively (AVX512-BF16, AMX), else float32: emulated bfloat16 made the step 12x slower
    # on an AVX2-only CPU. A recorded setting (it changes results beyond rounding): the published ALFWorldGen rows
    # were made in bfloat16, so a CPU without those instructions runs another config id.
    "old_logprobs": "auto",
    "rollout_waves": 2,
    "rollout_threads": 1,
    # One torch thread for scoring and the update too: bfloat16 reductions round differently at other thread counts
    # (a two-thread run of GRPO seed 0 left the one-thread row at step 16), so the preset's rows reproduce on any
    # machine. `--set torch_threads=2` is faster on two cores (docs/benchmarks.md) and rounds differently.
    "torch_threads": 1,
    "reset_ahead": True,
    "distinct_rows": True,
    "train_dtype": "auto",
    "attn_implementation": "eager",
    # Dr. GRPO's advantage (no division by the group's std): a group without a win has all-equal returns and no
    # gradient, and a win weighs by its reward, not by how little its siblings' returns vary.
    "method_options": {"alpha": 0.01, "adv_std": "none"},
}
"""The embedded CPU setting (`--preset cpu`, the CLI's default), chosen by measurement on craft/ALFWorldGen-v0
(docs/methods.md, "The CPU preset"; README, "Learning on the embedded default"). GRPO with Dr. GRPO's advantage,
rewarded for wins only, lr 1e-4 for 100 steps ended at 0.098 ± 0.016 against the untrained model's 0.079 ± 0.014
(5 seeds; +0.019 [-0.043, +0.080], not significant), where the first preset (lr 1e-3, 10 steps, -0.1 per invalid
action) ended at 0/96 and no other setting tried (lr 1e-3 to 1e-4, 10 to 150 steps, progress shaping, larger
groups, a stronger KL, per-episode weights) ended above the untrained model. The spec's method options (λ = 0.01)
otherwise; every method keeps the reference KL α = 0.01, as at paper scale, so methods are compared under one
regulariser and CRAFT's Pillars 2-3 have an α to act on. Environments whose published rows were measured under other
settings keep them (`ENV_OVERRIDES`)."""

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


FIRST_CPU_PRESET: dict[str, Any] = {
    "steps": 10, "lr": 1e-3, "invalid_penalty": 0.1, "train_dtype": "float32", "method_options": {"alpha": 0.01},
    # The step as those rows computed it: distinct rows and eager attention round differently, so they stay off;
    # resets ahead do not change results, but those rows ran without them and were checked that way.
    "distinct_rows": False, "attn_implementation": None, "reset_ahead": False,
}
"""The cpu preset's first settings (lr 1e-3, 10 steps, -0.1 per invalid action, float32 training, GRPO's std-normalised
advantage, every row scored on its own, the model's own attention kernel), under which the Search-QA and WebShop rows
were measured; those environments keep them."""

TEXTWORLD_COOKING: dict[str, Any] = {
    **FIRST_CPU_PRESET,
    "env_kwargs": {"family": "cooking", "level": 1, "n_games": 64},
    "train_env_kwargs": {"n_games": 256},
    "tiny_budget": "textworld",
    "lr": 3e-4,
    "steps": 100,
}
"""The cpu preset on craft/TextWorld-v0: level-1 cooking games with the shipped `textworld` model, RL drawing from 256
`train` games and evaluated on the 64 `valid` games, lr 3e-4 for 100 steps. This is where the tiny setting learns as
measured (leaderboard/README.md, "TextWorld cooking": GRPO above the untrained model over 5 seeds, 566-805 s a run
on one core); `--set env_kwargs=...` picks other games (and then builds a tiny model for them)."""


def _tiny_model_history(env_id: str) -> dict[str, int]:
    """The past turns that `env_id`'s default tiny model was trained on (its budget's history_turns)."""
    return {"history_turns": BUDGETS[ENV_DEFAULT_BUDGETS[env_id]].history_turns}


ENV_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    # The cpu preset runs the tiny model, so its prompts show the history that model was trained on. A WebShop
    # search repeats most of the instruction: 19-41 tokens of its tiny model's tokenizer (p50 30) on the first 96
    # `test` goals, so the default 24 would cut 85 of them.
    "cpu": {
        **{env_id: {**FIRST_CPU_PRESET, **SEARCH_QA_TURNS, **_tiny_model_history(env_id)} for env_id in SEARCH_QA_IDS},
        **{env_id: {**FIRST_CPU_PRESET, **WEBSHOP_EVAL, "max_new_tokens": 64, **_tiny_model_history(env_id)}
           for env_id in WEBSHOP_IDS},
        "craft/TextWorld-v0": TEXTWORLD_COOKING,
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
