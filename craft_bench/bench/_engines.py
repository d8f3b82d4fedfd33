"""Rollout engines compared: generated tokens per second of each engine (`hf`, `vllm`) on the same prompts, with
the same sampling settings and seeds, measured in one process; the hook behind `bench rollout --engine hf,vllm`.

Prompts are real first-turn student prompts of an environment's tasks under the model's own prompt format (chat
template for a chat model), repeated G times per task as a rollout's siblings are. Every engine gets one warm-up
call (vLLM's start-up is reported separately), then `--rollouts` timed `generate` calls on the same prompt batch.
Samples differ between engines (each has its own random numbers), so the table reports mean reply length beside
tokens/s; at temperature 0 both are greedy and the table also reports how many replies equal HF's exactly.
Standalone: `python -m craft_bench.bench._engines --model smollm2-135m --engine hf,vllm`.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

ENGINES = ("hf", "vllm")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The options this comparison adds to `bench rollout` (the others it reads are rollout's own)."""
    parser.add_argument("--engine", default=None,
                        help="comma-separated engines to compare on the same prompts: hf, vllm (e.g. hf,vllm)")
    parser.add_argument("--vllm-dtype", default=None, help="vLLM dtype (default: float32 on CPU, auto on CUDA)")
    parser.add_argument("--vllm-max-model-len", type=int, default=2048, help="vLLM max_model_len (bounds its KV cache)")
    parser.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.5)


def parse_engines(text: str) -> list[str]:
    """`hf,vllm` -> ["hf", "vllm"], rejecting unknown names and repeats."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in ENGINES]
    if not names or unknown or len(set(names)) != len(names):
        raise ValueError(f"--engine takes a comma-separated list of distinct names from {ENGINES}, got {text!r}")
    return names


def first_turn_prompts(policy: Any, env_id: str, env_kwargs: dict[str, Any], n_tasks: int) -> list[list[int]]:
    """Student prompt ids of the first turn of the first `n_tasks` tasks of the environment's split."""
    import gymnasium as gym

    import craft_bench  # noqa: F401  (registers the environments)

    env = gym.make(env_id, **env_kwargs)
    try:
        task_ids = list(env.unwrapped.task_ids)[:n_tasks]
        prompts = []
        for task_id in task_ids:
            observation, info = env.reset(options={"task_id": task_id})
            prompts.append(policy.turn_prompts(info["goal"], [], observation, info["admissible_actions"]).student_ids)
    finally:
        env.close()
    return prompts


