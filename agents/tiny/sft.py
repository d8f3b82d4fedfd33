"""Supervised fine-tuning of the tiny model: expert records become (prompt, reply) examples in the teacher or the
student format, are tokenised, and train the model on the reply tokens, plus the prompt tokens at a budget's
`prompt_loss_weight` (AdamW, warm-up and cosine decay)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from craft_bench.agents.prompts import format_prompt, format_response, teacher_text
from craft_bench.agents.tiny.budget import TinyBudget
from craft_bench.agents.tiny.data import ExpertRecord
from craft_bench.agents.tiny.tokenizer import ID_ALPHABET, id_word_pattern

#: The plain prompt format needs no chat template; `format_prompt` only asks the tokenizer whether it has one.
_PLAIN = None


@dataclass(frozen=True)
class TextExample:
    """One supervised example: the exact prompt string and the exact reply string."""

    prompt: str
    reply: str
    teacher: bool


def make_examples(records: Sequence[ExpertRecord], teacher_fraction: float, seed: int) -> list[TextExample]:
    """Render each record in the teacher format with probability `teacher_fraction`, else in the student format.
    The prompt is the plain format of agents/prompts.py, the reply the expert's action and a newline (the record's
    `teacher_action` in the teacher format when it has one)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
    use_teacher = rng.random(len(records)) < teacher_fraction
    examples = []
    for record, teacher in zip(records, use_teacher):
        text = teacher_text(record.privileged, record.student) if teacher else record.student
        action = (record.teacher_action or record.action) if teacher else record.action
        examples.append(TextExample(format_prompt(_PLAIN, text), format_response(_PLAIN, action), bool(teacher)))
    return examples


def relabel_ids(examples: Sequence[TextExample], prefix: str, body_length: int, seed: int) -> list[TextExample]:
    """Each example with every identifier `prefix` + `body_length` letters or digits (any case) replaced by a fresh
    random one, the same replacement for all its occurrences (upper case stays upper case) and a different one in
    every example.

    A build's catalogue repeats its product ids across thousands of examples, so a small model can learn to write
    ids it has seen instead of copying the one in front of it (measured on WebShopGen, docs/tiny_models.md: 5 of the
    6 well-formed ids its held-out clicks wrote were other catalogue products, none on the page). With ids that never
    repeat, copying is the only way to predict them. The example stays a valid demonstration: an id is only a name,
    and the renaming is consistent inside the prompt and the reply.
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    alphabet = np.array(list(ID_ALPHABET))
    pattern = re.compile(id_word_pattern(prefix, body_length), re.IGNORECASE)
    relabelled = []
    for example in examples:
        renamed: dict[str, str] = {}  # old id (lower case) -> its new id, for this example only
        for text in (example.prompt, example.reply):
            for match in pattern.finditer(text):
                old = match.group(0).lower()
                if old in renamed:
                    continue
                new = prefix + "".join(rng.choice(alphabet, body_length))
                while new in renamed.values():  # two old ids never share a new one
                    new = prefix + "".join(rng.choice(alphabet, body_length))
                renamed[old] = new

        def rename(match: re.Match, renamed: dict[str, str] = renamed) -> str:
            new = renamed[match.group(0).lower()]
            return new.upper() if match.group(0).isupper() else new

        relabelled.append(TextExample(pattern.sub(rename, example.prompt), pattern.sub(rename, example.reply),
                                      example.teacher))
    return relabelled


@dataclass(frozen=True)
class TokenizedExample:
    """Prompt ids followed by reply ids; the loss covers the reply ids (and the prompt ids at a prompt weight)."""

    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.reply_ids)


def tokenize_examples(tokenizer, examples: Sequence[TextExample]) -> list[TokenizedExample]:
    """Prompt and reply are encoded separately, exactly as a rollout encodes the prompt and then generates."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=False)["input_ids"]
    replies = tokenizer([e.reply for e in examples], add_special_tokens=False)["input_ids"]
    return [TokenizedExample(tuple(p), tuple(r)) for p, r in zip(prompts, replies)]


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator) -> list[list[int]]:
    """One epoch of batches: shuffled, then sorted by length inside windows of 50 batches to cut padding."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = 50 * batch_size
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def collate(examples: Sequence[TokenizedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask`, `target_mask` (True where the next token is a reply token) and
    `prompt_target_mask` (True where the next token is a prompt token)."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    target_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    prompt_target_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.reply_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        # Position t predicts token t+1: from the last prompt token to the one before the last reply token.
        target_mask[row, len(example.prompt_ids) - 1 : len(ids) - 1] = True
        prompt_target_mask[row, : len(example.prompt_ids) - 1] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask,
            "prompt_target_mask": prompt_target_mask}


def next_token_logits(model, hidden: torch.Tensor, input_ids: torch.Tensor,
                      predicts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM head's logits at the positions `predicts` marks ((batch, width - 1): position t predicts token t+1) and
    the tokens they predict; the head runs on those positions only, since most positions of a long prompt need none."""
    return model.lm_head(hidden[:, :-1][predicts]), input_ids[:, 1:][predicts]


def reply_loss(model, batch: dict[str, torch.Tensor], prompt_loss_weight: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of the reply tokens, plus `prompt_loss_weight` x the mean cross-entropy of the prompt
    tokens after the first. At weight 0 the LM head runs on the reply positions only (prompts are long)."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    # The last position predicts nothing: neither mask marks it (`collate`).
    logits, targets = next_token_logits(model, hidden, batch["input_ids"], batch["target_mask"][:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.float(), targets)
    if prompt_loss_weight == 0.0:
        return loss
    logits, targets = next_token_logits(model, hidden, batch["input_ids"], batch["prompt_target_mask"][:, :-1])
    return loss + prompt_loss_weight * torch.nn.functional.cross_entropy(logits.float(), targets)


def train_model(
    model, examples: Sequence[TokenizedExample], budget: TinyBudget, pad_id: int, generator: torch.Generator,
    progress: bool = True,
) -> list[float]:
    """Supervised fine-tuning on the reply tokens (and the prompt tokens at `budget.prompt_loss_weight`): AdamW,
    linear warm-up then cosine decay, gradient clipping at 1.

    Returns the mean loss of each epoch (the last one possibly partial when `epochs` is fractional).
    """
    if not examples:
        raise ValueError("no training examples (all of them longer than the budget's max_positions?)")
    lengths = [len(e) for e in examples]
    batches_per_epoch = math.ceil(len(examples) / budget.batch_size)
    total_steps = max(1, round(budget.epochs * batches_per_epoch))
    warmup = max(1, round(budget.warmup_frac * total_steps))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": budget.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=budget.lr, betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total_steps))
    model.train()
    epoch_losses: list[float] = []
    bar = tqdm(total=total_steps, desc="tiny model: training", unit="step", disable=not progress)
    step = 0
    while step < total_steps:
        losses = []
        for batch_indices in length_bucketed_batches(lengths, budget.batch_size, generator):
            if step == total_steps:
                break
            loss = reply_loss(model, collate([examples[i] for i in batch_indices], pad_id), budget.prompt_loss_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", epoch=len(epoch_losses) + 1)
        epoch_losses.append(float(np.mean(losses)))
    bar.close()
    model.eval()
    return epoch_losses


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
