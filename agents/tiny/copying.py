"""Copy pre-training of the tiny model: before fine-tuning, it learns to continue a span it has seen earlier in its
context, on random token sequences where spans repeat at random places (the "induction head" task).

Why: a reply often copies a name from its prompt that no training example showed (a product id of WebShop, an
object of ALFWorld), which only content-matching attention heads can do. Fine-tuning on expert replies gives that
skill too weak a signal to form it (docs/tiny_models.md: 0 product ids right after 8 epochs), while on this task the
heads form abruptly after about 1,300 updates (the same measurement) and the fine-tuning starts from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from craft_bench.agents.tiny.sft import next_token_logits
from tqdm.auto import tqdm

#: The task's constants (part of the recipe: changing one changes every model built with copy pre-training).
SEQUENCE_LENGTH = 64
BATCH_SIZE = 32
LR = 2e-3
#: No copy starts before this position, so that there is something to copy from.
FIRST_COPY = 16
#: At each position, the probability that a copied span starts there; its length is uniform in [MIN_SPAN, MAX_SPAN].
SPAN_START_PROB = 0.5
MIN_SPAN, MAX_SPAN = 3, 8
#: Otherwise this many fresh random tokens follow (uniform in [1, MAX_GAP]).
MAX_GAP = 5


@dataclass(frozen=True)
class CopyBatch:
    """Sequences of the copy task and which of their next-token predictions the context determines."""

    tokens: torch.Tensor
    """(batch, length) token ids."""
    target_mask: torch.Tensor
    """(batch, length - 1) True where position t predicts token t+1 and that token is determined by the context: the
    second and later tokens of a copied span (its first token is the random choice of where to copy from)."""


def copy_batch(vocabulary: torch.Tensor, generator: torch.Generator, batch_size: int = BATCH_SIZE,
               length: int = SEQUENCE_LENGTH) -> CopyBatch:
    """Random sequences over `vocabulary` (a 1-D tensor of token ids) in which spans of earlier tokens repeat."""
    if vocabulary.ndim != 1 or len(vocabulary) < 2:
        raise ValueError(f"copy pre-training needs a 1-D vocabulary of at least 2 token ids, got shape "
                         f"{tuple(vocabulary.shape)}")
    if length <= FIRST_COPY + MIN_SPAN:
        raise ValueError(f"sequence length {length} leaves no room for a copy after position {FIRST_COPY}")
    tokens = vocabulary[torch.randint(len(vocabulary), (batch_size, length), generator=generator)]
    copied = torch.zeros(batch_size, length, dtype=torch.bool)
    draws = torch.rand(batch_size, length, generator=generator)
    spans = torch.randint(MIN_SPAN, MAX_SPAN + 1, (batch_size, length), generator=generator)
    gaps = torch.randint(1, MAX_GAP + 1, (batch_size, length), generator=generator)
    sources = torch.rand(batch_size, length, generator=generator)
    for row in range(batch_size):
        position = FIRST_COPY
        while position < length - 1:
            if draws[row, position] < SPAN_START_PROB:
                span = min(int(spans[row, position]), length - position)
                source = int(sources[row, position] * (position - span + 1))  # the copy ends before it starts
                tokens[row, position : position + span] = tokens[row, source : source + span]
                copied[row, position + 1 : position + span] = True
                position += span
            else:
                position += int(gaps[row, position])
    return CopyBatch(tokens, copied[:, 1:])


def copy_loss(model, batch: CopyBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the copied tokens (the LM head runs on those positions only) and the share predicted right."""
    hidden = model.model(input_ids=batch.tokens).last_hidden_state
    logits, targets = next_token_logits(model, hidden, batch.tokens, batch.target_mask)
    return torch.nn.functional.cross_entropy(logits.float(), targets), (logits.argmax(-1) == targets).float().mean()


def pretrain_copying(model, vocabulary: Sequence[int], steps: int, generator: torch.Generator,
                     progress: bool = True) -> dict[str, int | float]:
    """`steps` AdamW updates (lr `LR`, constant, gradient clipping at 1) on `copy_batch`es drawn from `generator`.

    Returns the last update's loss and the copy accuracy on a fresh batch after training (chance is about
    1 / len(vocabulary)), which the build records so that a reader can see whether the heads formed.
    """
    if steps < 1:
        raise ValueError(f"copy pre-training needs steps >= 1, got {steps}")
    ids = torch.as_tensor(list(vocabulary), dtype=torch.long)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    model.train()
    bar = tqdm(range(steps), desc="tiny model: copy pre-training", unit="step", disable=not progress)
    loss = torch.tensor(float("nan"))
    for _ in bar:
        loss, accuracy = copy_loss(model, copy_batch(ids, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", copy_accuracy=f"{accuracy.item():.2f}")
    model.eval()
    with torch.no_grad():
        _, accuracy = copy_loss(model, copy_batch(ids, generator))
    return {"steps": steps, "final_loss": round(loss.item(), 4), "copy_accuracy": round(accuracy.item(), 4)}
