"""Copy pre-training of the tiny model (agents/tiny/copying.py): the task's batches and that training on them
teaches a model to continue a span from its context."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from craft_bench.agents import tiny
from craft_bench.agents.tiny.copying import FIRST_COPY, copy_batch, copy_loss, pretrain_copying
from craft_bench.agents.tiny.model import TinyShape, make_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_every_target_continues_an_earlier_span_and_is_in_the_vocabulary():
    vocabulary = torch.arange(10, 60)
    batch = copy_batch(vocabulary, torch.Generator().manual_seed(0), batch_size=8, length=64)
    assert batch.tokens.shape == (8, 64) and batch.target_mask.shape == (8, 63)
    assert torch.isin(batch.tokens, vocabulary).all()
    assert batch.target_mask.sum() > 8 * 10  # dense: about half the positions after FIRST_COPY are copies
    assert not batch.target_mask[:, :FIRST_COPY].any()
    for row in range(8):
        tokens = batch.tokens[row].tolist()
        for t in batch.target_mask[row].nonzero().flatten().tolist():
            # Token t+1 is determined: the pair (t, t+1) occurs earlier in the sequence.
            assert any(tokens[s] == tokens[t] and tokens[s + 1] == tokens[t + 1] for s in range(t)), (row, t)


def test_batches_are_a_function_of_the_generator():
    vocabulary = torch.arange(3, 40)
    first = copy_batch(vocabulary, torch.Generator().manual_seed(1), batch_size=4)
    again = copy_batch(vocabulary, torch.Generator().manual_seed(1), batch_size=4)
    other = copy_batch(vocabulary, torch.Generator().manual_seed(2), batch_size=4)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.target_mask, again.target_mask)
    assert not torch.equal(first.tokens, other.tokens)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="vocabulary"):
        copy_batch(torch.tensor([5]), torch.Generator())
    with pytest.raises(ValueError, match="sequence length"):
        copy_batch(torch.arange(10), torch.Generator(), length=FIRST_COPY)
    with pytest.raises(ValueError, match="steps"):
        pretrain_copying(make_model(TinyShape(16, 32, 1, 2, 128), 20, torch.Generator()), range(3, 20), 0,
                         torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="copy_pretrain_steps"):
        tiny.TinyBudget(copy_pretrain_steps=-1)


def test_pretraining_lowers_the_copy_loss_of_a_small_model():
    """150 updates are far too few to form induction heads (docs/tiny_models.md: about 1,300 on a real budget), but
    they teach a small model that a copied token is one of its context: loss 5.32 -> 5.03 measured, and copy
    accuracy 0.026 against chance 1/200. Untrained (no update applied), the loss stays at 5.32."""
    vocabulary = list(range(3, 203))
    model = make_model(TinyShape(32, 64, 2, 2, 128), 203, torch.Generator().manual_seed(0))
    probe = copy_batch(torch.tensor(vocabulary), torch.Generator().manual_seed(99))
    with torch.no_grad():
        before, _ = copy_loss(model, probe)
    result = pretrain_copying(model, vocabulary, 150, torch.Generator().manual_seed(0), progress=False)
    with torch.no_grad():
        after, accuracy = copy_loss(model, probe)
    assert set(result) == {"steps", "final_loss", "copy_accuracy"} and result["steps"] == 150
    assert after < before - 0.15, (before.item(), after.item())
    assert accuracy > 2 / 200 and result["copy_accuracy"] > 2 / 200


def test_the_field_keeps_the_keys_of_models_built_before_it():
    budget = tiny.BUDGETS["test"]
    assert tiny.build_key("craft/X-v0", 0, budget) == tiny.build_key(
        "craft/X-v0", 0, dataclasses.replace(budget, copy_pretrain_steps=0))
    assert tiny.build_key("craft/X-v0", 0, budget) != tiny.build_key(
        "craft/X-v0", 0, dataclasses.replace(budget, copy_pretrain_steps=10))
