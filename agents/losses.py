"""Pure loss functions of every craft-bench trainer (CRAFT_SPEC.md §2-§4), on tensors alone.
Methods in `agents/methods/` compose these; nothing here reads global state or draws global random numbers.

Shapes: `R` rows (one row is one turn of one episode), `T` response positions, `V` vocabulary size.
"Token" tensors are `(R, T)`, "row" tensors are `(R,)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from craft_bench.agents.episodes import episode_return

GAP_CLAMP = 20.0
"""Bound on the teacher-student gap Δ and on the reference log-ratio u (spec §1-§2), against overflow in exp."""

ADV_EPS = 1e-6
"""Added to the group standard deviation in the GRPO advantage (spec §2)."""


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TokenBatch:
    """The tensors one loss call sees (CRAFT_SPEC.md §5).

    Token tensors are `(R, T)`; row tensors are `(R,)`. Optional entries are `None` when the method does not need
    them (see the method's `needs_teacher`, `needs_ref`, `needs_logits`, `needs_tokens`).
    """

    logp: Tensor | None
    """(R, T) float: log π_θ(y_t | x, y_<t) under the current parameters, with grad. May be None in `prepare`."""
    old_logp: Tensor
    """(R, T) float: the same under θ_old, the parameters that sampled the rollout; no grad."""
    ref_logp: Tensor | None
    """(R, T) float: the same under the reference policy; needed only when α > 0."""
    teacher_logp: Tensor | None
    """(R, T) float: log π_θ_old(y_t | x+, y_<t), the teacher (same policy, privileged prompt); no grad."""
    mask: Tensor
    """(R, T) bool: True on valid response tokens."""
    advantages: Tensor
    """(R,) float: the episode's GRPO advantage, repeated on every turn of the episode."""
    group_id: Tensor
    """(R,) int: which task group the row belongs to."""
    episode_id: Tensor
    """(R,) int: which episode (unique across the step, or at least within its group)."""
    turn_idx: Tensor
    """(R,) int: turn index k within the episode."""
    logits: Tensor | None = None
    """(R, T, V) float: the student's logits at each response position, with grad; only for methods that need them."""
    tokens: Tensor | None = None
    """(R, T) int: the sampled token ids y_t; only for methods that need them (adaptive_cringe)."""

    @property
    def rows(self) -> int:
        return int(self.mask.shape[0])

    def select(self, index: Tensor | slice) -> "TokenBatch":
        """The batch restricted to some rows (a slice or a 1-D index tensor), e.g. one micro-batch."""
        picked = {}
        for field in fields(self):
            value = getattr(self, field.name)
            picked[field.name] = None if value is None else value[index]
        return replace(self, **picked)


# ---------------------------------------------------------------------------------------------------------------------
# Returns and advantages
# ---------------------------------------------------------------------------------------------------------------------


def episode_returns(
    won: Tensor, n_invalid: Tensor, success_reward: float = 10.0, invalid_penalty: float = 0.1,
    progress: Tensor | None = None, progress_reward: float = 0.0,
) -> Tensor:
    """R_i = success_reward · won_i - invalid_penalty · n_invalid_i (spec §2; `episodes.episode_return` applied to
    float32 tensors), + progress_reward · progress_i with the shaping option on. won, n_invalid, progress: (E,) ->
    (E,) float32. progress is needed only when progress_reward != 0."""
    won = torch.as_tensor(won)
    n_invalid = torch.as_tensor(n_invalid)
    if won.shape != n_invalid.shape or won.dim() != 1:
        raise ValueError(f"won and n_invalid must be 1-D of the same shape, got {tuple(won.shape)} and {tuple(n_invalid.shape)}")
    if progress_reward and progress is None:
        raise ValueError("progress_reward != 0 needs each episode's progress")
    if progress is not None:
        progress = torch.as_tensor(progress).to(torch.float32)
        if progress.shape != won.shape:
            raise ValueError(f"progress must have the shape of won {tuple(won.shape)}, got {tuple(progress.shape)}")
    return episode_return(won.to(torch.float32), n_invalid.to(torch.float32), success_reward, invalid_penalty,
                          progress if progress is not None else 0.0, progress_reward)


def grpo_advantages(returns: Tensor, group_id: Tensor, adv_std: str = "group") -> Tensor:
    """GRPO advantage per episode: (R_i - mean_g R) / (std_g R + 1e-6), or without the division for adv_std="none".

    returns, group_id: (E,) one entry per episode -> (E,) float32. The standard deviation is the unbiased one
    (torch.std, as verl); a group of one episode has no baseline and gets advantage 0 (ours).
    """
    if adv_std not in ("group", "none"):
        raise ValueError(f"adv_std must be 'group' or 'none', got {adv_std!r}")
    returns = torch.as_tensor(returns).to(torch.float32)
    group_id = torch.as_tensor(group_id)
    if returns.dim() != 1 or returns.shape != group_id.shape:
        raise ValueError(f"returns and group_id must be 1-D of the same shape, got {tuple(returns.shape)} and {tuple(group_id.shape)}")
    _, inverse, counts = torch.unique(group_id, return_inverse=True, return_counts=True)
    n = counts.to(returns.dtype)
    total = torch.zeros_like(n).index_add_(0, inverse, returns)
    mean = total / n
    centered = returns - mean[inverse]
    if adv_std == "none":
        advantages = centered
    else:
        sq = torch.zeros_like(n).index_add_(0, inverse, centered * centered)
        std = torch.sqrt(sq / (n - 1).clamp(min=1))
        advantages = centered / (std[inverse] + ADV_EPS)
    return torch.where(counts[inverse] > 1, advantages, torch.zeros_like(advantages))


# ---------------------------------------------------------------------------------------------------------------------
# Per-token terms
# ---------------------------------------------------------------------------------------------------------------------


def policy_ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """ρ = exp(lp - lp_old). (R, T) -> (R, T), differentiable in logp."""
    return torch.exp(logp - old_logp)


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_lo: float = 0.2, eps_hi: float = 0.2, dual_clip: float = 3.0
) -> Tensor:
    """Per-token PPO-clip loss with dual clip (spec §2). logp, old_logp: (R, T); advantages: (R,) or (R, T) -> (R, T).

    pg = -min(ρA, clip(ρ, 1-ε_lo, 1+ε_hi)A), and for A < 0 additionally capped at -c·A (verl's dual clip).
    """
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = policy_ratio(logp, old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - eps_lo, 1.0 + eps_hi)
    pg = torch.maximum(unclipped, clipped)
    dual = torch.minimum(pg, -advantages * dual_clip)
    return torch.where(advantages < 0, dual, pg)


