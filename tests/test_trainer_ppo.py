"""Tests of several optimizer updates per rollout (ppo_epochs, mini_batch_rows): θ_old's quantities are computed once
and stay fixed across updates, each mini-batch divides by its own token count, and one whole-step mini-batch is
exactly the default single update."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
from test_trainer import numeric_metrics, small_config

from craft_bench.agents.methods import make_method
from craft_bench.agents.trainer import METRICS_FILE, TrainConfig, Trainer
from craft_bench.bench.losses import synthetic_batch


def test_ppo_settings_are_validated_by_name():
    with pytest.raises(ValueError, match="ppo_epochs"):
        TrainConfig(ppo_epochs=0)
    with pytest.raises(ValueError, match="mini_batch_rows"):
        TrainConfig(mini_batch_rows=0)


@pytest.mark.parametrize("name", ["grpo", "sdar", "skill_sd"])
def test_a_mini_batch_context_divides_by_the_mini_batch_token_count(name):
    # Methods whose terms are per-row: a mini-batch's loss with the step's context and its own token count is
    # the loss of that mini-batch alone.
    batch = synthetic_batch(2, 3, 2, 5, seed=1, dtype=torch.float64)
    method = make_method(name, alpha=0.01)
    ctx = method.prepare(batch)
    rows = slice(2, 7)
    mini = batch.select(rows)
    alone, _ = method.loss(mini)
    shared, _ = method.loss(mini, ctx.select(rows).with_tokens(mini.mask.sum()))
    assert torch.equal(alone, shared)
    assert ctx.with_tokens(3).n_tokens == 3.0 and ctx.n_tokens == float(batch.mask.sum())


def test_updates_keep_theta_old_quantities_and_use_their_own_denominators(model_dir, tmp_path, monkeypatch):  # noqa: F811
    config = small_config(model_dir, method="craft", steps=1, ppo_epochs=2, mini_batch_rows=2, micro_batch_rows=1,
                          lr=1e-2, method_options={"alpha": 0.01})
    trainer = Trainer(config, tmp_path, progress=False)
    calls, prepared, ended = [], [], []
    real_loss, real_prepare, real_end = trainer.method.loss, trainer.method.prepare, trainer.method.end_step

    def loss(batch, ctx=None):
        calls.append((batch.old_logp.clone(), batch.teacher_logp.clone(), batch.logp.detach().clone(),
                      batch.mask.clone(), ctx.n_tokens, ctx.credit.clone()))
        return real_loss(batch, ctx)

    def prepare(batch, step=None, reduce=None):
        prepared.append(step)
        return real_prepare(batch, step, reduce)

    def end_step(stats):
        ended.append(stats)
        return real_end(stats)

    monkeypatch.setattr(trainer.method, "loss", loss)
    monkeypatch.setattr(trainer.method, "prepare", prepare)
    monkeypatch.setattr(trainer.method, "end_step", end_step)
    try:
        trainer.train()
    finally:
        trainer.close()
    metrics = pd.read_csv(tmp_path / METRICS_FILE)
    rows = int(metrics["rollout/rows"][0])
    per_epoch = math.ceil(rows / 2)
    assert metrics["optim/updates"].tolist() == [2 * per_epoch]
    assert prepared == [0] and len(ended) == 1 and ended[0].gate_activity is not None
    assert len(calls) == 2 * rows  # micro-batches of one row
    first, second = calls[:rows], calls[rows:]
    for row, (a, b) in enumerate(zip(first, second)):
        # θ_old's log-probs, the teacher's and Pillar 1's credit are those of the rollout in both epochs.
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[5], b[5])
        # The denominator is the valid-token count of the row's mini-batch (rows 2m and 2m+1).
        start = row - row % 2
        expected = sum(int(c[3].sum()) for c in first[start : start + 2])
        assert a[4] == b[4] == float(expected)
    # Only lp moves between updates: the second epoch sees updated parameters.
    assert any(not torch.equal(a[2], b[2]) for a, b in zip(first, second))


def test_one_whole_step_mini_batch_equals_the_default_single_update(model_dir, tmp_path):  # noqa: F811
    for name, extra in (("default", {}), ("whole", {"mini_batch_rows": 10_000, "ppo_epochs": 1})):
        trainer = Trainer(small_config(model_dir, method="sdar", steps=2, **extra), tmp_path / name, progress=False)
        try:
            trainer.train()
        finally:
            trainer.close()
    pd.testing.assert_frame_equal(
        numeric_metrics(tmp_path / "default" / METRICS_FILE), numeric_metrics(tmp_path / "whole" / METRICS_FILE),
        check_exact=True,
    )
