"""Building and caching a tiny model: expert data, tokenizer, model and SFT in order, saved with `save_pretrained`
under `$CRAFT_BENCH_HOME/models/tiny/<env>/<budget>-seed<S>-<key>`, where the key hashes every setting that changes it.

The key covers the environment id, its constructor kwargs, its version, data hash and action format (a regenerated
data set or a new env version never reuses a model trained on the old one), the seed, every budget field, the
recipe version and the craft-bench version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from craft_bench.agents.prompts import PromptConfig
from craft_bench.agents.tiny.budget import LATER_FIELDS, RECIPE_VERSION, TinyBudget, env_budget_name, resolve_budget
from craft_bench.agents.tiny.copying import pretrain_copying
from craft_bench.agents.tiny.data import ExpertRecord, collect_expert_records
from craft_bench.agents.tiny.model import count_parameters, make_model
from craft_bench.agents.tiny.sft import make_examples, relabel_ids, tokenize_examples, train_model
from craft_bench.agents.tiny.tokenizer import (
    name_tokenizer_class,
    newline_token_id,
    train_tokenizer,
)
from craft_bench.envs.cache import (
    CorruptCacheError,
    build_verified,
    cache_dir,
    check_manifest,
)

DEFAULT_ENV_ID = "craft/ALFWorldGen-v0"
#: Written next to the weights: how the model was built and what its prompts look like.
METADATA_FILE = "craft_tiny.json"


def build_tiny_model(
    out_dir: Path,
    env_id: str = DEFAULT_ENV_ID,
    seed: int = 0,
    budget: str | TinyBudget = "default",
    progress: bool = True,
    workers: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the tiny model into `out_dir` (weights, tokenizer, generation config, `craft_tiny.json`).

    `workers` environment processes collect the expert episodes (default `default_workers()`, 0: in this process);
    the result does not depend on it. Returns the metadata written to `craft_tiny.json`: settings, data
    statistics, sizes, wall-clock seconds and this process's CPU seconds per phase.
    """
    budget = resolve_budget(budget)
    started, cpu_started = time.perf_counter(), time.process_time()
    workers = default_workers() if workers is None else workers
    records, stats = collect_expert_records(env_id, budget, seed, env_kwargs=env_kwargs, workers=workers,
                                            progress=progress)
    if not records:
        raise RuntimeError(f"no expert states collected on {env_id}; is its expert plan empty? ({stats})")
    collect_seconds, collect_cpu = time.perf_counter() - started, time.process_time() - cpu_started
    metadata: dict[str, Any] = {
        "env_id": env_id, "env_kwargs": dict(env_kwargs or {}), "collection": dataclasses.asdict(stats),
        "collection_workers": workers,
    }
    metadata |= train_and_save(out_dir, records, budget, seed, progress)
    metadata["seconds"] = {"collect": round(collect_seconds, 1), **metadata["seconds"]}
    metadata["seconds"]["total"] = round(time.perf_counter() - started, 1)
    # CPU time of this process (the collection workers' engine time is not in it when workers > 0).
    metadata["cpu_seconds"] = {"collect": round(collect_cpu, 1), **metadata["cpu_seconds"]}
    metadata["cpu_seconds"]["total"] = round(time.process_time() - cpu_started, 1)
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def train_and_save(
    out_dir: Path, records: Sequence[ExpertRecord], budget: TinyBudget, seed: int, progress: bool = True,
) -> dict[str, Any]:
    """Examples, tokenizer and model from expert records, saved into `out_dir`; returns the build metadata."""
    started, cpu_started = time.perf_counter(), time.process_time()
    examples = make_examples(records, budget.teacher_fraction, seed)
    if budget.relabel_ids:
        examples = relabel_ids(examples, budget.id_prefix, budget.id_body_length, seed)
    tokenizer = train_tokenizer(lambda: (text for e in examples for text in (e.prompt, e.reply)), budget.vocab_size,
                                id_pattern=budget.id_pattern)
    tokenized = tokenize_examples(tokenizer, examples)
    kept = [e for e in tokenized if len(e) <= budget.max_positions]
    tokenized_at, tokenized_cpu = time.perf_counter(), time.process_time()

    generator = torch.Generator().manual_seed(seed)
    model = make_model(
        budget.shape, len(tokenizer), generator, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        stop_token_ids=[newline_token_id(tokenizer)],
    )
    copy_pretraining = None
    if budget.copy_pretrain_steps:
        special = set(tokenizer.all_special_ids)
        vocabulary = [i for i in range(len(tokenizer)) if i not in special]
        copy_pretraining = pretrain_copying(model, vocabulary, budget.copy_pretrain_steps, generator, progress)
    copied, copied_cpu = time.perf_counter(), time.process_time()
    epoch_losses = train_model(model, kept, budget, tokenizer.pad_token_id, generator, progress=progress)
    trained, trained_cpu = time.perf_counter(), time.process_time()

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    name_tokenizer_class(out_dir / "tokenizer_config.json")
    metadata = {
        "seed": seed,
        "budget": dataclasses.asdict(budget),
        "recipe_version": RECIPE_VERSION,
        "craft_bench_version": _package_version(),
        "prompt_config": dataclasses.asdict(PromptConfig(history_turns=budget.history_turns)),
        "newline_token_id": newline_token_id(tokenizer),
        "parameters": count_parameters(model),
        "vocab_size": len(tokenizer),
        "examples": len(kept),
        "examples_dropped_too_long": len(tokenized) - len(kept),
        "teacher_examples": sum(e.teacher for e in examples),
        "train_tokens_per_epoch": int(sum(len(e) for e in kept)),
        "prompt_tokens": {
            "student": _percentiles([len(t.prompt_ids) for t, e in zip(tokenized, examples) if not e.teacher]),
            "teacher": _percentiles([len(t.prompt_ids) for t, e in zip(tokenized, examples) if e.teacher]),
        },
        "copy_pretraining": copy_pretraining,
        "epoch_losses": [round(loss, 4) for loss in epoch_losses],
        "seconds": {"tokenize": round(tokenized_at - started, 1), "copy_pretrain": round(copied - tokenized_at, 1),
                    "train": round(trained - copied, 1)},
        "cpu_seconds": {"tokenize": round(tokenized_cpu - cpu_started, 1),
                        "copy_pretrain": round(copied_cpu - tokenized_cpu, 1),
                        "train": round(trained_cpu - copied_cpu, 1)},
        "torch_threads": torch.get_num_threads(),
    }
    (out_dir / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


def _percentiles(lengths: Sequence[int]) -> dict[str, int]:
    if not lengths:
        return {}
    return {f"p{q}": int(np.percentile(lengths, q)) for q in (50, 95, 100)}


def key_fields(budget: TinyBudget) -> dict[str, Any]:
    """The budget's fields that enter the cache key: all of them, except a field of `LATER_FIELDS` at its legacy
    value (so that adding a field never changes the key of a model built before it existed)."""
    return {
        name: value for name, value in dataclasses.asdict(budget).items()
        if not (name in LATER_FIELDS and value == LATER_FIELDS[name])
    }


def build_key(
    env_id: str, seed: int, budget: TinyBudget, env_fingerprint: dict[str, Any] | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> str:
    """Hash of every setting that changes the built model: environment (kwargs, version, data hash, action format),
    seed, budget, recipe and craft-bench versions."""
    settings = {
        "env_id": env_id, "env_kwargs": dict(env_kwargs or {}), "env": env_fingerprint or {}, "seed": seed,
        "budget": key_fields(budget), "recipe": RECIPE_VERSION, "craft_bench": _package_version(),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def env_fingerprint(env_id: str, env_kwargs: dict[str, Any] | None = None, split: str = "train") -> dict[str, Any]:
    """What identifies the training data of an environment: its version, its data hash when it has one, and its
    action format. Making an env is cheap by the environment contract (no engine work until reset)."""
    env = gym.make(env_id, disable_env_checker=True, **{**(env_kwargs or {}), "split": split})
    try:
        unwrapped = env.unwrapped
        action_format = getattr(unwrapped, "action_format", None)
        return {
            "env_version": str(unwrapped.env_version),
            "data_sha256": str(getattr(unwrapped, "data_sha256", "")),
            "action_format": action_format.to_info() if action_format is not None else {},
        }
    finally:
        env.close()


def default_workers() -> int:
    """Collection processes when none are asked for: one per core, at most 4 (an environment engine is single
    threaded, and more processes than cores only add start-up cost)."""
    return max(1, min(4, os.cpu_count() or 1))


def tiny_model_path(
    env_id: str = DEFAULT_ENV_ID,
    seed: int = 0,
    budget: str | TinyBudget = "default",
    progress: bool = True,
    workers: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
    shipped: bool = True,
) -> Path:
    """The directory of the tiny model for (env, env kwargs, seed, budget): the one shipped with craft-bench when
    there is one for exactly this key (`SHIPPED_DIR`, hash-pinned in `SHIPPED_PINS`), else built on first use and
    then loaded from the cache. `budget="default"` builds the environment's own default budget where it has one
    (`budget.ENV_DEFAULT_BUDGETS`). `shipped=False` always uses (or builds) the cache's own: a rebuilt model is a
    different model, with another weights hash. These are also the keys of `tiny_options`
    (`Policy.from_pretrained("tiny", tiny_options=...)`).

    Load it with `AutoModelForCausalLM.from_pretrained(path)` and `AutoTokenizer.from_pretrained(path)`.
    Safe when several processes ask at once (one builds, the others wait and reuse it).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    if env_kwargs is not None and not isinstance(env_kwargs, dict):
        raise TypeError(f"env_kwargs must be a dict of env constructor arguments, got {type(env_kwargs).__name__}")
    # The data is collected on the budget's split (`collect_split`) with the budget's episode cap.
    env_kwargs = {k: v for k, v in (env_kwargs or {}).items() if k not in ("split", "max_steps")}
    budget = env_budget_name(budget, env_id)
    resolved = resolve_budget(budget)
    key = build_key(env_id, seed, resolved, env_fingerprint(env_id, env_kwargs, resolved.collect_split), env_kwargs)
    name = f"{budget if isinstance(budget, str) else 'custom'}-seed{seed}-{key}"
    env_dir = env_id.replace("/", "__").replace(":", "__")
    if shipped:
        packaged = shipped_model(env_dir, name)
        if packaged is not None:
            return packaged
    target = cache_dir("models", "tiny", env_dir) / name
    # The entry carries a manifest of its files' sha256, checked on load: a corrupt model is rebuilt (the build is
    # deterministic for a seed), or reported with its path and the command that clears it.
    return build_verified(
        target, lambda tmp: build_tiny_model(tmp, env_id, seed, resolved, progress, workers, env_kwargs)
    )


SHIPPED_DIR = Path(__file__).parent / "shipped"
"""Tiny models shipped as package data: `<env dir>/<budget>-seed<seed>-<build key>/`, each with its manifest."""
SHIPPED_PINS = SHIPPED_DIR / "pins.json"
"""`{"<env dir>/<name>": sha256 of model.safetensors}`: the weights every published result of that model used."""


def shipped_model(env_dir: str, name: str) -> Path | None:
    """The shipped model `env_dir/name` after checking its files against its manifest and its weights against the
    pin; None if none is shipped for this key. A shipped model that fails a check is an error, never a rebuild."""
    entry = SHIPPED_DIR / env_dir / name
    pins = json.loads(SHIPPED_PINS.read_text()) if SHIPPED_PINS.exists() else {}
    pin = pins.get(f"{env_dir}/{name}")
    if pin is None:
        return None
    problem = check_manifest(entry)
    if problem is None:
        weights = hashlib.sha256((entry / "model.safetensors").read_bytes()).hexdigest()
        if weights != pin:
            problem = f"model.safetensors has sha256 {weights[:16]}..., the pin says {pin[:16]}..."
    if problem is not None:
        raise CorruptCacheError(
            f"the tiny model shipped with craft-bench at {entry} is damaged: {problem}. Reinstall craft-bench, or "
            "build your own with `python -m craft_bench.agents.tiny --rebuild` (a different model: its results "
            "are not comparable with the published ones)"
        )
    return entry


def load_metadata(model_path: str | Path) -> dict[str, Any]:
    """The build metadata of a tiny model directory."""
    path = Path(model_path) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{model_path} has no {METADATA_FILE}; is it a tiny model built by craft-bench?")
    return json.loads(path.read_text())


def _package_version() -> str:
    """The installed craft-bench version (read from the distribution, so agents/ never imports the top layer)."""
    return importlib.metadata.version("craft-bench")
