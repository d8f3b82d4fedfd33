"""CRAFT: SDAR plus three switchable pillars — counterfactual credit (p1), an asymmetric controller of λ and α (p2),
and a KL polarised by the credit's sign (p3). Each pillar off is bit-identical to SDAR (Python branches only)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from craft_bench.agents import losses as L
from craft_bench.agents.methods.base import Reduce, StepContext, option
from craft_bench.agents.methods.controller import ControlledOptions, ControlledSdar
from craft_bench.agents.methods.sdar import DistillContext


@dataclass
class CraftOptions(ControlledOptions):
    p1: bool = option(True, "Pillar 1: weight distillation by counterfactual credit ω = g·(1 + κ·tanh(CTI/s))")
    p2: bool = option(True, "Pillar 2: asymmetric controller of λ and α from the gate-activity EMA")
    p3: bool = option(True, "Pillar 3: k2 (mode-seeking) on tokens with positive credit, k3 elsewhere; needs p1 and α > 0")
    tau: float = option(1.0, "Pillar 1: temperature τ of the sibling importance weights")
    p1_reduce: str = option("sum", "Pillar 1: turn gap d = Σ_t Δ ('sum') or its mean over tokens ('mean')", ("sum", "mean"))
    p1_center: bool = option(False, "Pillar 1 (ours): subtract the unweighted sibling mean instead of A_i")
    credit_scale: float = option(1.0, "Pillar 1 (ours): s in c = tanh(CTI / s)")
    kappa: float = option(1.0, "Pillar 1 (ours): κ in ω = g·(1 + κ c); κ > 1 allows ω < 0", minimum=0.0)

    def validate(self) -> None:
        super().validate()
        if self.tau <= 0 or self.credit_scale <= 0:
            raise ValueError(f"options tau and credit_scale must be > 0, got {self.tau} and {self.credit_scale}")


@dataclass(kw_only=True)
class CraftContext(DistillContext):
    """A CRAFT step: SDAR's fields plus Pillar 1's signed credit per row."""

    credit: Tensor | None = None
    """(R,) signed credit c = tanh(CTI/s) of θ_old's rollout, or None with Pillar 1 off."""

    ROW_FIELDS: ClassVar[tuple[str, ...]] = ("credit",)


class Craft(ControlledSdar):
    """SDAR with Pillars 1-3 (see docs/methods.md)."""

    name = "craft"
    Options: ClassVar[type] = CraftOptions

    @property
    def uses_controller(self) -> bool:
        return self.options.p2

    def _context(self, batch: L.TokenBatch, reduce: Reduce, **common: Any) -> StepContext:
        base = super()._context(batch, reduce, **common)
        ctx = CraftContext(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)})
        o = self.options
        if o.p1:
            gap = L.teacher_gap(batch.teacher_logp, batch.old_logp)
            cti, ess = L.counterfactual_credit(
                L.turn_gap(gap, batch.mask, o.p1_reduce), batch.advantages,
                batch.group_id, batch.episode_id, batch.turn_idx, tau=o.tau, center=o.p1_center,
            )
            ctx.credit = L.signed_credit(cti, o.credit_scale)
            omega = L.credit_weight(L.sdar_gate(gap, self.beta), ctx.credit, o.kappa)
            with_sibling = ess > 0
            ctx.metrics.update({
                "craft/cti_mean": float(cti.mean()) if cti.numel() else math.nan,
                "craft/credit_pos_frac": float((ctx.credit > 0).float().mean()) if cti.numel() else math.nan,
                "craft/ess_mean": float(ess[with_sibling].mean()) if with_sibling.any() else math.nan,
                "craft/ess_min": float(ess[with_sibling].min()) if with_sibling.any() else math.nan,
                "craft/omega_neg_frac": float(((omega < 0) & batch.mask).sum()) / max(int(batch.mask.sum()), 1),
            })
        return ctx

    def extra_terms(self, batch: L.TokenBatch, ctx: StepContext) -> dict[str, Tensor]:
        gate = self.gate(batch)
        weight = L.credit_weight(gate, ctx.credit, self.options.kappa) if self.options.p1 else gate
        return {"distill": L.distill_term(batch.logp, batch.teacher_logp, weight, ctx.lam)}

    def reference_kl(self, batch: L.TokenBatch, ctx: StepContext) -> Tensor:
        if not (self.options.p1 and self.options.p3):
            return super().reference_kl(batch, ctx)
        return L.polarised_kl(batch.logp, batch.ref_logp, ctx.credit)