def reference_log_ratio(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """u = clamp(lp_ref - lp, -20, 20). (R, T) -> (R, T)."""
    return torch.clamp(ref_logp - logp, -GAP_CLAMP, GAP_CLAMP)


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(u) - u - 1 (mode-covering; verl's low_var_kl). (R, T) -> (R, T); d/dlp = 1 - exp(u)."""
    u = reference_log_ratio(logp, ref_logp)
    return torch.exp(u) - u - 1.0


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = u² / 2 (mode-seeking). (R, T) -> (R, T); d/dlp = -u."""
    u = reference_log_ratio(logp, ref_logp)
    return 0.5 * u * u


def polarised_kl(logp: Tensor, ref_logp: Tensor, credit: Tensor) -> Tensor:
    """Pillar 3: k2 where the credit is positive, k3 elsewhere. logp, ref_logp: (R, T); credit: (R,) or (R, T)."""
    if credit.dim() == 1:
        credit = credit[:, None]
    u = reference_log_ratio(logp, ref_logp)  # shared by both estimators; same operations as kl_k2 and kl_k3
    return torch.where(credit > 0, 0.5 * u * u, torch.exp(u) - u - 1.0)


def teacher_gap(teacher_logp: Tensor, old_logp: Tensor) -> Tensor:
    """Δ = clamp(lp_T - lp_old, -20, 20), the teacher-student gap. (R, T) -> (R, T), detached."""
    return torch.clamp(teacher_logp.detach() - old_logp.detach(), -GAP_CLAMP, GAP_CLAMP)


def sdar_gate(gap: Tensor, beta: float) -> Tensor:
    """g = sg(σ(β Δ)), SDAR's gate. gap: (R, T) -> (R, T) in (0, 1); β = 0 gives the constant 0.5 of OPSD."""
    return torch.sigmoid(beta * gap.detach())


def gate_activity(gate: Tensor, mask: Tensor) -> float:
    """a = fraction of valid tokens with g > 0.5 (Pillar 2's input). gate, mask: (R, T) -> Python float."""
    n_valid = int(mask.sum())
    if n_valid == 0:
        return 0.0
    return float(((gate > 0.5) & mask).sum()) / n_valid


def distill_term(logp: Tensor, teacher_logp: Tensor, weight: Tensor, lam: float) -> Tensor:
    """λ · w · (sg(lp_T) - lp), SDAR's distillation term with a detached weight w. (R, T) -> (R, T); d/dlp = -λw."""
    return lam * (weight.detach() * (teacher_logp.detach() - logp))


def skill_sd_term(logp: Tensor, old_logp: Tensor, teacher_logp: Tensor, coef: float, ratio_cap: float = 10.0) -> Tensor:
    """Skill-SD: c · sg(ρ̃) · (exp(-ℓ) - 1 + ℓ), ℓ = max(lp - sg(lp_T), -20), ρ̃ = exp(min(lp - lp_old, 10)).
    (R, T) -> (R, T).

    d/dlp = c · ρ̃ · (1 - exp(-ℓ)) where lp - lp_T > -20. The clamp caps exp(-ℓ) at e^20 (SDAR's cap): without it
    the term and its gradient overflow as the teacher gap grows; beyond it the term is constant (no gradient), as
    the reference KL is beyond its own ±20 clamp. Inside the cap the values are those of the unclamped formula.
    """
    ell = torch.clamp(logp - teacher_logp.detach(), min=-GAP_CLAMP)
    ratio = torch.exp(torch.clamp(logp.detach() - old_logp.detach(), max=ratio_cap))
    return coef * (ratio * (torch.exp(-ell) - 1.0 + ell))


def rlsd_advantages(advantages: Tensor, gap: Tensor, lam: float = 0.5, lo: float = 0.8, hi: float = 1.2) -> Tensor:
    """RLSD's token advantage A · [(1-λ) + λ · clip(exp(sign(A) Δ), 0.8, 1.2)]. advantages: (R,); gap: (R, T) -> (R, T)."""
    a = advantages[:, None]
    tilt = torch.clamp(torch.exp(torch.sign(a) * gap.detach()), lo, hi)
    return a * ((1.0 - lam) + lam * tilt)


def masked_sum(values: Tensor, mask: Tensor) -> Tensor:
    """Σ over valid tokens; invalid positions are excluded with `where`, so NaN or inf padding cannot leak."""
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()


def token_mean(values: Tensor, mask: Tensor, n_tokens: float | None = None) -> Tensor:
    """Global token-mean: Σ_valid values / n_tokens, with n_tokens the step's count of valid tokens (spec §2).

    Passing the whole step's count for every micro-batch makes the sum of the micro-batch results equal the
    full-batch result. values, mask: (R, T) -> 0-dim.
    """
    if n_tokens is None:
        n_tokens = float(mask.sum())
    return masked_sum(values, mask) / max(float(n_tokens), 1.0)


# ---------------------------------------------------------------------------------------------------------------------
# Full-distribution terms (logits), chunked so that a 151,936-token vocabulary stays within bounded memory
# ---------------------------------------------------------------------------------------------------------------------


def _at_least_fp32(x: Tensor) -> Tensor:
    """Half-precision logits are upcast before softmax-like reductions; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _entropy_rows(logits: Tensor) -> Tensor:
    logits = _at_least_fp32(logits)
    log_probs = torch.log_softmax(logits, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)


def entropy_from_logits(logits: Tensor, chunk_tokens: int = 1024) -> Tensor:
    """Per-token entropy H_t = -Σ_v p log p. logits: (R, T, V) -> (R, T), at least float32.

    Computed in chunks of `chunk_tokens` positions; when logits need grad each chunk is checkpointed, so only one
    chunk's (chunk, V) softmax is alive at a time, in the forward and in the backward.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    parts = []
    for start in range(0, flat.shape[0], chunk_tokens):
        chunk = flat[start : start + chunk_tokens]
        if chunk.requires_grad:
            parts.append(checkpoint(_entropy_rows, chunk, use_reentrant=False))
        else:
            parts.append(_entropy_rows(chunk))
    if not parts:
        return _at_least_fp32(logits.new_zeros(logits.shape[:-1]))
    return torch.cat(parts).reshape(logits.shape[:-1])


def _logp_rows(hidden: Tensor, weight: Tensor, tokens: Tensor) -> Tensor:
    logits = _at_least_fp32(hidden @ weight.T)
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None])[:, 0]


