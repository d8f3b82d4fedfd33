"""What a result is a result of: `run_config` (every setting that changes results, hashed by `config_id` into the
one id of a run directory and its leaderboard entry) and `weights_sha256` (which initial weights a run started from)."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

from craft_bench.leaderboard.schema import BASE_METHOD, EVAL_TEMPERATURE, config_id

__all__ = [
    "EVALUATION_PROTOCOL_SETTINGS", "EVALUATION_SETTINGS", "KEY_SETTINGS", "LATER_METHOD_OPTIONS", "LATER_SETTINGS", "NEUTRAL_SETTINGS", "TRAINING_ONLY_SETTINGS", "config_id", "run_config",
    "undeclared_settings", "weights_sha256",
]

# Every TrainConfig field is declared in exactly one of the four groups below (tests/test_leaderboard_identity.py
# fails otherwise). A field declared nowhere is still recorded, for every method `base` included: assumed to change
# results until someone decides, so an undeclared field can split an id but never merge two configurations.

#: TrainConfig fields that are leaderboard key columns of their own (env_id, method, model, split, seed), so they are
#: not repeated inside method_config.
KEY_SETTINGS: tuple[str, ...] = ("env_id", "method", "model", "eval_split", "seed")
#: TrainConfig fields that do not change results, each with the reason.
NEUTRAL_SETTINGS: dict[str, str] = {
    "num_workers": "every random draw comes from (seed, step, task, sibling), not from the worker that plays it",
    "env_workers": "local processes, Ray actors or this process play identical episodes",
    "ray_address": "which Ray cluster hosts the env workers",
    "device": "the same computation; a GPU differs from a CPU by float rounding only",
    "checkpoint_every": "how often the state is saved; a resumed run equals an uninterrupted one",
    "micro_batch_rows": "the loss is a token mean over the whole step; micro-batching changes float rounding only",
    "rollout_waves": "which rows share a generation forward pass: float rounding of batched generation only",
    "torch_threads": "thread counts change the order of float sums only",
    "rollout_threads": "thread counts change the order of float sums only",
    "attn_implementation": "every kernel computes exact attention: float rounding only",
    "reset_ahead": "the same resets with the same seeds, started a step earlier",
    "distinct_rows": "a repeated row takes its twin's log-probs and still counts in the loss: float rounding only",
    "method_options": "recorded resolved, as the method's full configuration (the method's own keys)",
    EVAL_TEMPERATURE: "recorded once, at the top level of method_config, as the protocol requires",
}
#: Settings that only shape training; a `base` row (the untrained model) does not record them, so one base row
#: stands beside every training configuration of its env x model x evaluation protocol.
TRAINING_ONLY_SETTINGS: tuple[str, ...] = (
    "train_split", "train_env_kwargs", "steps", "tasks_per_step", "group_size", "temperature", "top_p", "lr",
    "weight_decay", "grad_clip", "ppo_epochs", "mini_batch_rows", "ema_decay", "on_nonfinite", "old_logprobs",
    "train_dtype",
)
#: Settings that change what an evaluation measures, recorded in every row, `base` included: the environment and its
#: constructor arguments (Search-QA's retriever and top-k, ...), the tiny model's budget, the turn cap, the prompt's
#: history, the reply length, the episode list, the engine that samples, and the return's reward terms (the row's
#: return_mean is computed with them).
EVALUATION_SETTINGS: tuple[str, ...] = (
    "env_kwargs", "tiny_budget", "max_turns", "history_turns", "max_new_tokens", "eval_episodes", "eval_samples",
    "engine",
    "vllm_options", "success_reward", "invalid_penalty", "progress_reward",
)


#: The evaluation protocol proper: settings that change how a trained model is evaluated and nothing of its training
#: (`python -m craft_bench.run --eval-only --trained-in` evaluates a finished run's model under other values of them).
EVALUATION_PROTOCOL_SETTINGS: tuple[str, ...] = ("eval_split", "eval_episodes", "eval_samples", EVAL_TEMPERATURE)


#: Settings added after rows were published, each with the value that reproduces the results from before it existed.
#: At that value a setting is left out of the configuration, so every earlier run and leaderboard row keeps its id;
#: any other value is recorded like every setting. (It must still be declared in one of the groups above.)
LATER_SETTINGS: dict[str, Any] = {
    "progress_reward": 0.0, "train_env_kwargs": {}, "train_dtype": "float32", "eval_samples": 1,
}
#: Method options (common to every method) added after rows were published, each with the value that reproduces the
#: results from before it existed; at that value the option is left out of `method_config`, as LATER_SETTINGS are.
LATER_METHOD_OPTIONS: dict[str, Any] = {"agg": "token"}


def undeclared_settings(names: Iterable[str]) -> list[str]:
    """The names (TrainConfig fields) that none of KEY_SETTINGS, NEUTRAL_SETTINGS, TRAINING_ONLY_SETTINGS and
    EVALUATION_SETTINGS declares, sorted: each is recorded (assumed to change results) until it is declared."""
    declared = set(KEY_SETTINGS) | set(NEUTRAL_SETTINGS) | set(TRAINING_ONLY_SETTINGS) | set(EVALUATION_SETTINGS)
    return sorted(set(names) - declared)


def run_config(settings: Mapping[str, Any], method_config: Mapping[str, Any]) -> dict[str, Any]:
    """The configuration a result row records as `method_config`, and `config_id` hashes into the run's id.

    `settings` is the run's TrainConfig as a dict (`dataclasses.asdict`), `method_config` the method's resolved
    options (`Method.config`; `{}` for `base`). The result holds the method's options, `eval_temperature`, and a
    `"train"` object with every other trainer setting except the key settings (KEY_SETTINGS) and the neutral ones
    (NEUTRAL_SETTINGS): lr, steps, B, G, turns, temperatures, rewards, the tiny-model budget, env kwargs, ...
    For method `base`, TRAINING_ONLY_SETTINGS are left out too (and `method_config` must be `{}`), so its id
    depends only on what changes an untrained evaluation. Pure: equal inputs give equal dicts.
    """
    if EVAL_TEMPERATURE not in settings:
        raise ValueError(f"settings must hold {EVAL_TEMPERATURE!r} (the TrainConfig as a dict)")
    clash = sorted({"train", EVAL_TEMPERATURE} & set(method_config))
    if clash:
        raise ValueError(f"method options may not be named {clash}: those names hold the run's own settings")
    skipped = set(KEY_SETTINGS) | set(NEUTRAL_SETTINGS)
    if settings.get("method") == BASE_METHOD:
        if method_config:
            raise ValueError(f"method {BASE_METHOD!r} (the untrained model) has no options, got {dict(method_config)}")
        skipped |= set(TRAINING_ONLY_SETTINGS)
    train = _without_legacy_values({k: v for k, v in settings.items() if k not in skipped}, LATER_SETTINGS)
    options = _without_legacy_values(method_config, LATER_METHOD_OPTIONS)
    return {**options, EVAL_TEMPERATURE: settings[EVAL_TEMPERATURE], "train": train}


def _without_legacy_values(values: Mapping[str, Any], legacy: Mapping[str, Any]) -> dict[str, Any]:
    """`values` without the entries that hold their `legacy` value (LATER_SETTINGS, LATER_METHOD_OPTIONS)."""
    return {name: value for name, value in values.items() if not (name in legacy and value == legacy[name])}


def weights_sha256(state_dict: Mapping[str, Any]) -> str:
    """SHA-256 of a model's weights: for each tensor in name order, its name, dtype, shape and raw bytes.

    Give it the policy's `state_dict()` before the first update (the row's `policy_sha256`): two runs share a base
    model exactly when this hash is equal, whatever the file format or path the weights came from.
    """
    import torch

    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name]
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
