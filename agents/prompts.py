"""Student and teacher prompts, and parsing an action out of a model's reply, for every action format.
The teacher prompt is the privileged block followed by the exact student prompt (CRAFT_SPEC.md section 1).

An environment declares its action format in `info["action_format"]` (envs/base.py `ActionFormat`): `choice`
(pick one of `info["admissible_actions"]`, the default) or `free` (free-form text in a stated syntax, e.g.
`search[QUERY] | answer[TEXT]`). Everything format-specific in a prompt comes from that declaration, so a new
environment needs no case here. Parsing is the same for both kinds: the reply's action is kept verbatim (only
whitespace is collapsed; the environment normalises case and aliases itself).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from craft_bench.envs.base import ActionFormat

#: The system prompt of chat models for `choice` environments.
SYSTEM_PROMPT = (
    "You are an agent in a text-based household or adventure game. Read the task, the recent turns and the "
    "current observation, then choose exactly one of the admissible actions. "
    "Reply with the action inside <action></action> tags, e.g. <action>go to desk 1</action>."
)
#: The system prompt of chat models for `free` environments; `{example}` is the format's first example.
FREE_SYSTEM_PROMPT = (
    "You are an agent in a text-based environment. Read the task, the recent turns and the current observation, "
    "then write exactly one action in the action syntax the prompt states. "
    "Reply with the action inside <action></action> tags, e.g. <action>{example}</action>."
)
#: What a free-form prompt says when the environment gives no instruction of its own.
DEFAULT_FREE_INSTRUCTION = "Write exactly one action in this syntax."
ACTION_TAG = re.compile(r"<action>\s*(.*?)\s*</action>", re.DOTALL | re.IGNORECASE)
#: The plain (non-chat) format ends the prompt with this cue; the reply is one action line ended by a newline.
PLAIN_ACTION_CUE = "Action:"

#: What `action_format=None` means everywhere: pick one of the admissible actions.
CHOICE = ActionFormat("choice")


@dataclass(frozen=True)
class PromptConfig:
    """How prompts are laid out."""

    history_turns: int = 2
    """H: how many past (observation, action) pairs the student sees."""
    show_admissible: bool = True
    """List the admissible actions in the prompt (the environments always report them)."""


def as_action_format(action_format: ActionFormat | Mapping[str, Any] | None) -> ActionFormat:
    """An `ActionFormat` from what an env reports (`info["action_format"]`, a plain dict), an `ActionFormat`, or
    None (the `choice` format)."""
    if action_format is None:
        return CHOICE
    if isinstance(action_format, ActionFormat):
        return action_format
    if isinstance(action_format, Mapping):
        if "kind" not in action_format:
            raise ValueError(f"an action format dict needs a 'kind' key (choice | free), got {dict(action_format)!r}")
        return ActionFormat.from_info(dict(action_format))
    raise TypeError(f"action_format must be an ActionFormat, its info dict or None, got {type(action_format).__name__}")


def student_text(
    goal: str,
    history: Sequence[tuple[str, str]],
    observation: str,
    admissible: Sequence[str],
    config: PromptConfig = PromptConfig(),
    action_format: ActionFormat | Mapping[str, Any] | None = None,
) -> str:
    """The student's view of one turn: task, last H (observation, action) pairs, current observation, actions.

    `history` holds (observation seen, action taken) pairs, oldest first; only the last H are rendered. The last
    lines say how to act: for `choice`, the admissible actions; for `free`, the syntax and instruction, then the
    concrete actions the state offers when the environment lists any.
    """
    fmt = as_action_format(action_format)
    lines = [f"Task: {goal.strip()}"]
    recent = list(history)[-config.history_turns :] if config.history_turns > 0 else []
    if recent:
        lines.append("Recent turns:")
        for seen, action in recent:
            lines.append(f"Observation: {_one_line(seen)}")
            lines.append(f"Action: {action}")
    lines.append(f"Current observation: {_one_line(observation)}")
    if fmt.kind == "free":
        lines.append(f"Action syntax: {fmt.syntax}. {_one_line(fmt.instruction or DEFAULT_FREE_INSTRUCTION)}")
    if config.show_admissible and (fmt.kind == "choice" or admissible):
        lines.append("Admissible actions: " + " | ".join(admissible))
    return "\n".join(lines)


def teacher_text(privileged_text: str, student: str) -> str:
    """The teacher's view: the privileged block, a blank line, then the student's view unchanged."""
    return f"{privileged_text.strip()}\n\n{student}"


def system_prompt(action_format: ActionFormat | Mapping[str, Any] | None = None) -> str:
    """The chat system prompt for an action format: `choice` asks for one of the admissible actions, `free` for
    one action in the stated syntax (its example is the format's first example, else its syntax)."""
    fmt = as_action_format(action_format)
    if fmt.kind == "choice":
        return SYSTEM_PROMPT
    example = fmt.examples[0] if fmt.examples else fmt.syntax.split("|")[0].strip()
    return FREE_SYSTEM_PROMPT.format(example=example)


def uses_chat_template(tokenizer) -> bool:
    """Chat models (a tokenizer with a chat template) get chat formatting and tagged actions."""
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer, text: str, action_format: ActionFormat | Mapping[str, Any] | None = None) -> str:
    """The exact string fed to the model: the chat template (with the format's system prompt) for chat models,
    else `text` plus the action cue."""
    if uses_chat_template(tokenizer):
        messages = [{"role": "system", "content": system_prompt(action_format)}, {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{text}\n{PLAIN_ACTION_CUE}"


def format_response(tokenizer, action: str) -> str:
    """The reply a model should produce for `action` (used to build supervised examples)."""
    if uses_chat_template(tokenizer):
        return f"<action>{action}</action>"
    return f" {action}\n"


def parse_action(reply: str, chat: bool) -> str | None:
    """The action in a reply, or None when the reply cannot be parsed (the environment then gets an invalid action).

    Chat replies must carry `<action>...</action>`; plain replies are the first non-empty line. The action is kept
    verbatim apart from collapsing whitespace, so free-form text such as `search[Who wrote X?]` reaches the
    environment as written.
    """
    if chat:
        match = ACTION_TAG.search(reply)
        action = match.group(1) if match else None
    else:
        action = next((line for line in reply.splitlines() if line.strip()), None)
    if action is None:
        return None
    action = " ".join(action.split())
    return action or None


def _one_line(text: str) -> str:
    """Observations may span lines; a prompt keeps one line per observation so turns stay readable."""
    return " ".join(text.split())
