"""Tests of multi-turn group rollouts on the group runner: a hand-checked episode's rows and bookkeeping, seeded
reproducibility (also across worker counts), padded tensors, and teacher scoring against a direct forward pass."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from craft_bench.agents.engine import HFEngine, response_logprobs
from craft_bench.agents.episodes import episode_return
from craft_bench.agents.policy import Policy
from craft_bench.agents.prompts import format_prompt
from craft_bench.agents.rollout import (
    collect_rollouts,
    evaluate_episodes,
    sample_seed,
    score_teacher,
)
from craft_bench.envs.group_runner import GroupRunner
from fake_envs import COUNTER_ENV_ID
from test_engine import build_tokenizer, random_llama
from test_policy import ScriptedEngine

MAX_STEPS = 8  # the fake env's default


@pytest.fixture(scope="module")
def runner():
    with GroupRunner(COUNTER_ENV_ID, num_workers=1) as group_runner:
        yield group_runner


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def lm_policy(tokenizer) -> Policy:
    torch.set_num_threads(1)
    return Policy(HFEngine(random_llama(len(tokenizer)), pad_token_id=0), tokenizer)


def scripted_policy(tokenizer, replies: list[str]) -> Policy:
    return Policy(ScriptedEngine(tokenizer, replies), tokenizer)


def test_hand_checked_group_rows_and_bookkeeping(runner, tokenizer):
    # Task count-3-0: reach exactly 3. Slot 0: add 2, an unparseable reply, add 1 -> won in 3 steps with 1 invalid.
    # Slot 1: add 2, add 2 -> overshoots to 4 and loses after 2 steps. One generate call per turn, active slots only.
    replies = [" add 2\n", " add 2\n", "\n", " add 2\n", " add 1\n"]
    policy = scripted_policy(tokenizer, replies)
    batch = collect_rollouts(runner, policy, ["count-3-0"], 2, sampling=policy.sampling(), seed=0)

    assert [(r.episode_id, r.turn_idx) for r in batch.rows] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert [r.group_id for r in batch.rows] == [0] * 5
    assert [r.action for r in batch.rows] == ["add 2", "", "add 1", "add 2", "add 2"]
    assert [r.reply for r in batch.rows] == [replies[i] for i in (0, 2, 4, 1, 3)]
    assert [r.parsed for r in batch.rows] == [True, False, True, True, True]
    assert [r.action_valid for r in batch.rows] == [True, False, True, True, True]
    assert [r.reward for r in batch.rows] == [0.0, 0.0, 1.0, 0.0, 0.0]
    assert [r.response_ids for r in batch.rows] == [tokenizer.encode(replies[i]) for i in (0, 2, 4, 1, 3)]

    won, lost = batch.episodes
    assert (won.task_id, won.task_type, won.won) == ("count-3-0", "count", True)
    assert (won.n_steps, won.n_invalid, won.env_return) == (3, 1, 1.0)
    assert (lost.won, lost.n_steps, lost.n_invalid, lost.env_return) == (False, 2, 0, 0.0)
    assert won.progress == 1.0
    assert [episode_return(e.won, e.n_invalid) for e in batch.episodes] == pytest.approx([9.9, 0.0])
    assert batch.env_steps == 5
    metrics = batch.metrics()
    assert metrics["rollout/success"] == 0.5 and metrics["rollout/episode_len"] == 2.5
    assert metrics["rollout/invalid_rate"] == pytest.approx(1 / 5)
    assert metrics["rollout/unparsed_rate"] == pytest.approx(1 / 5)

    # Turn 2 of slot 0 sees its two past turns (the rejected reply one-lined to "") and the env's rejection.
    third = tokenizer.decode(batch.rows[2].prompt_ids)
    assert "Recent turns:" in third and "Action: add 2\n" in third and "Current observation: Nothing happens." in third
    assert third.endswith(format_prompt(tokenizer, "Admissible actions: add 1 | add 2 | add 3 | crash"))
    teacher = tokenizer.decode(batch.rows[2].teacher_prompt_ids)
    assert teacher.startswith("Privileged guidance (teacher only):\nExpert plan from here: add 1\n\n")
    assert teacher.endswith(third)

    tensors = batch.to_tensors()
    lengths = [len(r.response_ids) for r in batch.rows]
    assert tensors.response_mask.sum(1).tolist() == lengths
    assert tensors.response_ids.shape == (5, max(lengths))
    assert tensors.episode_id.tolist() == [0, 0, 0, 1, 1]
    assert tensors.turn_idx.tolist() == [0, 1, 2, 0, 1]
    assert tensors.group_id.tolist() == [0] * 5
    assert torch.all(tensors.sampler_logp[tensors.response_mask] == -1.0)
    assert torch.all(tensors.sampler_logp[~tensors.response_mask] == 0.0)


def test_groups_and_slots_follow_the_runner_layout(runner, tokenizer):
    policy = scripted_policy(tokenizer, [" add 3\n"] * 4 + [" add 3\n"] * 2)
    batch = collect_rollouts(runner, policy, ["count-3-0", "count-6-3"], 2, sampling=policy.sampling(), seed=0)
    assert [(e.group_id, e.task_id, e.won, e.n_steps) for e in batch.episodes] == [
        (0, "count-3-0", True, 1), (0, "count-3-0", True, 1), (1, "count-6-3", True, 2), (1, "count-6-3", True, 2)
    ]
    assert [(r.group_id, r.episode_id, r.turn_idx) for r in batch.rows] == [
        (0, 0, 0), (0, 1, 0), (1, 2, 0), (1, 2, 1), (1, 3, 0), (1, 3, 1)
    ]


def test_seeded_rollouts_reproduce_exactly_and_ignore_worker_count(runner, lm_policy):
    sampling = lm_policy.sampling(temperature=1.0, max_new_tokens=6)
    first = collect_rollouts(runner, lm_policy, ["count-3-0", "count-4-1"], 2, sampling=sampling, seed=3, step=5)
    again = collect_rollouts(runner, lm_policy, ["count-3-0", "count-4-1"], 2, sampling=sampling, seed=3, step=5)
    assert first.rows == again.rows and first.episodes == again.episodes
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as two_workers:
        spread = collect_rollouts(
            two_workers, lm_policy, ["count-3-0", "count-4-1"], 2, sampling=sampling, seed=3, step=5
        )
    assert spread.rows == first.rows and spread.episodes == first.episodes
    # Siblings of a group start from one state: the same first prompt (different samples from there on).
    openings = {r.episode_id: r.prompt_ids for r in first.rows if r.turn_idx == 0}
    assert openings[0] == openings[1] and openings[2] == openings[3]
    other_step = collect_rollouts(runner, lm_policy, ["count-3-0", "count-4-1"], 2, sampling=sampling, seed=3, step=6)
    assert [r.response_ids for r in other_step.rows] != [r.response_ids for r in first.rows]
    # A random model mostly babbles: every such reply is an invalid step, never a crash; episodes end at max_steps.
    for episode in first.episodes:
        assert episode.won or episode.n_steps == MAX_STEPS
        assert episode.n_invalid == sum(not r.action_valid for r in first.rows if r.episode_id == episode.episode_id)


def test_waves_overlapping_env_and_generation_play_the_same_episodes(lm_policy):
    # Two waves take turns at the env workers: every reply keeps its (seed, step, slot, turn) seed, so the rows equal
    # the one-wave rollout's (this model's samples are far from float-rounding ties); rows stay in episode order.
    sampling = lm_policy.sampling(temperature=1.0, max_new_tokens=6)
    tasks = ["count-3-0", "count-4-1", "count-5-2"]
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as two_workers:
        one = collect_rollouts(two_workers, lm_policy, tasks, 3, sampling=sampling, seed=4, step=1)
        finished: list[int] = []
        two = collect_rollouts(two_workers, lm_policy, tasks, 3, sampling=sampling, seed=4, step=1, waves=2,
                               progress=finished.append)
        three = collect_rollouts(two_workers, lm_policy, tasks, 3, sampling=sampling, seed=4, step=1, waves=3)
    for other in (two, three):
        assert other.episodes == one.episodes
        assert [replace(r, logprobs=None) for r in other.rows] == [replace(r, logprobs=None) for r in one.rows]
        # The sampler's log-probs of a row differ only by float rounding of a differently composed batch.
        for row, reference in zip(other.rows, one.rows):
            assert row.logprobs == pytest.approx(reference.logprobs, abs=1e-5)
    assert sum(finished) == 9
    assert [(r.episode_id, r.turn_idx) for r in two.rows] == sorted((r.episode_id, r.turn_idx) for r in two.rows)
    with pytest.raises(ValueError, match="waves"):
        collect_rollouts(two_workers, lm_policy, tasks, 1, sampling=sampling, seed=0, waves=0)


def test_step_slots_steps_only_the_given_slots():
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as group_runner:
        group_runner.reset(["count-3-0", "count-4-1"], 2, seed=0)
        first = group_runner.step_slots({0: "add 1", 3: "add 2"})
        assert sorted(first) == [0, 3]
        assert group_runner.histories == [["add 1"], [], [], ["add 2"]]
        with pytest.raises(ValueError, match="slot 7"):
            group_runner.step_slots({7: "add 1"})
        with pytest.raises(TypeError, match="slot 1"):
            group_runner.step_slots({1: None})


def test_malformed_chat_replies_are_invalid_actions_even_when_they_name_one(runner):
    tokenizer = build_tokenizer(chat=True)
    policy = scripted_policy(tokenizer, ["add 1"] * MAX_STEPS)  # admissible, but not inside <action> tags
    batch = collect_rollouts(runner, policy, ["count-3-0"], 1, sampling=policy.sampling(), seed=0)
    (episode,) = batch.episodes
    assert (episode.won, episode.n_steps, episode.n_invalid) == (False, MAX_STEPS, MAX_STEPS)
    assert not any(r.parsed or r.action_valid for r in batch.rows)
    assert episode_return(episode.won, episode.n_invalid) == pytest.approx(-0.1 * MAX_STEPS)


def test_teacher_scores_equal_a_direct_forward_pass(lm_policy):
    sampling = lm_policy.sampling(temperature=1.0, max_new_tokens=5)
    with GroupRunner(COUNTER_ENV_ID, {"max_steps": 2}, num_workers=1) as short:
        batch = collect_rollouts(short, lm_policy, ["count-3-0"], 2, sampling=sampling, seed=1)
    assert len(batch.rows) == 4
    model = lm_policy.engine.model
    teacher = score_teacher(model, batch, pad_token_id=0, micro_batch=3)
    # An engine is accepted too (its model and pad id are used), with the same numbers.
    assert torch.equal(score_teacher(lm_policy.engine, batch, micro_batch=3), teacher)
    mask = batch.to_tensors().response_mask
    assert teacher.shape == mask.shape
    for row, record in enumerate(batch.rows):
        with torch.no_grad():
            logits = model(torch.tensor([record.teacher_prompt_ids + record.response_ids])).logits[0].float()
        start = len(record.teacher_prompt_ids)
        response = torch.tensor(record.response_ids)[:, None]
        direct = logits[start - 1 : -1].log_softmax(-1).gather(-1, response).squeeze(-1)
        assert torch.allclose(teacher[row, : len(record.response_ids)], direct, atol=1e-5)
        assert torch.all(teacher[row, len(record.response_ids) :] == 0)
        # The sampler's log-probs at T=1 are the student's own scores of the same ids.
        student = model(torch.tensor([record.prompt_ids + record.response_ids])).logits[0].float()
        own = student[len(record.prompt_ids) - 1 : -1].log_softmax(-1).gather(-1, response)
        assert torch.allclose(torch.tensor(record.logprobs), own.squeeze(-1).detach(), atol=1e-5)
    with torch.no_grad():
        student, _ = response_logprobs(model, [r.prompt_ids for r in batch.rows], [r.response_ids for r in batch.rows], micro_batch=3)
    assert torch.allclose(student, batch.to_tensors().sampler_logp, atol=1e-5)


def test_evaluation_records_one_episode_per_task(runner, tokenizer):
    policy = scripted_policy(tokenizer, [" add 3\n", " add 2\n", " add 2\n"])
    records = evaluate_episodes(runner, policy, ["count-3-0", "count-4-1"], temperature=0.0)
    assert [(r["task_id"], r["won"], r["steps"], r["invalid_actions"]) for r in records] == [
        ("count-3-0", True, 1, 0), ("count-4-1", True, 2, 0)
    ]
    assert records[0]["task_type"] == "count" and records[1]["progress"] == 1.0
    # What the policy did, per episode, readable from eval.csv: the actions sent and whether each was valid.
    assert [json.loads(r["actions"]) for r in records] == [[["add 3", True]], [["add 2", True], ["add 2", True]]]


def test_evaluation_samples_each_task_several_times_with_distinct_draws(runner, lm_policy):
    tasks = ["count-3-0", "count-4-1"]
    records = evaluate_episodes(runner, lm_policy, tasks, samples=3, temperature=1.0, seed=5, max_new_tokens=4)
    assert [r["task_id"] for r in records] == ["count-3-0"] * 3 + ["count-4-1"] * 3  # a task's samples together
    # Sibling draws: the samples of one task play differently (a random model at temperature 1), and the whole
    # list is a function of the seed.
    assert len({r["actions"] for r in records[:3]}) > 1
    again = evaluate_episodes(runner, lm_policy, tasks, samples=3, temperature=1.0, seed=5, max_new_tokens=4)
    assert [r["actions"] for r in again] == [r["actions"] for r in records]
    assert len(evaluate_episodes(runner, lm_policy, tasks, temperature=1.0, seed=5, max_new_tokens=4)) == 2


def test_evaluation_records_mark_invalid_actions(tokenizer):
    policy = scripted_policy(tokenizer, [" jump\n", " add 3\n"])
    with GroupRunner(COUNTER_ENV_ID, num_workers=0) as in_process:
        (record,) = evaluate_episodes(in_process, policy, ["count-3-0"], temperature=0.0)
    assert json.loads(record["actions"]) == [["jump", False], ["add 3", True]]
    assert record["invalid_actions"] == 1


def test_evaluation_records_carry_the_dataset_and_score_of_their_episodes_last_info(tokenizer, monkeypatch):
    from fake_envs import CounterEnv

    # Search-QA reports a dataset per question, WebShop a purchase score: each record carries its own episode's.
    monkeypatch.setattr(CounterEnv, "_extra_info", lambda self: {"dataset": f"d{self._target}", "task_score": 0.25})
    policy = scripted_policy(tokenizer, [" add 3\n", " add 2\n", " add 2\n"])
    with GroupRunner(COUNTER_ENV_ID, num_workers=0) as in_process:
        records = evaluate_episodes(in_process, policy, ["count-3-0", "count-4-1"], temperature=0.0)
    assert [(r["dataset"], r["task_score"]) for r in records] == [("d3", 0.25), ("d4", 0.25)]


def test_sample_seeds_are_distinct_per_step_slot_and_turn():
    seeds = {sample_seed(0, step, slot, turn) for step in range(3) for slot in range(4) for turn in range(5)}
    assert len(seeds) == 60
    assert sample_seed(0, 1, 2, 3) == sample_seed(0, 1, 2, 3)


class RecordingEngine(ScriptedEngine):
    """A scripted engine that also keeps the prompts it was asked to continue."""

    def __init__(self, tokenizer, replies):
        super().__init__(tokenizer, replies)
        self.prompts: list[list[int]] = []

    def generate(self, prompt_ids, sampling, seeds):
        self.prompts += [list(p) for p in prompt_ids]
        return super().generate(prompt_ids, sampling, seeds)


def test_evaluation_acts_on_the_teacher_prompt_when_asked(runner, tokenizer):
    for act_on in ("student", "teacher"):
        engine = RecordingEngine(tokenizer, [" add 3\n"])
        policy = Policy(engine, tokenizer)
        records = evaluate_episodes(runner, policy, ["count-3-0"], act_on=act_on)
        assert records[0]["won"] and records[0]["steps"] == 1
        seen = tokenizer.decode(engine.prompts[0])
        assert seen.startswith("Privileged guidance (teacher only):") == (act_on == "teacher")
    with pytest.raises(ValueError, match="act_on"):
        evaluate_episodes(runner, policy, ["count-3-0"], act_on="oracle")
