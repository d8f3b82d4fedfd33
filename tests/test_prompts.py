"""Tests of the prompt module for both action formats: what the student sees, the chat system prompt, and reply
parsing that keeps free-form actions verbatim."""

from __future__ import annotations

import pytest
from test_engine import build_tokenizer

from craft_bench.agents.prompts import (
    DEFAULT_FREE_INSTRUCTION,
    SYSTEM_PROMPT,
    as_action_format,
    format_prompt,
    parse_action,
    student_text,
    system_prompt,
)
from craft_bench.envs.base import ActionFormat

FREE = ActionFormat("free", "search[QUERY] | answer[TEXT]", "Search the corpus, then answer.", ("search[who wrote x]",))
GOAL, OBS = "who wrote x?", "Nothing yet."


def test_choice_prompt_lists_the_admissible_actions_and_none_means_choice():
    text = student_text(GOAL, [], OBS, ["look", "go north"])
    assert text.splitlines()[-1] == "Admissible actions: look | go north"
    assert text == student_text(GOAL, [], OBS, ["look", "go north"], action_format={"kind": "choice"})
    assert "syntax" not in text


def test_free_prompt_states_syntax_and_instruction_and_lists_options_only_when_given():
    bare = student_text(GOAL, [], OBS, [], action_format=FREE.to_info())
    assert bare.splitlines()[-1] == "Action syntax: search[QUERY] | answer[TEXT]. Search the corpus, then answer."
    assert "Admissible actions" not in bare
    listed = student_text(GOAL, [], OBS, ["click[buy now]"], action_format=FREE)
    assert listed.splitlines()[-2:] == [bare.splitlines()[-1], "Admissible actions: click[buy now]"]
    default = student_text(GOAL, [], OBS, [], action_format=ActionFormat("free", "go[X]"))
    assert default.endswith(f"Action syntax: go[X]. {DEFAULT_FREE_INSTRUCTION}")


def test_history_shows_free_form_actions_as_taken():
    text = student_text(GOAL, [("Start.", "search[Who wrote X]")], OBS, [], action_format=FREE)
    assert "Action: search[Who wrote X]" in text.splitlines()


def test_system_prompt_follows_the_format():
    assert system_prompt(None) == SYSTEM_PROMPT and "admissible" in SYSTEM_PROMPT
    free = system_prompt(FREE.to_info())
    assert "admissible" not in free and "<action>search[who wrote x]</action>" in free
    assert "<action>search[QUERY]</action>" in system_prompt(ActionFormat("free", "search[QUERY] | answer[TEXT]"))
    chat = build_tokenizer(chat=True)
    assert free in format_prompt(chat, "Task: t", FREE.to_info())
    assert SYSTEM_PROMPT in format_prompt(chat, "Task: t")
    assert format_prompt(None, "Task: t", FREE) == "Task: t\nAction:"  # the plain format has no system prompt


@pytest.mark.parametrize(
    ("reply", "chat", "action"),
    [
        ("<action>search[Who wrote  X?]</action>", True, "search[Who wrote X?]"),
        ("I will answer. <action>answer[Jane Austen]</action> done", True, "answer[Jane Austen]"),
        (" search[Who wrote X?]\nanswer[no]", False, "search[Who wrote X?]"),
        (" click[Buy Now]\n", False, "click[Buy Now]"),
        ("search[x] without tags", True, None),
    ],
)
def test_free_form_replies_parse_verbatim(reply, chat, action):
    assert parse_action(reply, chat) == action


def test_bad_action_formats_are_rejected_by_name():
    with pytest.raises(ValueError, match="'kind'"):
        as_action_format({"syntax": "x"})
    with pytest.raises(ValueError, match="kind must be one of"):
        as_action_format({"kind": "menu"})
    with pytest.raises(TypeError, match="action_format"):
        as_action_format("free")
