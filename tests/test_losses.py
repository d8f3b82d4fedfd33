"""Tests of agents/losses.py: returns and advantages, and each per-token term against its closed-form gradient.
Small hand-built tensors; the method-level behaviour is in test_methods.py, Pillar 1 in test_credit.py."""

from __future__ import annotations

import math

import pytest
import torch

from craft_bench.agents import losses as L


def leaf(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).requires_grad_(True)


def grad_of(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(out.sum(), x)
    return g


def test_episode_returns_reward_success_and_penalise_invalid_actions():
    r = L.episode_returns(torch.tensor([1, 0, 1]), torch.tensor([0, 3, 2]))
    assert torch.allclose(r, torch.tensor([10.0, -0.3, 9.8]))
    r = L.episode_returns(torch.tensor([1]), torch.tensor([1]), success_reward=1.0, invalid_penalty=0.5)
    assert torch.allclose(r, torch.tensor([0.5]))


def test_progress_shaping_adds_its_term_and_is_bit_identical_when_off():
    won, n_invalid = torch.tensor([1, 0, 0]), torch.tensor([0, 3, 2])
    progress = torch.tensor([1.0, 0.25, 0.5])
    plain = L.episode_returns(won, n_invalid)
    assert torch.equal(L.episode_returns(won, n_invalid, progress=progress), plain)  # progress_reward 0: the spec's R
    shaped = L.episode_returns(won, n_invalid, progress=progress, progress_reward=4.0)
    assert torch.allclose(shaped, plain + 4.0 * progress)
    # Siblings that all lose but get differently far now have different returns, so GRPO has a signal.
    adv = L.grpo_advantages(shaped[1:], torch.tensor([0, 0]))
    assert adv[1] > 0 > adv[0]
    with pytest.raises(ValueError, match="progress"):
        L.episode_returns(won, n_invalid, progress_reward=1.0)
    with pytest.raises(ValueError, match="progress must have the shape"):
        L.episode_returns(won, n_invalid, progress=torch.tensor([0.5]), progress_reward=1.0)


def test_grpo_advantages_normalise_within_each_group():
    returns = torch.tensor([10.0, 0.0, 0.0, 5.0, 5.0, 7.0])
    group = torch.tensor([0, 0, 0, 1, 1, 2])
    adv = L.grpo_advantages(returns, group)
    std0 = torch.tensor([10.0, 0.0, 0.0]).std()
    expected0 = (torch.tensor([10.0, 0.0, 0.0]) - 10 / 3) / (std0 + 1e-6)
    assert torch.allclose(adv[:3], expected0)
    assert torch.equal(adv[3:5], torch.zeros(2))  # equal returns: no signal
    assert adv[5] == 0  # a group of one has no baseline
    none = L.grpo_advantages(returns, group, adv_std="none")
    assert torch.allclose(none[:3], torch.tensor([10.0, 0.0, 0.0]) - 10 / 3)
    with pytest.raises(ValueError, match="adv_std"):
        L.grpo_advantages(returns, group, adv_std="batch")


def test_clipped_policy_loss_gradient_matches_closed_form():
    old = torch.zeros(1, 6, dtype=torch.float64)
    ratios = torch.tensor([[1.1, 1.5, 0.5, 1.1, 0.5, 4.0]], dtype=torch.float64)
    logp = ratios.log().requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, -1.0]], dtype=torch.float64)
    pg = L.clipped_policy_loss(logp, old, adv)
    # inside the clip: -A·ρ; above 1+ε with A>0 or below 1-ε with A<0: clipped (no grad); ρ > c with A<0: dual clip.
    assert torch.allclose(pg, torch.tensor([[-1.1, -1.2, -0.5, 1.1, 0.8, 3.0]], dtype=torch.float64))
    expected = torch.tensor([[-1.1, 0.0, -0.5, 1.1, 0.0, 0.0]], dtype=torch.float64)
    assert torch.allclose(grad_of(pg, logp), expected)


