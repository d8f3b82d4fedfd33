"""Skill-SD: GRPO plus a ratio-weighted distillation term c · sg(ρ̃) · (exp(-ℓ) - 1 + ℓ), ℓ = lp - sg(lp_T).
The term is the k3 estimator of KL(student ‖ teacher) on the sampled token, importance-weighted by ρ̃; ℓ is
clamped at -20 so that exp(-ℓ) never exceeds e^20 (SDAR's cap; always on, see losses.skill_sd_term)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from craft_bench.agents import losses as L
from craft_bench.agents.methods.base import StepContext, TeacherMethod, TeacherOptions, option


@dataclass
class SkillSdOptions(TeacherOptions):
    coef: float = option(0.001, "c, weight of the distillation term", minimum=0.0)
    ratio_cap: float = option(10.0, "ρ̃ = exp(min(lp - lp_old, ratio_cap))")


class SkillSd(TeacherMethod):
    """agg(pg + α·k3 + c·sg(ρ̃)·(exp(-ℓ) - 1 + ℓ)) - h·agg(H)."""

    name = "skill_sd"
    Options: ClassVar[type] = SkillSdOptions

    def extra_terms(self, batch: L.TokenBatch, ctx: StepContext) -> dict[str, Tensor]:
        o = self.options
        return {"distill": L.skill_sd_term(batch.logp, batch.old_logp, batch.teacher_logp, o.coef, o.ratio_cap)}
