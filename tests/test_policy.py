"""Tests of the policy: loading from a local directory, prompt ids and truncation, stop tokens, reply parsing
(a malformed reply becomes an invalid action, never a crash). No downloads: the model is built in the test."""

from __future__ import annotations

import pytest
import torch
from test_engine import build_tokenizer, random_llama

from craft_bench.agents.engine import Generation, SamplingParams
from craft_bench.agents.policy import Policy, load_policy, stop_token_ids
from craft_bench.agents.prompts import PromptConfig, format_prompt, student_text, teacher_text


class ScriptedEngine:
    """Answers every prompt with fixed replies (token ids of the given texts), in call order."""

    def __init__(self, tokenizer, replies: list[str]):
        self.tokenizer = tokenizer
        self.replies = list(replies)

    def generate(self, prompt_ids, sampling, seeds):
        texts, self.replies = self.replies[: len(prompt_ids)], self.replies[len(prompt_ids) :]
        ids = [self.tokenizer.encode(text) for text in texts]
        return [Generation(i, [-1.0] * len(i), True) for i in ids]

    def score(self, sequences, response_starts):
        raise NotImplementedError


GOAL, OBS, ADMISSIBLE = "reach 5", "Total 2. Noise 3", ["add 1", "add 2", "add 3"]
HISTORY = [("Reach 5. Noise 1", "add 1"), ("Total 1. Noise 2", "add 1")]


def test_plain_and_chat_prompts_follow_the_prompt_module():
    for chat in (False, True):
        tokenizer = build_tokenizer(chat=chat)
        policy = Policy(ScriptedEngine(tokenizer, []), tokenizer)
        prompts = policy.turn_prompts(GOAL, HISTORY, OBS, ADMISSIBLE, privileged_text="Expert plan from here: add 3")
        student = student_text(GOAL, HISTORY, OBS, ADMISSIBLE)
        assert policy.chat is chat
        assert tokenizer.decode(prompts.student_ids) == format_prompt(tokenizer, student)
        teacher = teacher_text("Expert plan from here: add 3", student)
        assert tokenizer.decode(prompts.teacher_ids) == format_prompt(tokenizer, teacher)


def test_free_form_prompts_follow_the_environments_action_format():
    free = {"kind": "free", "syntax": "search[QUERY] | answer[TEXT]", "instruction": "Search, then answer.",
            "examples": ["search[x]"]}
    for chat in (False, True):
        tokenizer = build_tokenizer(chat=chat)
        policy = Policy(ScriptedEngine(tokenizer, []), tokenizer)
        prompts = policy.turn_prompts(GOAL, HISTORY, OBS, [], "Expert plan from here: answer[5]", action_format=free)
        student = student_text(GOAL, HISTORY, OBS, [], action_format=free)
        assert "Action syntax: search[QUERY] | answer[TEXT]. Search, then answer." in student
        assert tokenizer.decode(prompts.student_ids) == format_prompt(tokenizer, student, free)
        assert tokenizer.decode(prompts.teacher_ids) == format_prompt(
            tokenizer, teacher_text("Expert plan from here: answer[5]", student), free
        )
        choice = policy.turn_prompts(GOAL, HISTORY, OBS, [])
        assert choice.student_ids != prompts.student_ids
        if chat:  # the system prompt asks for an admissible action only when the format is a choice
            assert "one of the admissible actions" in tokenizer.decode(choice.student_ids)
            assert "admissible" not in tokenizer.decode(prompts.student_ids).lower()


def test_long_prompts_drop_the_oldest_history_first():
    tokenizer = build_tokenizer()
    policy = Policy(ScriptedEngine(tokenizer, []), tokenizer, prompt_config=PromptConfig(history_turns=2))
    privileged = "Expert plan from here: add 3"
    full = policy.turn_prompts(GOAL, HISTORY, OBS, ADMISSIBLE, privileged, max_new_tokens=8)
    one_turn = policy.turn_prompts(GOAL, HISTORY[1:], OBS, ADMISSIBLE, privileged, max_new_tokens=8)
    no_turn = policy.turn_prompts(GOAL, [], OBS, ADMISSIBLE, privileged, max_new_tokens=8)
    policy.max_positions = len(full.teacher_ids) + 8 - 1  # one token too long for both turns
    truncated = policy.turn_prompts(GOAL, HISTORY, OBS, ADMISSIBLE, privileged, max_new_tokens=8)
    assert truncated.student_ids == one_turn.student_ids and truncated.teacher_ids == one_turn.teacher_ids
    policy.max_positions = 20 + 8
    last_resort = policy.turn_prompts(GOAL, HISTORY, OBS, ADMISSIBLE, privileged, max_new_tokens=8)
    assert len(last_resort.teacher_ids) == 20 and last_resort.teacher_ids == no_turn.teacher_ids[-20:]
    assert last_resort.student_ids == no_turn.student_ids[-20:]


