"""RLSD: no extra loss term; the teacher tilts each token's advantage, A · [(1-λ_n) + λ_n · clip(exp(sign(A)·Δ), lo, hi)].
Tokens the teacher endorses get more of a positive advantage and less of a negative one, within ±20 %; λ_n can
decay linearly to 0 over `warmdown_steps` (SDAR's ALFWorld script: 100)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from craft_bench.agents import losses as L
from craft_bench.agents.methods.base import Reduce, StepContext, TeacherMethod, TeacherOptions, option


@dataclass
class RlsdOptions(TeacherOptions):
    lam: float = option(0.5, "λ_0, share of the advantage that the teacher tilts (at step 0)", minimum=0.0)
    clip_lo: float = option(0.8, "lower clip of the tilt exp(sign(A)·Δ)")
    clip_hi: float = option(1.2, "upper clip of the tilt exp(sign(A)·Δ)")
    warmdown_steps: int = option(0, "λ_n = λ_0·max(0, 1 - n/warmdown_steps) at training step n; 0 keeps λ constant (SDAR's script: 100)", minimum=0)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.clip_lo <= 1 <= self.clip_hi:
            raise ValueError(f"options need 0 < clip_lo <= 1 <= clip_hi, got {self.clip_lo} and {self.clip_hi}")


@dataclass(kw_only=True)
class RlsdContext(StepContext):
    """An RLSD step: the tilt share λ_n in force."""

    lam: float
    """λ_n at this step (after the warm-down)."""


def rlsd_lambda(lam0: float, step: int, warmdown_steps: int) -> float:
    """λ_n = λ_0 · max(0, 1 - n / N) for N = warmdown_steps > 0; λ_0 for N = 0."""
    if warmdown_steps == 0:
        return lam0
    return lam0 * max(0.0, 1.0 - step / warmdown_steps)


class Rlsd(TeacherMethod):
    """agg(pg(A_tilted) + α·k3) - h·agg(H)."""

    name = "rlsd"
    Options: ClassVar[type] = RlsdOptions

    def _context(self, batch: L.TokenBatch, reduce: Reduce, **common: Any) -> StepContext:
        o = self.options
        lam = rlsd_lambda(o.lam, common["step"], o.warmdown_steps)
        return RlsdContext(**common, lam=lam, metrics={"rlsd/lambda": lam})

    def token_advantages(self, batch: L.TokenBatch, ctx: StepContext) -> Tensor:
        o = self.options
        gap = L.teacher_gap(batch.teacher_logp, batch.old_logp)
        return L.rlsd_advantages(batch.advantages, gap, ctx.lam, o.clip_lo, o.clip_hi)
