"""`python -m craft_bench.bench rollout`: generated tokens per second, environment steps per second during rollouts,
and teacher-scoring time as a fraction of rollout time, for a tiny model on this machine.

Model: `--model tiny` is craft-bench's own tiny model for the environment (built offline on first use, which takes
minutes); `--model random` (the default) is a randomly initialised Llama of the default tiny model's shape (hidden
256, MLP 512, 4 layers, 4 heads, tied embeddings; `agents/tiny/model.py`) over the tiny model's byte-level BPE
(about 2k tokens) trained here on the environment's own prompts; any other value is a Hugging Face id or local path. A random model babbles, so its episodes run to
max_steps with invalid actions and its replies run to max_new_tokens unless it samples a newline: per token the
cost is that of the trained model, per episode it is the worst case. The output says which model was measured.
One warm-up rollout (worker start-up, first-call overheads) is excluded from the timings.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import gymnasium as gym
import torch

import craft_bench
from craft_bench.agents.engine import HFEngine
from craft_bench.agents.policy import Policy, pad_token_id
from craft_bench.agents.prompts import student_text, teacher_text
from craft_bench.agents.rollout import collect_rollouts, score_teacher
from craft_bench.agents.tiny import BUDGETS, count_parameters, make_model
from craft_bench.agents.tiny.tokenizer import newline_token_id, train_tokenizer
from craft_bench.envs.group_runner import GroupRunner

#: Environment kwargs used when `--env-kwargs` is not given: few TextWorld games, so game compilation stays cached.
DEFAULT_ENV_KWARGS = {"craft/TextWorld-v0": {"n_games": 4}}
PREFERRED_ENVS = ("craft/ALFWorldGen-v0", "craft/TextWorld-v0")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random", help="random (default) | tiny | a Hugging Face id or local path")
    parser.add_argument("--env", default="auto", help=f"an env id; auto: the first of {PREFERRED_ENVS} that works")
    parser.add_argument("--env-kwargs", default=None, help="JSON dict of env kwargs (default: a small env setting)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--tasks", type=int, default=4, help="B: tasks per rollout")
    parser.add_argument("--group-size", type=int, default=4, help="G: siblings per task")
    parser.add_argument("--max-steps", type=int, default=10, help="the env's max_steps (turns per episode)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rollouts", type=int, default=2, help="timed rollouts (after one warm-up)")
    parser.add_argument("--workers", type=int, default=1, help="environment worker processes")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--device", default="cpu")
    from craft_bench.bench._engines import add_engine_arguments, run_engine_comparison

    add_engine_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.engine:  # --engine hf,vllm: tokens/s of each engine on the same prompts, in one run
        run_engine_comparison(args)
        return

    env_id = _pick_env(args.env)
    env_kwargs = json.loads(args.env_kwargs) if args.env_kwargs else dict(DEFAULT_ENV_KWARGS.get(env_id, {}))
    env_kwargs.update(split=args.split, max_steps=args.max_steps)
    env = gym.make(env_id, **env_kwargs)
    task_pool = env.unwrapped.task_ids
    texts = _prompt_texts(env, task_pool[: args.tasks])
    env.close()
    task_ids = [task_pool[i % len(task_pool)] for i in range(args.tasks)]

    tiny_options = {"env_id": env_id, "env_kwargs": env_kwargs} if args.model == "tiny" else None
    policy, model_note = _make_policy(args.model, args.device, texts, tiny_options)
    sampling = policy.sampling(temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    rollout_s = generate_s = env_s = teacher_s = 0.0
    tokens = steps = rows = prompt_tokens = teacher_tokens = 0
    with GroupRunner(env_id, env_kwargs, num_workers=args.workers) as runner:
        collect_rollouts(runner, policy, task_ids, args.group_size, sampling=sampling, seed=0, step=0)
        for step in range(1, args.rollouts + 1):
            batch = collect_rollouts(runner, policy, task_ids, args.group_size, sampling=sampling, seed=0, step=step)
            tick = time.perf_counter()
            score_teacher(policy.engine, batch)
            teacher_s += time.perf_counter() - tick
            rollout_s += batch.timings["rollout_s"]
            generate_s += batch.timings["generate_s"]
            env_s += batch.timings["env_s"]
            tokens += batch.generated_tokens
            steps += batch.env_steps
            rows += len(batch.rows)
            prompt_tokens += sum(len(r.prompt_ids) for r in batch.rows)
            teacher_tokens += sum(len(r.teacher_prompt_ids or []) for r in batch.rows)

    print(f"model: {model_note}")
    print(f"env: {env_id} {json.dumps(env_kwargs)}; B={args.tasks} G={args.group_size}; "
          f"{args.rollouts} timed rollouts; torch threads {args.threads}, {args.workers} env worker(s), "
          f"device {args.device}")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| rows (turns) | {rows} |")
    print(f"| mean prompt tokens: student / teacher | {prompt_tokens / max(rows, 1):.0f} / "
          f"{teacher_tokens / max(rows, 1):.0f} |")
    print(f"| generated tokens | {tokens} (mean {tokens / max(rows, 1):.1f} per reply) |")
    print(f"| generated tokens / s (generate calls only) | {tokens / generate_s:.0f} |")
    print(f"| generated tokens / s (whole rollout) | {tokens / rollout_s:.0f} |")
    print(f"| env steps / s during rollouts | {steps / rollout_s:.1f} |")
    other_s = rollout_s - generate_s - env_s
    print(f"| rollout time split: generate / env / prompts+other | {generate_s / rollout_s:.0%} / "
          f"{env_s / rollout_s:.0%} / {other_s / rollout_s:.0%} |")
    print(f"| rollout time (s) | {rollout_s:.2f} |")
    print(f"| teacher scoring time (s) | {teacher_s:.2f} |")
    print(f"| teacher scoring / rollout time | {teacher_s / rollout_s:.1%} |")


def _pick_env(requested: str) -> str:
    if requested != "auto":
        return requested
    reasons = []
    for env_id in PREFERRED_ENVS:
        try:
            gym.make(env_id, **DEFAULT_ENV_KWARGS.get(env_id, {})).close()
            return env_id
        except Exception as error:  # an env still under construction must not stop the benchmark
            reasons.append(f"{env_id}: {type(error).__name__}: {error}")
    raise RuntimeError("no environment could be made:\n" + "\n".join(reasons))


def _prompt_texts(env: gym.Env, task_ids: Sequence[str]) -> list[str]:
    """Student and teacher prompts of the first turn of some tasks: the text a benchmark tokenizer is trained on."""
    texts = []
    for task_id in task_ids:
        observation, info = env.reset(options={"task_id": task_id})
        student = student_text(info["goal"], [], observation, info["admissible_actions"],
                               action_format=info.get("action_format"))
        texts += [student, teacher_text(info["privileged"]["text"], student)]
        texts += [f" {action}\n" for action in info["admissible_actions"]]
    return texts


def _make_policy(
    model: str, device: str, texts: list[str], tiny_options: dict | None = None
) -> tuple[Policy, str]:
    if model != "random":
        policy = Policy.from_pretrained(model, device=device, tiny_options=tiny_options)
        return policy, f"{model} ({count_parameters(policy.engine.model) / 1e6:.2f}M parameters)"
    tokenizer = _benchmark_tokenizer(texts)
    lm = _random_tiny_llama(tokenizer).to(device)
    shape = BUDGETS["default"].shape
    note = (f"random (untrained) Llama of the default tiny model's shape: hidden {shape.hidden_size}, "
            f"{shape.num_layers} layers, {shape.num_heads} heads, vocab {len(tokenizer)}, "
            f"{count_parameters(lm) / 1e6:.2f}M parameters")
    engine = HFEngine(lm, pad_token_id(tokenizer))
    return Policy(engine, tokenizer, max_positions=lm.config.max_position_embeddings), note


def _benchmark_tokenizer(texts: list[str], vocab_size: int = 2048):
    """The tiny model's tokenizer (agents/tiny/tokenizer.py), trained on `texts`; a few games' text cannot fill
    `vocab_size` merges, so unused special tokens pad the vocabulary to the tiny model's size (the model's
    embedding and output layer then have the shape, and the cost, of the real one)."""
    tokenizer = train_tokenizer(lambda: iter(texts * 4), vocab_size)
    unused = [f"<unused{i}>" for i in range(vocab_size - len(tokenizer))]
    tokenizer.add_special_tokens({"additional_special_tokens": unused})
    return tokenizer


def _random_tiny_llama(tokenizer):
    """An untrained model of the default tiny model's shape (agents/tiny/model.py), from a fixed seed."""
    return make_model(
        BUDGETS["default"].shape, len(tokenizer), torch.Generator().manual_seed(0),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, stop_token_ids=[newline_token_id(tokenizer)],
    )


if __name__ == "__main__":
    main()
