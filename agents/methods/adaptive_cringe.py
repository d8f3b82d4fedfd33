"""Adaptive-CRINGE: Pillar 2's controller plus, per token, SDAR's term where the teacher agrees (Δ ≥ 0) and a
CRINGE contrastive term λ_n · w_ct · softplus(z_y - z_+) where it disagrees (Δ < 0)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from craft_bench.agents import losses as L
from craft_bench.agents.methods.base import Needs, Reduce, StepContext, option
from craft_bench.agents.methods.controller import ControlledOptions, ControlledSdar


@dataclass
class AdaptiveCringeOptions(ControlledOptions):
    w_ct: float = option(1.0, "(ours) weight of the CRINGE term relative to λ_n")
    top_k: int = option(5, "(ours) the contrast token is drawn from the student's top-k, excluding y")
    seed: int = option(0, "(ours) base seed of the contrast-token draws; each row's seed mixes it with (step, group, episode, turn)")

    def validate(self) -> None:
        super().validate()
        if self.top_k < 1:
            raise ValueError(f"option top_k must be >= 1, got {self.top_k}")


class AdaptiveCringe(ControlledSdar):
    """agg(pg + α_n·k3 + [Δ ≥ 0] λ_n·g·(sg(lp_T) - lp) + [Δ < 0] λ_n·w_ct·softplus(z_y - z_+)) - h·agg(H)."""

    name = "adaptive_cringe"
    Options: ClassVar[type] = AdaptiveCringeOptions

    @property
    def needs(self) -> Needs:
        return dataclasses.replace(super().needs, logits=True, tokens=True)

    def _context(self, batch: L.TokenBatch, reduce: Reduce, **common: Any) -> StepContext:
        ctx = super()._context(batch, reduce, **common)
        gap = L.teacher_gap(batch.teacher_logp, batch.old_logp)
        ctx.metrics["cringe/neg_frac"] = float(((gap < 0) & batch.mask).sum()) / max(int(batch.mask.sum()), 1)
        return ctx

    def contrast_tokens(self, batch: L.TokenBatch, ctx: StepContext, rows: Tensor, cols: Tensor, y: Tensor) -> Tensor:
        """(N,) contrast ids at positions (rows, cols). Each row's uniforms come from its own seeded generator, so
        the draws do not depend on micro-batching; top-k runs over `logits_chunk` positions at a time."""
        seeds = [L.cringe_seed(self.options.seed, ctx.step, g, e, k) for g, e, k in ctx.row_keys.tolist()]
        uniforms = L.cringe_uniforms(seeds, batch.mask.shape[1]).to(rows.device)[rows, cols]
        logits = batch.logits.detach()
        chunk = self.options.logits_chunk
        parts = [
            L.cringe_contrast_tokens(logits[rows[s : s + chunk], cols[s : s + chunk]], y[s : s + chunk],
                                     uniforms[s : s + chunk], self.options.top_k)
            for s in range(0, rows.shape[0], chunk)
        ]
        return torch.cat(parts) if parts else y.clone()

    def extra_terms(self, batch: L.TokenBatch, ctx: StepContext) -> dict[str, Tensor]:
        gap = L.teacher_gap(batch.teacher_logp, batch.old_logp)
        agree = gap >= 0
        distill = L.distill_term(batch.logp, batch.teacher_logp, self.gate(batch), ctx.lam)
        # CRINGE only where the teacher disagrees and the token is valid: top-k over the vocabulary is the
        # expensive part, so it is never run on positions whose term would be discarded.
        rows, cols = ((~agree) & batch.mask).nonzero(as_tuple=True)
        y = batch.tokens[rows, cols]
        values = L.cringe_term(batch.logits, rows, cols, y, self.contrast_tokens(batch, ctx, rows, cols, y))
        cringe = values.new_zeros(batch.mask.shape).index_put((rows, cols), values)
        zero = torch.zeros((), dtype=distill.dtype, device=distill.device)
        return {
            "distill": torch.where(agree, distill, zero),
            "cringe": ctx.lam * (self.options.w_ct * cringe),
        }