def chunked_token_logp(hidden: Tensor, weight: Tensor, tokens: Tensor, chunk_tokens: int = 1024) -> Tensor:
    """log π(y_t) from final hidden states and the output embedding, never holding more than one chunk of logits.

    hidden: (N, D), weight: (V, D), tokens: (N,) -> (N,), at least float32. Each chunk is checkpointed (recomputed in backward).
    """
    parts = [
        checkpoint(_logp_rows, hidden[s : s + chunk_tokens], weight, tokens[s : s + chunk_tokens], use_reentrant=False)
        for s in range(0, hidden.shape[0], chunk_tokens)
    ]
    return torch.cat(parts)


def cringe_seed(base_seed: int, step: int, group_id: int, episode_id: int, turn_idx: int) -> int:
    """Seed of one row's CRINGE draws: a 63-bit mix of (base seed, step, group, episode, turn).

    It depends only on the row's identity, never on the micro-batch layout or the worker count.
    """
    value = 0x9E3779B97F4A7C15
    for part in (base_seed, step, group_id, episode_id, turn_idx):
        value ^= (int(part) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((value << 6) & 0xFFFFFFFFFFFFFFFF) + (value >> 2)
        value = (value * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value & 0x7FFFFFFFFFFFFFFF


def cringe_uniforms(seeds: list[int], length: int) -> Tensor:
    """One uniform in [0, 1) per (row, position), each row from its own explicitly seeded torch.Generator. -> (R, T)."""
    out = torch.empty(len(seeds), length, dtype=torch.float64)
    for row, seed in enumerate(seeds):
        generator = torch.Generator().manual_seed(seed)
        out[row] = torch.rand(length, generator=generator, dtype=torch.float64)
    return out


def cringe_contrast_tokens(logits: Tensor, tokens: Tensor, uniforms: Tensor, top_k: int = 5) -> Tensor:
    """The contrastive token y+ per position: drawn from the student's top-k excluding y, ∝ softmax of their logits.

    logits: (..., V); tokens: (...) int; uniforms: (...) in [0, 1) -> (...) int. Detached (no grad).
    """
    if logits.shape[-1] <= top_k:
        raise ValueError(f"CRINGE needs a vocabulary larger than top_k={top_k}, got {logits.shape[-1]}")
    with torch.no_grad():
        top_logits, top_ids = torch.topk(logits.detach(), top_k + 1, dim=-1)
        not_y = top_ids != tokens[..., None]
        # Keep the first k candidates that are not y: y is at most one of the k+1.
        keep = not_y & (not_y.cumsum(-1) <= top_k)
        probs = torch.softmax(top_logits.double(), dim=-1)
        cdf = torch.where(keep, probs, torch.zeros((), dtype=probs.dtype, device=probs.device)).cumsum(-1)
        threshold = uniforms.to(cdf.device, cdf.dtype)[..., None] * cdf[..., -1:]
        pick = (cdf <= threshold).sum(-1, keepdim=True)
        # u·total can round up to total; never step past the last kept candidate.
        last_kept = top_k - keep.flip(-1).int().argmax(-1, keepdim=True)
        return top_ids.gather(-1, torch.minimum(pick, last_kept))[..., 0]


def cringe_term(logits: Tensor, rows: Tensor, cols: Tensor, tokens: Tensor, contrast: Tensor) -> Tensor:
    """CRINGE's contrastive loss softplus(z_y - z_+) at the positions (rows, cols) only.

    logits: (R, T, V); rows, cols, tokens, contrast: (N,) int -> (N,), at least float32. Indexing the three
    coordinates at once reads 2N logits and never copies a (N, V) slice.
    d/dz_y = σ(z_y - z_+), d/dz_+ = -σ(z_y - z_+): the sampled token is pushed down, the contrast token up.
    """
    z_y = _at_least_fp32(logits[rows, cols, tokens])
    z_plus = _at_least_fp32(logits[rows, cols, contrast])
    return F.softplus(z_y - z_plus)


# ---------------------------------------------------------------------------------------------------------------------
# CRAFT Pillar 1: counterfactual token importance
# ---------------------------------------------------------------------------------------------------------------------


def turn_gap(gap: Tensor, mask: Tensor, reduce: str = "sum") -> Tensor:
    """d = Σ_t m·Δ (or the masked mean) per row. gap, mask: (R, T) -> (R,) float64, detached."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"p1_reduce must be 'sum' or 'mean', got {reduce!r}")
    total = torch.where(mask, gap.detach().double(), 0.0).sum(-1)
    if reduce == "mean":
        total = total / mask.sum(-1).clamp(min=1).double()
    return total


def counterfactual_credit(
    turn_gap: Tensor,
    advantages: Tensor,
    group_id: Tensor,
    episode_id: Tensor,
    turn_idx: Tensor,
    *,
    tau: float = 1.0,
    center: bool = False,
) -> tuple[Tensor, Tensor]:
    """CRAFT's counterfactual token importance (spec §4, Pillar 1): (cti, ess), one value per row.

    All inputs are (R,) over rows, one row per (episode, turn). For row (i, k), the siblings S_k \\ {i} are the other
    episodes of the same group that have a turn k; with d_jk their turn gaps,
    w_j|i = softmax_j(d_jk / τ) over the siblings, CTI_ik = Σ_j w_j|i A_j - A_i (or - mean_j A_j with center=True),
    ESS_ik = 1 / Σ_j w_j|i². A row with no sibling gets CTI = 0 and ESS = 0 (ESS ≥ 1 whenever a sibling exists).
    Computed in float64; returned in the dtype of `advantages`.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    tensors = {"turn_gap": turn_gap, "advantages": advantages, "group_id": group_id, "episode_id": episode_id, "turn_idx": turn_idx}
    n_rows = turn_gap.shape[0] if turn_gap.dim() == 1 else -1
    for name, value in tensors.items():
        if value.dim() != 1 or value.shape[0] != n_rows:
            raise ValueError(f"counterfactual_credit: {name} must be 1-D with one entry per row ({n_rows}), got {tuple(value.shape)}")
    out_dtype = advantages.dtype if advantages.is_floating_point() else torch.float32
    if n_rows == 0:
        return advantages.new_zeros(0, dtype=out_dtype), advantages.new_zeros(0, dtype=out_dtype)
    device = turn_gap.device
    if bool((turn_idx < 0).any()):
        raise ValueError("counterfactual_credit: turn_idx must be >= 0")
    # Dense layout: one slot per (group, turn) key, one column per sibling in that slot. 1-D integer keys keep
    # this to three small sorts (torch.unique over rows of a 2-D tensor is several times slower).
    group_index = torch.unique(group_id, return_inverse=True)[1]
    episode_index = torch.unique(episode_id, return_inverse=True)[1]
    key = group_index * (int(turn_idx.max()) + 1) + turn_idx.long()
    _, slot, counts = torch.unique(key, return_inverse=True, return_counts=True)
    pair = slot * (int(episode_index.max()) + 1) + episode_index
    sorted_pair, order = torch.sort(pair)
    if bool((sorted_pair[1:] == sorted_pair[:-1]).any()):
        raise ValueError("counterfactual_credit: two rows share (group_id, episode_id, turn_idx); expected one row per turn")
    starts = torch.cumsum(counts, 0) - counts
    column = torch.empty_like(slot)
    column[order] = torch.arange(n_rows, device=device) - starts[slot[order]]
    n_slots, width = counts.shape[0], int(counts.max())

    logit = torch.full((n_slots, width), -math.inf, dtype=torch.float64, device=device)
    logit[slot, column] = turn_gap.detach().double() / tau
    adv = torch.zeros((n_slots, width), dtype=torch.float64, device=device)
    adv[slot, column] = advantages.detach().double()

    # For each row i (slot s, column c): the softmax over the other present columns of slot s.
    columns = torch.arange(width, device=device)
    row_others = (columns[None, :] < counts[slot][:, None]) & (columns[None, :] != column[:, None])  # (R, width)
    row_logit = torch.where(row_others, logit[slot], -math.inf)
    has_sibling = row_others.any(-1)
    safe_logit = torch.where(has_sibling[:, None], row_logit, 0.0)
    weights = torch.softmax(safe_logit, dim=-1)  # softmax subtracts the max over the siblings
    weights = torch.where(row_others, weights, 0.0)
    row_adv = adv[slot]
    own_adv = advantages.detach().double()
    if center:
        baseline = (row_adv * row_others).sum(-1) / row_others.sum(-1).clamp(min=1)
    else:
        baseline = own_adv
    cti = (weights * row_adv).sum(-1) - baseline
    ess = 1.0 / (weights * weights).sum(-1).clamp(min=1e-300)
    cti = torch.where(has_sibling, cti, 0.0)
    ess = torch.where(has_sibling, ess, 0.0)
    return cti.to(out_dtype), ess.to(out_dtype)


def signed_credit(cti: Tensor, scale: float = 1.0) -> Tensor:
    """c = tanh(CTI / s), the signed per-turn credit in (-1, 1). (R,) -> (R,)."""
    return torch.tanh(cti / scale)


def credit_weight(gate: Tensor, credit: Tensor, kappa: float = 1.0) -> Tensor:
    """ω = sg(g · (1 + κ c)), the credit-weighted distillation weight. gate: (R, T); credit: (R,) -> (R, T)."""
    return (gate * (1.0 + kappa * credit.to(gate.dtype)[:, None])).detach()


# ---------------------------------------------------------------------------------------------------------------------
# CRAFT Pillar 2: asymmetric controller
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ControllerState:
    """Pillar 2's state between steps (Python floats, saved in checkpoints)."""

    lam: float
    """λ to use at the next step."""
    alpha: float
    """α to use at the next step."""
    ema: float | None = None
    """m_n, the EMA of gate activity; None before the first step."""
    steps: int = 0
    """How many steps have been folded in."""


def controller_update(
    state: ControllerState,
    activity: float,
    *,
    lam0: float,
    alpha0: float,
    rho: float = 0.9,
    target: float = 0.5,
    eta_up: float = 1.0,
    eta_down: float = 2.0,
) -> ControllerState:
    """Fold step n's gate activity a_n in and return the λ, α for step n+1 (spec §4, Pillar 2).

    m_n = ρ m_{n-1} + (1-ρ) a_n (m_0 = a_0); e = m_n - m*; η = η_up if e ≥ 0 else η_down;
    λ = clip(λ_0 exp(η e), λ_0/10, 10 λ_0); α = clip(α_0 exp(-η e), α_0/10, 10 α_0).
    """
    if not 0.0 <= activity <= 1.0 or math.isnan(activity):
        raise ValueError(f"gate activity must be in [0, 1], got {activity}")
    ema = activity if state.ema is None else rho * state.ema + (1.0 - rho) * activity
    error = ema - target
    eta = eta_up if error >= 0 else eta_down
    lam = min(max(lam0 * math.exp(eta * error), lam0 / 10.0), 10.0 * lam0)
    alpha = min(max(alpha0 * math.exp(-eta * error), alpha0 / 10.0), 10.0 * alpha0)
    return ControllerState(lam=lam, alpha=alpha, ema=ema, steps=state.steps + 1)