def test_reference_kl_estimators_and_their_gradients():
    logp = leaf([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    u = ref - logp.detach()
    k3 = L.kl_k3(logp, ref)
    assert torch.allclose(k3, u.exp() - u - 1)
    assert torch.allclose(grad_of(k3, logp), 1 - u.exp())
    k2 = L.kl_k2(logp, ref)
    assert torch.allclose(k2, u * u / 2)
    assert torch.allclose(grad_of(k2, logp), -u)
    far = L.kl_k3(torch.tensor([[0.0]]), torch.tensor([[-100.0]]))
    assert torch.isfinite(far).all() and torch.allclose(far, torch.tensor([[math.exp(-20) + 19]]))


def test_polarised_kl_uses_k2_exactly_where_credit_is_positive():
    logp = torch.randn(3, 4, dtype=torch.float64)
    ref = torch.randn(3, 4, dtype=torch.float64)
    credit = torch.tensor([0.3, 0.0, -0.2], dtype=torch.float64)
    out = L.polarised_kl(logp, ref, credit)
    assert torch.equal(out[0], L.kl_k2(logp, ref)[0])
    assert torch.equal(out[1:], L.kl_k3(logp, ref)[1:])


def test_sdar_gate_distill_term_and_gate_activity():
    teacher = torch.tensor([[-1.0, -3.0, -2.0]])
    old = torch.tensor([[-2.0, -2.0, -2.0]])
    gap = L.teacher_gap(teacher, old)
    gate = L.sdar_gate(gap, beta=5.0)
    assert torch.allclose(gate, torch.sigmoid(torch.tensor([[5.0, -5.0, 0.0]])))
    assert torch.equal(L.sdar_gate(gap, beta=0.0), torch.full((1, 3), 0.5))
    assert L.gate_activity(gate, torch.tensor([[True, True, True]])) == pytest.approx(1 / 3)
    assert L.gate_activity(gate, torch.tensor([[True, False, False]])) == 1.0
    logp = leaf([[-1.5, -2.5, -2.0]])
    term = L.distill_term(logp, teacher.double(), gate.double(), lam=0.01)
    assert torch.allclose(term, 0.01 * gate.double() * (teacher.double() - logp.detach()))
    assert torch.allclose(grad_of(term, logp), -0.01 * gate.double())


def test_skill_sd_term_gradient_matches_closed_form():
    logp = leaf([[-1.0, -0.2, -3.0]])
    old = torch.tensor([[-1.2, -0.2, -20.0]], dtype=torch.float64)
    teacher = torch.tensor([[-0.5, -1.0, -2.0]], dtype=torch.float64)
    term = L.skill_sd_term(logp, old, teacher, coef=0.001)
    ell = logp.detach() - teacher
    ratio = torch.exp(torch.clamp(logp.detach() - old, max=10.0))
    assert torch.allclose(term, 0.001 * ratio * (torch.exp(-ell) - 1 + ell))
    assert torch.allclose(grad_of(term, logp), 0.001 * ratio * (1 - torch.exp(-ell)))
    assert ratio[0, 2] == math.exp(10.0)


def test_rlsd_advantages_tilt_by_teacher_within_clip():
    adv = torch.tensor([2.0, -2.0])
    gap = torch.tensor([[0.1, 1.0, -1.0], [0.1, 1.0, -1.0]])
    out = L.rlsd_advantages(adv, gap, lam=0.5)
    tilt_pos = torch.tensor([math.exp(0.1), 1.2, 0.8])
    tilt_neg = torch.tensor([math.exp(-0.1), 0.8, 1.2])
    assert torch.allclose(out[0], 2.0 * (0.5 + 0.5 * tilt_pos))
    assert torch.allclose(out[1], -2.0 * (0.5 + 0.5 * tilt_neg))


def test_token_mean_uses_the_given_step_count_and_ignores_padding():
    values = torch.tensor([[1.0, float("nan")], [3.0, float("inf")]])
    mask = torch.tensor([[True, False], [True, False]])
    assert L.token_mean(values, mask) == 2.0
    assert L.token_mean(values, mask, n_tokens=4) == 1.0


def test_chunked_entropy_equals_direct_in_value_and_gradient():
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    direct = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    chunked = L.entropy_from_logits(logits, chunk_tokens=3)
    assert torch.allclose(chunked.double(), direct)
    weights = torch.randn(2, 5, dtype=torch.float64)
    (g_direct,) = torch.autograd.grad((direct * weights).sum(), logits)
    (g_chunked,) = torch.autograd.grad((chunked.double() * weights).sum(), logits)
    assert torch.allclose(g_direct, g_chunked, atol=1e-6)


def test_chunked_token_logp_equals_full_log_softmax():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 4, generator=gen, requires_grad=True)
    weight = torch.randn(13, 4, generator=gen, requires_grad=True)
    tokens = torch.randint(0, 13, (7,), generator=gen)
    full = torch.log_softmax(hidden @ weight.T, -1).gather(-1, tokens[:, None])[:, 0]
    chunked = L.chunked_token_logp(hidden, weight, tokens, chunk_tokens=3)
    assert torch.allclose(full, chunked, atol=1e-6)
    g_full = torch.autograd.grad(full.sum(), (hidden, weight))
    g_chunk = torch.autograd.grad(chunked.sum(), (hidden, weight))
    for a, b in zip(g_full, g_chunk):
        assert torch.allclose(a, b, atol=1e-5)


def test_cringe_contrast_token_is_in_top_k_and_never_y():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 50, generator=gen)
    tokens = logits.argmax(-1)  # y is the top-1: it must be skipped
    tokens[0] = logits[0].argsort(-1, descending=True)[:, 10]  # y outside the top-k
    uniforms = torch.rand(4, 6, generator=gen, dtype=torch.float64)
    contrast = L.cringe_contrast_tokens(logits, tokens, uniforms, top_k=5)
    ranks = (logits > logits.gather(-1, contrast[..., None])).sum(-1)
    assert (contrast != tokens).all()
    assert (ranks[1:] >= 1).all() and (ranks[1:] <= 5).all()
    assert (ranks[0] <= 4).all()
    top1 = L.cringe_contrast_tokens(logits, tokens, torch.zeros(4, 6, dtype=torch.float64), top_k=5)
    assert torch.equal(top1[1:], logits[1:].argsort(-1, descending=True)[..., 1])


