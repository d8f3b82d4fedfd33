"""Tests of the tiny model's expert data: labels from `privileged["expert_plan"]`, perturbations by action format,
determinism across worker counts, and examples in the teacher and student formats."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from fake_envs import PICK_PLACE_ENV_ID, QUIZ_ENV_ID, PickPlaceEnv

from craft_bench.agents.prompts import format_response
from craft_bench.agents.tiny import BUDGETS, TinyShape, make_model
from craft_bench.agents.tiny.budget import LATER_FIELDS
from craft_bench.agents.tiny.build import build_key, key_fields
from craft_bench.agents.tiny.data import collect_expert_records, malformed, perturbation
from craft_bench.agents.tiny.sft import TokenizedExample, collate, make_examples, reply_loss

TEST = BUDGETS["test"]


def test_expert_records_label_every_state_with_the_expert_action():
    budget = dataclasses.replace(TEST, perturbed_per_task=0)
    records, stats = collect_expert_records(PICK_PLACE_ENV_ID, budget, seed=0, progress=False)
    assert stats.episodes == stats.episodes_won == budget.n_train_tasks
    assert stats.planner_failures == 0 and stats.perturbations == 0 and stats.invalid_actions == 0
    first = records[0]
    assert first.student.startswith("Task: put a ") and "Admissible actions: look | go to " in first.student
    assert first.action in first.privileged and first.action.startswith("go to ")
    assert {r.task_id for r in records} <= set(PickPlaceEnv().task_ids)


def test_collect_split_chooses_the_games_the_model_is_fine_tuned_on():
    # RL draws from `train`; a build on a split of its own leaves those games new to the model.
    budget = dataclasses.replace(TEST, perturbed_per_task=0, collect_split="sft")
    records, _ = collect_expert_records(PICK_PLACE_ENV_ID, budget, seed=0, progress=False)
    assert records and {r.task_id for r in records} <= set(PickPlaceEnv(split="sft").task_ids)
    assert not {r.task_id for r in records} & set(PickPlaceEnv().task_ids)
    # A later field: absent from the key at "train", so older builds keep their keys; any other split is a new model.
    assert "collect_split" not in key_fields(TEST) and LATER_FIELDS["collect_split"] == "train"
    assert build_key(PICK_PLACE_ENV_ID, 0, budget) != build_key(PICK_PLACE_ENV_ID, 0, TEST)
    for split in ("valid", "valid_unseen", "test"):
        with pytest.raises(ValueError, match="evaluation split"):
            dataclasses.replace(TEST, collect_split=split)
    with pytest.raises(ValueError, match="collect_split must be a split name"):
        dataclasses.replace(TEST, collect_split="")


def test_perturbed_episodes_take_random_actions_and_still_win():
    budget = dataclasses.replace(TEST, clean_per_task=0, perturbed_per_task=3, perturb_prob=0.5, invalid_share=0.5)
    records, stats = collect_expert_records(PICK_PLACE_ENV_ID, budget, seed=0, progress=False)
    assert stats.perturbations > stats.invalid_actions > 0
    assert stats.episodes == 3 * budget.n_train_tasks and stats.episodes_won > 0
    # Recovery from a rejected action is in the data: the expert's label after "Nothing happens.".
    assert any("Current observation: Nothing happens." in r.student for r in records)
    assert len(records) == len({(r.student, r.privileged, r.action) for r in records})


def test_collection_does_not_depend_on_the_number_of_workers():
    in_process = collect_expert_records(PICK_PLACE_ENV_ID, TEST, seed=3, workers=0, progress=False)
    two_workers = collect_expert_records(PICK_PLACE_ENV_ID, TEST, seed=3, workers=2, progress=False)
    assert in_process == two_workers
    assert collect_expert_records(PICK_PLACE_ENV_ID, TEST, seed=4, progress=False) != in_process


def test_a_split_smaller_than_the_budget_is_cycled():
    budget = dataclasses.replace(TEST, n_train_tasks=20, clean_per_task=1, perturbed_per_task=0)
    records, stats = collect_expert_records(QUIZ_ENV_ID, budget, seed=0, env_kwargs={"num_tasks": 8}, progress=False)
    assert stats.tasks == 8 and stats.episodes == 20 == stats.episodes_won
    assert len({r.task_id for r in records}) == 8


def test_free_form_records_carry_the_syntax_and_the_expert_text():
    budget = dataclasses.replace(TEST, clean_per_task=0, perturbed_per_task=2, perturb_prob=0.5, invalid_share=0.5)
    records, stats = collect_expert_records(QUIZ_ENV_ID, budget, seed=0, progress=False)
    assert all("Action syntax: search[NAME] | answer[CITY]." in r.student for r in records)
    assert all("Admissible actions" not in r.student for r in records)  # the quiz lists no concrete options
    assert {r.action.split("[")[0] for r in records} == {"search", "answer"}
    assert all(r.action in r.privileged for r in records)
    # Malformed perturbations are rejected by the syntax check and show up as recovery states.
    assert stats.perturbations >= stats.invalid_actions > 0
    assert any("Current observation: Nothing happens." in r.student for r in records)


def test_choice_perturbations_are_stale_or_other_admissible_actions():
    rng = np.random.default_rng(0)
    picks = {perturbation("b", ["a", "b", "c"], ["z", "a", "b"], [], "choice", 0.5, rng) for _ in range(200)}
    assert picks == {"a", "c", "z"}
    assert perturbation("b", ["b"], ["b"], [], "choice", 0.5, rng) == "b"  # nothing else to do


def test_free_perturbations_are_malformed_or_well_formed_wrong_actions():
    rng = np.random.default_rng(0)
    picks = {
        perturbation("answer[oslo]", ["click[x]"], [], ["search[ann]", "answer[oslo]"], "free", 0.3, rng)
        for _ in range(200)
    }
    assert picks == {"answer oslo", "click[x]", "search[ann]"}
    assert perturbation("search[ann]", [], [], [], "free", 0.0, rng) == "search ann"  # no wrong action known
    assert malformed("search[who wrote x]") == "search who wrote x" and malformed("go north") == "go"


def test_examples_mix_teacher_and_student_formats():
    records, _ = collect_expert_records(PICK_PLACE_ENV_ID, TEST, seed=0, progress=False)
    examples = make_examples(records, teacher_fraction=0.5, seed=0)
    teacher = [e for e in examples if e.teacher]
    student = [e for e in examples if not e.teacher]
    assert teacher and student
    assert all(e.prompt.startswith("Privileged guidance") for e in teacher)
    assert all(e.prompt.startswith("Task: ") and e.prompt.endswith("\nAction:") for e in student)
    assert all(e.reply == format_response(None, r.action) for e, r in zip(examples, records))
    assert make_examples(records, 0.5, seed=0) == examples and make_examples(records, 0.5, seed=1) != examples


def test_an_unknown_split_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown split 'nope'"):
        collect_expert_records(PICK_PLACE_ENV_ID, TEST, seed=0, split="nope", progress=False)


def test_the_prompt_loss_adds_the_weighted_cross_entropy_of_every_prompt_token_after_the_first():
    model = make_model(TinyShape(16, 32, 1, 2, 64), 50, torch.Generator().manual_seed(0))
    examples = [TokenizedExample((3, 4, 5, 6), (7, 8)), TokenizedExample((9, 10), (11, 12, 13))]
    batch = collate(examples, pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def mean_ce(pairs):  # (row, position predicting the next token)
        return torch.stack([
            torch.nn.functional.cross_entropy(logits[r, t], batch["input_ids"][r, t + 1]) for r, t in pairs
        ]).mean()

    reply = mean_ce([(0, 3), (0, 4), (1, 1), (1, 2), (1, 3)])
    prompt = mean_ce([(0, 0), (0, 1), (0, 2), (1, 0)])  # padding and reply targets are never prompt targets
    with torch.no_grad():
        assert torch.allclose(reply_loss(model, batch), reply, atol=1e-6)
        assert torch.allclose(reply_loss(model, batch, 0.5), reply + 0.5 * prompt, atol=1e-6)


def test_a_budget_field_added_later_keeps_older_cache_keys_at_its_legacy_value():
    assert "prompt_loss_weight" not in key_fields(TEST) and LATER_FIELDS["prompt_loss_weight"] == 0.0
    weighted = dataclasses.replace(TEST, prompt_loss_weight=1.0)
    assert key_fields(weighted)["prompt_loss_weight"] == 1.0
    assert build_key(PICK_PLACE_ENV_ID, 0, weighted) != build_key(PICK_PLACE_ENV_ID, 0, TEST)
    with pytest.raises(ValueError, match="prompt_loss_weight"):
        dataclasses.replace(TEST, prompt_loss_weight=-1.0)
