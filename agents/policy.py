"""A language-model policy for the text games: loads any Hugging Face causal LM (or craft-bench's tiny model),
builds the student and teacher prompts of a turn as token ids, and turns sampled replies into environment actions.

Prompt truncation: when a prompt would not leave room for `max_new_tokens` inside the model's context, the oldest
history turns are dropped first (student and teacher keep the same history, so the teacher prompt is always the
privileged block plus the exact student prompt); if even no history does not fit, the prompt keeps its last tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# The policy depends on the tiny package (to resolve `--model tiny`), never the reverse (see agents/tiny/__init__.py).
from craft_bench.agents import tiny
from craft_bench.agents.engine import HFEngine, RolloutEngine, SamplingParams
from craft_bench.agents.prompts import (
    PromptConfig,
    format_prompt,
    parse_action,
    student_text,
    teacher_text,
    uses_chat_template,
)
from craft_bench.agents.tiny import TINY_MODEL, count_parameters
from craft_bench.envs.base import ActionFormat

__all__ = ["Act", "Policy", "TurnPrompts", "TINY_MODEL", "count_parameters", "load_policy", "pad_token_id",
           "stop_token_ids"]


@dataclass(frozen=True)
class Act:
    """One sampled reply and what it means for the environment."""

    response_ids: list[int]
    """The exact sampled token ids, stop token included (never re-tokenised)."""
    logprobs: list[float]
    """The sampler's log-probs of `response_ids` (see agents/engine.py)."""
    finished: bool
    """The reply ended on a stop token (False: cut at max_new_tokens)."""
    reply: str
    """The decoded reply, special tokens removed."""
    action: str | None
    """The parsed action, or None when the reply cannot be parsed (then it is sent as an invalid action)."""

    @property
    def env_action(self) -> str:
        """What the environment receives: the parsed action, else the empty command.

        Every environment rejects the empty command as an invalid action (a step, "Nothing happens."). Sending the
        raw reply instead could execute a tag-less chat reply that happens to be an admissible command, which
        would reward replies that break the format.
        """
        return self.action if self.action is not None else ""


@dataclass(frozen=True)
class TurnPrompts:
    """The token ids of one turn's prompts (the teacher's only when the privileged text was given)."""

    student_ids: list[int]
    teacher_ids: list[int] | None


class Policy:
    """A tokenizer, a rollout engine and the prompt format they imply (chat template + tags, or plain lines)."""

    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer,
        *,
        max_positions: int | None = None,
        extra_stop_ids: Sequence[int] = (),
        prompt_config: PromptConfig = PromptConfig(),
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.chat = uses_chat_template(tokenizer)
        self.max_positions = max_positions
        self.prompt_config = prompt_config
        self.stop_token_ids = stop_token_ids(tokenizer, self.chat, extra_stop_ids)
        if not self.stop_token_ids:
            raise ValueError("the tokenizer has no EOS token and no newline token: replies could never stop")

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        max_batch_size: int = 32,
        tiny_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Policy:
        """A policy over a Hugging Face engine for `model` (a hub id, a local path, or "tiny"); `kwargs` go to
        the constructor, `tiny_options` to `load_policy`."""
        lm, tokenizer = load_policy(model, device=device, dtype=dtype, tiny_options=tiny_options)
        engine = HFEngine(lm, pad_token_id=pad_token_id(tokenizer), max_batch_size=max_batch_size)
        eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
        extra = [eos] if isinstance(eos, int) else list(eos or [])
        max_positions = getattr(lm.config, "max_position_embeddings", None)
        return cls(engine, tokenizer, max_positions=max_positions, extra_stop_ids=extra, **kwargs)

    def sampling(self, temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = 32) -> SamplingParams:
        """Sampling settings that stop where this policy's replies end."""
        return SamplingParams(temperature, top_p, max_new_tokens, tuple(self.stop_token_ids))

    def encode(self, text: str, action_format: ActionFormat | Mapping[str, Any] | None = None) -> list[int]:
        """Token ids of a formatted prompt: chat templates carry their own special tokens (and the action format's
        system prompt), plain prompts get the tokenizer's usual ones (e.g. BOS)."""
        prompt = format_prompt(self.tokenizer, text, action_format)
        return list(self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"])

    def turn_prompts(
        self,
        goal: str,
        history: Sequence[tuple[str, str]],
        observation: str,
        admissible: Sequence[str],
        privileged_text: str | None = None,
        max_new_tokens: int = 32,
        *,
        action_format: ActionFormat | Mapping[str, Any] | None = None,
    ) -> TurnPrompts:
        """Student (and, given the privileged text, teacher) prompt ids, truncated as the module docstring says.

        `action_format` is the environment's `info["action_format"]` (None: pick one of `admissible`); it decides
        how the prompt asks for an action (see agents/prompts.py).
        """
        budget = None if self.max_positions is None else self.max_positions - max_new_tokens
        if budget is not None and budget < 1:
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in {self.max_positions} positions"
            )
        keep = min(len(history), self.prompt_config.history_turns)
        while True:
            recent = list(history)[len(history) - keep :] if keep else []
            student = student_text(goal, recent, observation, admissible, self.prompt_config, action_format)
            student_ids = self.encode(student, action_format)
            teacher_ids = (
                None if privileged_text is None
                else self.encode(teacher_text(privileged_text, student), action_format)
            )
            longest = max(len(student_ids), len(teacher_ids or []))
            if budget is None or longest <= budget:
                return TurnPrompts(student_ids, teacher_ids)
            if keep == 0:
                return TurnPrompts(student_ids[-budget:], None if teacher_ids is None else teacher_ids[-budget:])
            keep -= 1

    def act(self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> list[Act]:
        """Sample one reply per prompt in a single engine call and parse each into an action (or None)."""
        if not prompt_ids:
            return []
        generations = self.engine.generate(prompt_ids, sampling, seeds)
        acts = []
        for generation in generations:
            reply = self.tokenizer.decode(generation.token_ids, skip_special_tokens=True)
            action = parse_action(reply, self.chat)
            acts.append(Act(generation.token_ids, generation.logprobs, generation.finished, reply, action))
        return acts


def load_policy(
    model: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    tiny_options: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for a hub id, a local directory, or "tiny" (built offline, or loaded from the cache).

    `tiny_options` go to `agents.tiny.tiny_model_path` (env_id, env_kwargs, seed, budget, progress, workers) and
    only apply to "tiny".
    `dtype` defaults to float32 on CPU and bfloat16 on CUDA. The model is returned in eval mode on `device`.
    """
    if tiny_options and model != TINY_MODEL:
        raise ValueError(f"tiny_options apply only to --model {TINY_MODEL!r}, not to {model!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == TINY_MODEL:
        source = str(tiny.tiny_model_path(**(tiny_options or {})))
    else:
        from craft_bench.agents.models import resolve_model_source  # smollm2-135m, local dirs, .gguf files

        source = str(resolve_model_source(model))
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(source)
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device)
    lm.eval()
    return lm, tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (attention masks hide it either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def stop_token_ids(tokenizer, chat: bool, extra: Sequence[int] = ()) -> list[int]:
    """Where a reply ends: EOS (and any extra end-of-turn ids) always; for the plain format also every token whose
    text holds a newline, since a plain reply is one action line."""
    ids = {int(i) for i in extra}
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not chat:
        for token_id in range(len(tokenizer)):
            if "\n" in tokenizer.decode([token_id]):
                ids.add(token_id)
    return sorted(ids)
