"""Tests of agents/methods: make_method's API and errors, bit-exact pillar switches, micro-batching, what each
method asks the trainer for, Pillar 2's controller and its checkpoint, Pillar 3's placement of k2."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from craft_bench.agents import losses as L
from craft_bench.agents.methods import (
    METHOD_NAMES, combine_metrics, make_method, method_defaults, method_options_help,
)
from craft_bench.agents.presets import paper_method_options
from craft_bench.bench.losses import synthetic_batch

SHAPES = [(1, 2, 1, 3), (2, 4, 3, 7), (3, 3, 5, 16)]  # (groups, group size, max turns, positions)


def fresh(batch: L.TokenBatch) -> L.TokenBatch:
    """The same batch with a new logp leaf (and logits leaf) so each loss gets its own gradients."""
    if batch.logits is None:
        return L.TokenBatch(**{**batch.__dict__, "logp": batch.logp.detach().clone().requires_grad_(True)})
    logits = batch.logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, batch.tokens[..., None])[..., 0]
    return L.TokenBatch(**{**batch.__dict__, "logits": logits, "logp": logp})


def loss_and_grad(method, batch, ctx=None):
    batch = fresh(batch)
    loss, metrics = method.loss(batch, ctx)
    leaf = batch.logits if batch.logits is not None else batch.logp
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), grad, metrics


def assert_bit_equal(a, b):
    assert torch.equal(a[0], b[0]), (a[0], b[0])
    assert torch.equal(a[1], b[1])


# -- API -----------------------------------------------------------------------------------------------------------


def test_every_method_builds_with_documented_defaults_and_round_trips_its_config():
    assert METHOD_NAMES == ("grpo", "opsd", "sdar", "skill_sd", "rlsd", "adaptive_cringe", "craft")
    for name in METHOD_NAMES:
        method = make_method(name)
        assert method.config == method_defaults(name)
        assert set(method_options_help(name)) == set(method.config)
        assert make_method(name, **json.loads(json.dumps(method.config))).config == method.config
        paper = make_method(name, **paper_method_options(name)).config
        assert (paper["alpha"], paper["h"]) == (0.01, 0.001)


def test_spec_defaults():
    sdar = method_defaults("sdar")
    assert (sdar["lam"], sdar["beta"], sdar["eps_lo"], sdar["eps_hi"], sdar["dual_clip"]) == (0.01, 5.0, 0.2, 0.2, 3.0)
    craft = method_defaults("craft")
    assert (craft["tau"], craft["credit_scale"], craft["kappa"], craft["target"]) == (1.0, 1.0, 1.0, 0.5)
    assert (craft["rho"], craft["eta_up"], craft["eta_down"], craft["p1_reduce"]) == (0.9, 1.0, 2.0, "sum")
    assert method_defaults("skill_sd")["coef"] == 0.001 and method_defaults("rlsd")["lam"] == 0.5
    assert method_defaults("adaptive_cringe")["top_k"] == 5
    assert all("(ours)" in method_options_help("craft")[k] for k in ("p1_center", "credit_scale", "kappa", "target"))


def test_unknown_name_or_option_is_a_clear_error():
    with pytest.raises(ValueError, match="valid methods: grpo, opsd, sdar"):
        make_method("ppo")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['beta'\].*valid options:.*lam"):
        make_method("opsd", beta=1.0)
    with pytest.raises(ValueError, match="teacher"):
        make_method("sdar", teacher="student")
    with pytest.raises(ValueError, match="alpha"):
        make_method("grpo", alpha=-1.0)
    with pytest.raises(ValueError, match=r"option agg='turn' is not one of \['token', 'episode'\]"):
        make_method("grpo", agg="turn")
    with pytest.raises(ValueError, match="option p1 must be a bool"):
        make_method("craft", p1="yes")
    assert make_method("sdar", lam=1).config["lam"] == 1.0 and isinstance(make_method("sdar", lam=1).config["lam"], float)


def test_what_each_method_asks_the_trainer_for():
    grpo = make_method("grpo")
    assert not grpo.needs_teacher and not grpo.needs_ref and not grpo.needs_logits
    batch = synthetic_batch(2, 3, 2, 5)
    batch.teacher_logp = None
    batch.ref_logp = None
    loss, metrics = grpo.loss(batch)
    assert torch.isfinite(loss) and set(metrics) == {"loss/total", "loss/pg"}
    assert make_method("grpo", alpha=0.01).needs_ref
    for name in METHOD_NAMES[1:]:
        assert make_method(name).needs_teacher
    assert make_method("adaptive_cringe").needs_logits and make_method("adaptive_cringe").needs_tokens
    assert make_method("sdar", h=0.01).needs_logits and not make_method("sdar").needs_logits
    with pytest.raises(ValueError, match="needs TokenBatch.teacher_logp"):
        make_method("sdar").loss(batch)


def test_opsd_is_sdar_with_a_constant_half_gate():
    batch = synthetic_batch(2, 3, 2, 5, dtype=torch.float64)
    opsd = loss_and_grad(make_method("opsd", alpha=0.01), batch)
    sdar = loss_and_grad(make_method("sdar", alpha=0.01, beta=0.0), batch)
    assert_bit_equal(opsd, sdar)
    assert opsd[2]["sdar/gate_mean"] == 0.5 and opsd[2]["sdar/gate_activity"] == 0.0


# -- bit-exact pillar switches -----------------------------------------------------------------------------------


def advanced(method, steps=(0.9, 0.7, 0.95)):
    for activity in steps:
        method.end_step({"sdar/gate_activity": activity})
    return method


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("extra", [{"alpha": 0.01}, {"alpha": 0.0}, {"alpha": 0.05, "lam": 0.3, "beta": 2.0}])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_pillars_off_equals_sdar_and_p3_alone_changes_nothing(shape, extra, dtype):
    batch = synthetic_batch(*shape, seed=sum(shape), dtype=dtype)
    sdar = loss_and_grad(make_method("sdar", **extra), batch)
    for p3 in (False, True):
        craft = loss_and_grad(make_method("craft", p1=False, p2=False, p3=p3, **extra), batch)
        assert_bit_equal(craft, sdar)


def test_all_pillars_off_equals_sdar_with_the_entropy_bonus():
    batch = synthetic_batch(2, 3, 3, 5, vocab=13, seed=3)
    sdar = loss_and_grad(make_method("sdar", alpha=0.01, h=0.01, logits_chunk=4), batch)
    craft = loss_and_grad(make_method("craft", p1=False, p2=False, p3=False, alpha=0.01, h=0.01, logits_chunk=4), batch)
    assert_bit_equal(craft, sdar)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p1,p3", list(itertools.product([False, True], repeat=2)))
def test_p2_on_equals_p2_off_at_the_controllers_values(shape, p1, p3):
    batch = synthetic_batch(*shape, seed=7)
    on = advanced(make_method("craft", p1=p1, p2=True, p3=p3, alpha=0.02))
    lam, alpha = on.controller.state.lam, on.controller.state.alpha
    assert lam != 0.01 and alpha != 0.02
    off = make_method("craft", p1=p1, p2=False, p3=p3, alpha=alpha, lam=lam)
    assert_bit_equal(loss_and_grad(on, batch), loss_and_grad(off, batch))
    if not p1:
        assert_bit_equal(loss_and_grad(on, batch), loss_and_grad(make_method("sdar", alpha=alpha, lam=lam), batch))


@pytest.mark.parametrize("shape", SHAPES)
def test_p3_off_keeps_sdars_k3_and_p3_touches_only_the_kl(shape):
    batch = synthetic_batch(*shape, seed=11)
    # λ = 0 removes the distillation term: p1 on, p3 off must then be SDAR bit for bit (k3, same order).
    no_distill = loss_and_grad(make_method("craft", p2=False, p3=False, lam=0.0, alpha=0.03), batch)
    assert_bit_equal(no_distill, loss_and_grad(make_method("sdar", lam=0.0, alpha=0.03), batch))
    # α = 0 removes the KL: p3 on must then equal p3 off bit for bit.
    no_kl_on = loss_and_grad(make_method("craft", p2=False, p3=True, alpha=0.0), batch)
    no_kl_off = loss_and_grad(make_method("craft", p2=False, p3=False, alpha=0.0), batch)
    assert_bit_equal(no_kl_on, no_kl_off)


def test_switched_off_pillars_consume_no_random_numbers():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    batch = synthetic_batch(2, 3, 3, 6)
    for name in METHOD_NAMES:
        if name != "adaptive_cringe":
            make_method(name, alpha=0.01).loss(fresh(batch))[0].backward()
    assert torch.equal(torch.rand(3), expected)


# -- micro-batching ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_one_micro_batch_of_all_rows_equals_one_row_at_a_time(name):
    kwargs = {"alpha": 0.01}
    if name == "craft":
        kwargs["kappa"] = 2.0
    vocab = 0
    if name == "adaptive_cringe":
        vocab, kwargs["h"] = 17, 0.01  # also covers the chunked entropy bonus
    batch = synthetic_batch(2, 4, 1, 6, seed=5, vocab=vocab, dtype=torch.float64)
    assert batch.rows == 8
    method = make_method(name, **kwargs)
    full_loss, full_grad, full_metrics = loss_and_grad(method, batch)
    ctx = method.prepare(batch)
    micro = fresh(batch)
    losses, parts = [], []
    for row in range(batch.rows):
        index = slice(row, row + 1)
        loss, metrics = method.loss(micro.select(index), ctx.select(index))
        losses.append(loss)
        parts.append(metrics)
    total = torch.stack(losses).sum()
    leaf = micro.logits if micro.logits is not None else micro.logp
    (grad,) = torch.autograd.grad(total, leaf)
    assert torch.allclose(total, full_loss, rtol=1e-12, atol=1e-14)
    assert torch.allclose(grad, full_grad, rtol=1e-10, atol=1e-14)
    merged = combine_metrics(parts)
    assert merged.keys() == full_metrics.keys()
    for key, value in full_metrics.items():
        assert merged[key] == pytest.approx(value, rel=1e-9, abs=1e-12, nan_ok=True), key


def test_micro_batches_by_index_tensor_in_any_order():
    batch = synthetic_batch(2, 4, 3, 6, seed=8, dtype=torch.float64)
    method = make_method("craft", alpha=0.01, kappa=2.0)
    full_loss, full_grad, _ = loss_and_grad(method, batch)
    ctx = method.prepare(L.TokenBatch(**{**batch.__dict__, "logp": None}))
    micro = fresh(batch)
    order = torch.randperm(batch.rows, generator=torch.Generator().manual_seed(0))
    total = sum(method.loss(micro.select(rows), ctx.select(rows))[0] for rows in order.split(3))
    (grad,) = torch.autograd.grad(total, micro.logp)
    assert torch.allclose(total, full_loss, rtol=1e-12) and torch.allclose(grad, full_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_episode_aggregation_weighs_every_episode_equally_and_splits_into_micro_batches(name):
    vocab = 17 if name == "adaptive_cringe" else 0
    batch = synthetic_batch(2, 4, 4, 6, seed=3, vocab=vocab, dtype=torch.float64)
    method = make_method(name, agg="episode")
    ctx = method.prepare(batch)
    weight = ctx.row_weight.double()
    tokens = batch.mask.sum(1).double()
    # Every episode carries the same total weight, and the weights of all valid tokens sum to their count.
    per_episode = torch.zeros(int(batch.episode_id.max()) + 1, dtype=torch.float64)
    per_episode.index_add_(0, batch.episode_id.long(), weight * tokens)
    assert torch.allclose(per_episode, torch.full_like(per_episode, float(tokens.sum()) / len(per_episode)))
    # The loss is the weighted token mean, and micro-batches of it add up to the whole.
    full_loss, full_grad, _ = loss_and_grad(method, batch)
    micro = fresh(batch)
    order = torch.randperm(batch.rows, generator=torch.Generator().manual_seed(1))
    total = sum(method.loss(micro.select(rows), ctx.select(rows))[0] for rows in order.split(3))
    (grad,) = torch.autograd.grad(total, micro.logits if vocab else micro.logp)
    assert torch.allclose(total, full_loss, rtol=1e-12) and torch.allclose(grad, full_grad, rtol=1e-10, atol=1e-15)
    # It differs from the spec's token mean where episode lengths differ, and GRPO's gradient is the token mean's
    # scaled row by row.
    _, token_grad, _ = loss_and_grad(make_method(name), batch)
    assert not torch.allclose(full_grad, token_grad)
    if name == "grpo":
        assert torch.allclose(full_grad, token_grad * weight[:, None], rtol=1e-12, atol=1e-15)


def test_episode_aggregation_makes_a_won_episode_outweigh_its_longer_failed_siblings():
    # One group: a win in 2 turns and three failures at the cap of 8 turns, all replying the same one token. Under
    # the token mean the failures' negative advantages outweigh the win on that shared token; per episode they do not.
    turns = [2, 8, 8, 8]
    rows = sum(turns)
    episode_id = torch.tensor([e for e, n in enumerate(turns) for _ in range(n)])
    returns = torch.tensor([10.0, 0.0, 0.0, 0.0])
    adv = L.grpo_advantages(returns, torch.zeros(4, dtype=torch.long))
    batch = L.TokenBatch(
        logp=torch.full((rows, 1), -1.0, dtype=torch.float64, requires_grad=True),
        old_logp=torch.full((rows, 1), -1.0, dtype=torch.float64), ref_logp=None, teacher_logp=None,
        mask=torch.ones(rows, 1, dtype=torch.bool), advantages=adv[episode_id], group_id=torch.zeros(rows, dtype=torch.long),
        episode_id=episode_id, turn_idx=torch.cat([torch.arange(n) for n in turns]),
    )
    def shared_token_push(agg):  # -d loss / d logp summed over the rows: > 0 raises the shared token
        _, grad, _ = loss_and_grad(make_method("grpo", agg=agg), batch)
        return -float(grad.sum())
    assert shared_token_push("token") < 0 < shared_token_push("episode")


def test_misaligned_context_is_rejected():
    batch = synthetic_batch(2, 4, 1, 6)
    method = make_method("craft")
    ctx = method.prepare(batch)
    with pytest.raises(ValueError, match="rows do not match"):
        method.loss(batch.select(slice(0, 2)), ctx.select(slice(2, 4)))


def test_adaptive_cringe_is_deterministic_and_splits_by_teacher_sign():
    batch = synthetic_batch(2, 3, 2, 5, vocab=23, seed=2, dtype=torch.float64)
    a = loss_and_grad(make_method("adaptive_cringe"), batch)
    b = loss_and_grad(make_method("adaptive_cringe"), batch)
    assert_bit_equal(a, b)
    c = loss_and_grad(make_method("adaptive_cringe", seed=1), batch)
    assert not torch.equal(a[1], c[1])
    gap = L.teacher_gap(batch.teacher_logp, batch.old_logp)
    assert 0 < a[2]["cringe/neg_frac"] < 1
    assert a[2]["cringe/neg_frac"] == pytest.approx(float(((gap < 0) & batch.mask).sum() / batch.mask.sum()))


# -- Pillar 2 --------------------------------------------------------------------------------------------------------


def test_controller_moves_weights_in_the_stated_directions_within_bounds():
    high = advanced(make_method("craft", alpha=0.01), [0.9] * 5)
    assert high.controller.state.lam > 0.01 and high.controller.state.alpha < 0.01
    low = advanced(make_method("craft", alpha=0.01), [0.1] * 5)
    assert low.controller.state.lam < 0.01 and low.controller.state.alpha > 0.01
    # Down moves are faster: the same |error| moves log λ twice as far.
    up = advanced(make_method("craft", alpha=0.01), [0.7])
    down = advanced(make_method("craft", alpha=0.01), [0.3])
    assert math.log(down.controller.state.lam / 0.01) == pytest.approx(-2 * math.log(up.controller.state.lam / 0.01))
    steep = advanced(make_method("craft", alpha=0.01, eta_up=50.0, eta_down=50.0), [1.0])
    assert steep.controller.state.lam == pytest.approx(0.1) and steep.controller.state.alpha == pytest.approx(0.001)
    steep = advanced(make_method("craft", alpha=0.01, eta_up=50.0, eta_down=50.0), [0.0])
    assert steep.controller.state.lam == pytest.approx(0.001) and steep.controller.state.alpha == pytest.approx(0.1)


def test_controller_ema_follows_the_spec():
    state = L.ControllerState(lam=0.01, alpha=0.01)
    state = L.controller_update(state, 0.8, lam0=0.01, alpha0=0.01)
    assert state.ema == 0.8 and state.lam == pytest.approx(0.01 * math.exp(0.3))
    state = L.controller_update(state, 0.0, lam0=0.01, alpha0=0.01)
    assert state.ema == pytest.approx(0.72) and state.lam == pytest.approx(0.01 * math.exp(0.22))
    with pytest.raises(ValueError, match="gate activity"):
        L.controller_update(state, 1.5, lam0=0.01, alpha0=0.01)


def test_controller_is_causal():
    batch = synthetic_batch(2, 3, 3, 6, seed=4)
    method = make_method("craft", alpha=0.01)
    ctx = method.prepare(batch)
    assert ctx.lam == 0.01 and ctx.metrics["ctrl/lambda"] == 0.01 and math.isnan(ctx.metrics["ctrl/ema"])
    _, metrics = method.loss(fresh(batch), ctx)
    # The step's own activity does not change the λ this step used; it sets the next step's.
    assert method.prepare(batch).lam == 0.01
    method.end_step(metrics)
    following = method.prepare(batch)
    assert following.metrics["ctrl/ema"] == metrics["sdar/gate_activity"]
    assert following.lam != 0.01


def test_controller_state_survives_save_and_load():
    batch = synthetic_batch(2, 3, 3, 6, seed=4)
    method = advanced(make_method("craft", alpha=0.01), [0.2, 0.9, 0.4])
    saved = json.loads(json.dumps(method.state_dict()))
    restored = make_method("craft", alpha=0.01)
    restored.load_state_dict(saved)
    assert restored.state_dict() == method.state_dict()
    assert_bit_equal(loss_and_grad(method, batch), loss_and_grad(restored, batch))
    for m in (method, restored):
        m.end_step({"sdar/gate_activity": 0.6})
    assert restored.state_dict() == method.state_dict()
    with pytest.raises(ValueError, match="controller"):
        restored.load_state_dict({"lam": 1.0})
    assert make_method("sdar").state_dict() == {} and make_method("craft", p2=False).state_dict() == {}
    cringe = advanced(make_method("adaptive_cringe"), [0.8])
    assert cringe.state_dict()["controller"]["steps"] == 1


# -- Pillar 3 --------------------------------------------------------------------------------------------------------


def test_pillar3_uses_k2_exactly_where_credit_is_positive():
    batch = synthetic_batch(3, 4, 3, 6, seed=9, dtype=torch.float64)
    alpha = 0.5
    method = make_method("craft", p2=False, lam=0.0, alpha=alpha)
    ctx = method.prepare(batch)
    positive = ctx.credit > 0
    assert positive.any() and (~positive).any()
    # Zero advantages make the policy term's gradient vanish: what remains is α·KL / n, per token.
    quiet = L.TokenBatch(**{**batch.__dict__, "advantages": torch.zeros_like(batch.advantages)})
    _, grad, _ = loss_and_grad(method, quiet, ctx)
    u = L.reference_log_ratio(batch.logp.detach(), batch.ref_logp)
    k2_grad, k3_grad = -u, 1 - u.exp()
    expected = torch.where(positive[:, None], k2_grad, k3_grad) * alpha / ctx.n_tokens
    expected = torch.where(batch.mask, expected, 0.0)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-15)


def test_craft_metrics_are_logged():
    batch = synthetic_batch(3, 4, 3, 6, seed=9)
    _, metrics = make_method("craft", alpha=0.01, kappa=3.0).loss(fresh(batch))
    for key in ("loss/total", "loss/pg", "loss/kl", "loss/distill", "sdar/gate_mean", "sdar/gate_activity",
                "craft/cti_mean", "craft/credit_pos_frac", "craft/ess_mean", "craft/ess_min",
                "craft/omega_neg_frac", "ctrl/lambda", "ctrl/alpha", "ctrl/ema"):
        assert key in metrics, key
    assert metrics["craft/ess_min"] >= 1.0 and 0 < metrics["craft/omega_neg_frac"] < 1


# -- typed step statistics and RLSD's warm-down ----------------------------------------------------------------------


def test_pillar2_learns_from_the_typed_step_stats_not_from_a_metric_name():
    batch = synthetic_batch(2, 3, 3, 6, seed=4)
    typed, external = make_method("craft", alpha=0.01), make_method("craft", alpha=0.01)
    ctx = typed.prepare(batch, step=0)
    _, metrics = external.loss(fresh(batch))
    assert ctx.stats.gate_activity == metrics["sdar/gate_activity"]
    typed.end_step(ctx.stats)
    external.end_step(metrics)  # CRAFT_SPEC §5: the metrics dict of loss() still works for external callers
    assert typed.state_dict() == external.state_dict() and typed.state_dict()["controller"]["steps"] == 1
    with pytest.raises(ValueError, match="gate activity"):
        typed.end_step({"renamed/gate_activity": 0.5})
    make_method("sdar").end_step({})  # stateless: nothing to learn, nothing required


def test_what_the_trainer_needs_is_a_typed_record():
    from craft_bench.agents.methods import Needs

    assert make_method("grpo").needs == Needs(teacher=None, reference=False, logits=False, tokens=False)
    assert make_method("sdar", teacher="ema", alpha=0.01).needs == Needs(teacher="ema", reference=True)
    assert make_method("adaptive_cringe", teacher="ref").needs == Needs(teacher="ref", logits=True, tokens=True)
    assert make_method("rlsd", adv_std="none").adv_std == "none"


def test_rlsd_lambda_decays_linearly_to_zero_over_warmdown_steps():
    batch = synthetic_batch(2, 3, 2, 5, seed=6)
    method = make_method("rlsd", warmdown_steps=4)
    lams = [method.prepare(batch, step=n).lam for n in range(7)]
    assert lams == pytest.approx([0.5, 0.375, 0.25, 0.125, 0.0, 0.0, 0.0])
    assert make_method("rlsd").prepare(batch, step=50).lam == 0.5  # warmdown_steps = 0: constant
    # Without a step, the count of end_step calls is used.
    method.end_step({})
    assert method.prepare(batch).step == 1 and method.prepare(batch).lam == pytest.approx(0.375)
    # At λ = 0 RLSD is GRPO.
    ctx = method.prepare(batch, step=4)
    done = loss_and_grad(method, batch, ctx)
    grpo = loss_and_grad(make_method("grpo"), batch)
    assert torch.allclose(done[0], grpo[0], rtol=0, atol=1e-7) and torch.allclose(done[1], grpo[1], rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="warmdown_steps"):
        make_method("rlsd", warmdown_steps=-1)
