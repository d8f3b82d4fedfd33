"""SDAR ("self-distill") and GRPO+OPSD: GRPO plus the gated self-distillation term λ·w·(sg(lp_T) - lp).
SDAR gates each token with g = σ(βΔ); OPSD is the same term with β = 0, a constant gate of 0.5."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from craft_bench.agents import losses as L
from craft_bench.agents.methods.base import (
    TEACHERS, Reduce, StepContext, StepStats, TeacherMethod, TeacherOptions, option,
)

__all__ = ["TEACHERS", "DistillContext", "Opsd", "OpsdOptions", "Sdar", "SdarOptions"]


@dataclass
class OpsdOptions(TeacherOptions):
    lam: float = option(0.01, "λ, weight of the distillation term", minimum=0.0)


@dataclass
class SdarOptions(OpsdOptions):
    beta: float = option(5.0, "β, sharpness of the gate g = σ(βΔ)")


@dataclass(kw_only=True)
class DistillContext(StepContext):
    """A gated-distillation step: the λ in force (the option, or Pillar 2's value)."""

    lam: float
    """λ in force this step."""


class Sdar(TeacherMethod):
    """agg(pg + α·k3 + λ·w·(sg(lp_T) - lp)) - h·agg(H), with w = g = sg(σ(βΔ))."""

    name = "sdar"
    Options: ClassVar[type] = SdarOptions

    @property
    def beta(self) -> float:
        return self.options.beta

    def gate(self, batch: L.TokenBatch) -> Tensor:
        """(R, T) detached gate g = σ(βΔ)."""
        return L.sdar_gate(L.teacher_gap(batch.teacher_logp, batch.old_logp), self.beta)

    def _context(self, batch: L.TokenBatch, reduce: Reduce, **common: Any) -> StepContext:
        gate, mask = self.gate(batch), batch.mask
        # Pillar 2's input, a(n) = fraction of the step's valid tokens with g > 0.5 (`losses.gate_activity`), from
        # counts summed over data-parallel ranks.
        active, gate_sum, valid = reduce([float(((gate > 0.5) & mask).sum()), float(gate[mask].sum()), float(mask.sum())])
        activity = active / valid if valid else 0.0
        metrics = {"sdar/gate_mean": gate_sum / valid if valid else 0.0, "sdar/gate_activity": activity}
        return DistillContext(**common, lam=self.options.lam, stats=StepStats(gate_activity=activity), metrics=metrics)

    def extra_terms(self, batch: L.TokenBatch, ctx: StepContext) -> dict[str, Tensor]:
        return {"distill": L.distill_term(batch.logp, batch.teacher_logp, self.gate(batch), ctx.lam)}


class Opsd(Sdar):
    """SDAR's baseline GRPO+OPSD: the same distillation term with a constant gate σ(0) = 0.5."""

    name = "opsd"
    Options: ClassVar[type] = OpsdOptions

    @property
    def beta(self) -> float:
        return 0.0