def test_plain_replies_stop_at_newline_tokens_and_chat_replies_do_not():
    plain, chat = build_tokenizer(), build_tokenizer(chat=True)
    newline_ids = [i for i in range(len(plain)) if "\n" in plain.decode([i])]
    assert newline_ids and set(newline_ids) <= set(stop_token_ids(plain, chat=False))
    assert plain.eos_token_id in stop_token_ids(plain, chat=False)
    assert stop_token_ids(chat, chat=True, extra=[7]) == sorted({chat.eos_token_id, 7})


@pytest.mark.parametrize(
    ("chat", "reply", "action"),
    [
        (False, " add 2\n", "add 2"),
        (False, "\n", None),
        (False, "   ", None),
        (True, "I think <action>add 3</action>", "add 3"),
        (True, "add 3 without tags", None),
        (True, "<action>   </action>", None),
    ],
)
def test_replies_parse_into_actions_or_none(chat, reply, action):
    tokenizer = build_tokenizer(chat=chat)
    policy = Policy(ScriptedEngine(tokenizer, [reply]), tokenizer)
    (act,) = policy.act([[5, 6]], policy.sampling(), [0])
    assert act.reply == reply
    assert act.action == action
    # An unparseable reply reaches the environment as the empty command, which every env rejects as invalid.
    assert act.env_action == (action if action is not None else "")
    assert act.response_ids == tokenizer.encode(reply)


def test_a_saved_chat_tokenizer_loads_as_a_chat_policy(tmp_path):
    tokenizer = build_tokenizer(chat=True)
    random_llama(len(tokenizer), max_positions=64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    policy = Policy.from_pretrained(str(tmp_path))
    assert policy.chat
    assert policy.stop_token_ids == [tokenizer.eos_token_id]


def test_load_policy_from_a_local_directory(tmp_path):
    tokenizer = build_tokenizer()
    random_llama(len(tokenizer), max_positions=64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, loaded = load_policy(str(tmp_path))
    assert not model.training and model.dtype == torch.float32
    assert loaded.encode("add 2") == tokenizer.encode("add 2")
    policy = Policy.from_pretrained(str(tmp_path), max_batch_size=2)
    assert policy.max_positions == 64 and not policy.chat
    acts = policy.act([[5, 6, 7]] * 3, policy.sampling(max_new_tokens=4), [1, 2, 3])
    assert len(acts) == 3 and all(1 <= len(a.response_ids) <= 4 for a in acts)


def test_sampling_settings_carry_the_policy_stop_tokens():
    tokenizer = build_tokenizer()
    policy = Policy(ScriptedEngine(tokenizer, []), tokenizer)
    sampling = policy.sampling(temperature=0.7, top_p=0.9, max_new_tokens=9)
    assert sampling == SamplingParams(0.7, 0.9, 9, tuple(policy.stop_token_ids))


def test_tiny_resolves_through_the_tiny_model_builder(tmp_path, monkeypatch):
    from craft_bench.agents import tiny

    tokenizer = build_tokenizer()
    random_llama(len(tokenizer), max_positions=64).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    asked = {}

    def fake_tiny_model_path(**options):
        asked.update(options)
        return tmp_path

    monkeypatch.setattr(tiny, "tiny_model_path", fake_tiny_model_path)
    options = {"env_id": "craft/TextWorld-v0", "env_kwargs": {"level": 2}, "seed": 3, "budget": "smoke"}
    model, _ = load_policy("tiny", tiny_options=options)
    assert asked == options
    assert model.config.max_position_embeddings == 64
    with pytest.raises(ValueError, match="tiny_options apply only"):
        load_policy(str(tmp_path), tiny_options={"seed": 1})