def compare_engines(
    engines: Sequence[str],
    model_source: str,
    policy: Any,
    prompt_ids: list[list[int]],
    sampling: Any,
    seeds: list[int],
    rollouts: int,
    vllm_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One row per engine: start-up seconds, generated tokens, tokens/s over `rollouts` timed calls, mean reply
    length, and (greedy only) how many replies equal the HF engine's."""
    rows: list[dict[str, Any]] = []
    reference: list[list[int]] | None = None
    for name in engines:
        tick = time.perf_counter()
        if name == "hf":
            engine = policy.engine
        else:
            from craft_bench.agents.vllm_engine import VLLMConfig, VLLMEngine

            engine = VLLMEngine(model_source, VLLMConfig(**(vllm_options or {})))
        startup_s = time.perf_counter() - tick
        try:
            warm = engine.generate(prompt_ids, sampling, seeds)
            tokens, elapsed = 0, 0.0
            for _ in range(rollouts):
                tick = time.perf_counter()
                generations = engine.generate(prompt_ids, sampling, seeds)
                elapsed += time.perf_counter() - tick
                tokens += sum(len(g.token_ids) for g in generations)
        finally:
            if name != "hf":
                engine.close()
        replies = [g.token_ids for g in warm]
        row = {"engine": name, "startup_s": startup_s, "tokens": tokens, "seconds": elapsed,
               "tokens_per_s": tokens / max(elapsed, 1e-9), "mean_reply_tokens": tokens / (rollouts * len(prompt_ids))}
        if sampling.temperature == 0:
            if name == "hf":
                reference = replies
            if reference is not None:
                row["greedy_equal_to_hf"] = f"{sum(a == b for a, b in zip(replies, reference))}/{len(replies)}"
        rows.append(row)
    return rows


def run_engine_comparison(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`bench rollout --engine ...`: build the policy and prompts from rollout's options, compare, print a table."""
    import json

    from craft_bench.agents.engine import HFEngine
    from craft_bench.agents.models import resolve_model_source
    from craft_bench.agents.policy import Policy, load_policy, pad_token_id

    engines = parse_engines(args.engine)
    torch.set_num_threads(args.threads)
    if args.model in ("random", "tiny"):
        raise ValueError(f"--engine compares engines on a model directory both can load, not --model {args.model}: "
                         "give --model smollm2-135m or a local model path")
    source = str(resolve_model_source(args.model))
    lm, tokenizer = load_policy(source, device=args.device)
    policy = Policy(HFEngine(lm, pad_token_id(tokenizer)), tokenizer,
                    max_positions=getattr(lm.config, "max_position_embeddings", None))
    env_id = "craft/ALFWorldGen-v0" if args.env == "auto" else args.env
    env_kwargs = json.loads(args.env_kwargs) if getattr(args, "env_kwargs", None) else {}
    env_kwargs.update(split=args.split, max_steps=args.max_steps)
    tasks = first_turn_prompts(policy, env_id, env_kwargs, args.tasks)
    prompt_ids = [prompt for prompt in tasks for _ in range(args.group_size)]
    seeds = list(range(len(prompt_ids)))
    sampling = policy.sampling(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    on_cpu = torch.device(args.device).type == "cpu"
    vllm_options = {"dtype": args.vllm_dtype or ("float32" if on_cpu else "auto"), "enforce_eager": on_cpu,
                    "max_model_len": args.vllm_max_model_len, "max_num_seqs": max(len(prompt_ids), 1),
                    "gpu_memory_utilization": args.vllm_gpu_memory_utilization}
    rows = compare_engines(engines, source, policy, prompt_ids, sampling, seeds, args.rollouts, vllm_options)
    mean_prompt = sum(len(p) for p in prompt_ids) / len(prompt_ids)
    print(f"model: {args.model} ({sum(p.numel() for p in lm.parameters()) / 1e6:.1f}M parameters), device "
          f"{args.device}, torch threads {args.threads}, VLLM_CPU_OMP_THREADS_BIND="
          f"{os.environ.get('VLLM_CPU_OMP_THREADS_BIND', 'unset')}")
    print(f"prompts: {args.tasks} tasks of {env_id} x G={args.group_size} = {len(prompt_ids)} first-turn prompts, "
          f"mean {mean_prompt:.0f} tokens; temperature {args.temperature}, max_new_tokens {args.max_new_tokens}; "
          f"{args.rollouts} timed calls after one warm-up; vLLM {vllm_options}")
    print()
    columns = ["engine", "startup_s", "tokens", "seconds", "tokens_per_s", "mean_reply_tokens"]
    if any("greedy_equal_to_hf" in row for row in rows):
        columns.append("greedy_equal_to_hf")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        print("| " + " | ".join(cells) + " |")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench._engines", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, a local model directory, or a .gguf")
    parser.add_argument("--env", default="auto", help="an env id (auto: craft/ALFWorldGen-v0)")
    parser.add_argument("--env-kwargs", default=None, help="JSON dict of env kwargs")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tasks", type=int, default=4, help="B: tasks (distinct prompts)")
    parser.add_argument("--group-size", type=int, default=4, help="G: copies of each prompt")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rollouts", type=int, default=2, help="timed generate calls per engine (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the HF engine")
    parser.add_argument("--device", default="cpu")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    args.engine = args.engine or "hf,vllm"
    run_engine_comparison(args)


if __name__ == "__main__":  # vLLM starts worker processes: the guard keeps them from re-running this script
    main()