def test_cringe_term_gradient_matches_closed_form():
    logits = torch.randn(1, 2, 6, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.tensor([0, 0]), torch.tensor([0, 1])
    tokens, contrast = torch.tensor([1, 4]), torch.tensor([2, 0])
    term = L.cringe_term(logits, rows, cols, tokens, contrast)
    z = logits.detach()
    diff = torch.stack([z[0, 0, 1] - z[0, 0, 2], z[0, 1, 4] - z[0, 1, 0]])
    assert torch.allclose(term, torch.nn.functional.softplus(diff))
    grad = grad_of(term, logits)
    expected = torch.zeros_like(z)
    expected[0, 0, 1], expected[0, 0, 2] = torch.sigmoid(diff[0]), -torch.sigmoid(diff[0])
    expected[0, 1, 4], expected[0, 1, 0] = torch.sigmoid(diff[1]), -torch.sigmoid(diff[1])
    assert torch.allclose(grad, expected)
    only_first = L.cringe_term(logits, rows[:1], cols[:1], tokens[:1], contrast[:1])
    assert (grad_of(only_first, logits)[0, 1] == 0).all()


def test_cringe_seed_depends_on_row_identity_only():
    a = L.cringe_seed(0, 3, 1, 2, 4)
    assert a == L.cringe_seed(0, 3, 1, 2, 4)
    assert len({a, L.cringe_seed(1, 3, 1, 2, 4), L.cringe_seed(0, 4, 1, 2, 4), L.cringe_seed(0, 3, 1, 2, 5)}) == 4
    assert torch.equal(L.cringe_uniforms([a, a], 5)[0], L.cringe_uniforms([a], 5)[0])


def test_cringe_draw_never_returns_y_even_for_uniforms_next_to_one():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 20, generator=gen)
    order = logits.argsort(-1, descending=True)
    for rank_of_y in (0, 2, 5, 9):
        tokens = order[..., rank_of_y]
        for u in (0.0, 0.5, 1.0 - 2.0**-53):
            contrast = L.cringe_contrast_tokens(logits, tokens, torch.full((3, 4), u, dtype=torch.float64), top_k=5)
            ranks = (logits > logits.gather(-1, contrast[..., None])).sum(-1)
            assert (contrast != tokens).all() and (ranks <= 5).all()
    with pytest.raises(ValueError, match="top_k"):
        L.cringe_contrast_tokens(logits[..., :5], tokens.clamp(max=4), torch.zeros(3, 4, dtype=torch.float64))


def test_skill_sd_term_caps_exp_minus_ell_at_e20_and_is_unchanged_inside_the_cap():
    logp = torch.tensor([[-40.0, -1.0, -0.2]], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([[-1.0, -0.5, -3.0]], dtype=torch.float64)
    term = L.skill_sd_term(logp, logp.detach(), teacher, coef=1.0)
    (grad,) = torch.autograd.grad(term.sum(), logp)
    assert torch.isfinite(term).all()
    assert term[0, 0].item() == pytest.approx(math.exp(20.0) - 21.0)  # ℓ = -39 is clamped at -20
    assert grad[0, 0] == 0.0  # beyond the cap the term is constant
    ell = (logp.detach() - teacher)[0, 1:]
    assert torch.equal(term[0, 1:].detach(), torch.exp(-ell) - 1.0 + ell)
    assert torch.allclose(grad[0, 1:], 1.0 - torch.exp(-ell))
