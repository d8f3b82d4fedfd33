"""Pillar 2's asymmetric controller and the one place it is wired into a method (craft and adaptive_cringe).
The update itself is the pure function `losses.controller_update`; `Controller` only keeps its state between steps,
and `ControlledSdar` feeds it each step's `StepStats.gate_activity` and puts its λ_n, α_n into the step context."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from craft_bench.agents import losses as L
from craft_bench.agents.methods.base import Reduce, StepContext, StepStats, option
from craft_bench.agents.methods.sdar import Sdar, SdarOptions


@dataclass
class ControlledOptions(SdarOptions):
    """SDAR's options plus Pillar 2's controller (shared by craft and adaptive_cringe)."""

    rho: float = option(0.9, "Pillar 2 controller: EMA factor ρ of gate activity")
    target: float = option(0.5, "Pillar 2 controller (ours): target activity m*")
    eta_up: float = option(1.0, "Pillar 2 controller (ours): gain η when the EMA is at or above the target", minimum=0.0)
    eta_down: float = option(2.0, "Pillar 2 controller (ours): gain η when the EMA is below the target", minimum=0.0)

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.rho < 1 or not 0 <= self.target <= 1:
            raise ValueError(f"options rho must be in [0, 1) and target in [0, 1], got {self.rho} and {self.target}")

    def make_controller(self) -> Controller:
        return Controller(self.lam, self.alpha, self.rho, self.target, self.eta_up, self.eta_down)


class Controller:
    """Holds λ_n, α_n and the activity EMA; `update(a_n)` gives the values for step n+1 from steps ≤ n only."""

    def __init__(self, lam0: float, alpha0: float, rho: float, target: float, eta_up: float, eta_down: float) -> None:
        self.lam0, self.alpha0 = lam0, alpha0
        self.rho, self.target, self.eta_up, self.eta_down = rho, target, eta_up, eta_down
        self.state = L.ControllerState(lam=lam0, alpha=alpha0)

    def update(self, activity: float) -> None:
        self.state = L.controller_update(
            self.state, activity, lam0=self.lam0, alpha0=self.alpha0,
            rho=self.rho, target=self.target, eta_up=self.eta_up, eta_down=self.eta_down,
        )

    def metrics(self) -> dict[str, float]:
        ema = float("nan") if self.state.ema is None else self.state.ema
        return {"ctrl/lambda": self.state.lam, "ctrl/alpha": self.state.alpha, "ctrl/ema": ema}

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = set(asdict(self.state))
        if set(state) != expected:
            raise ValueError(f"controller state must have keys {sorted(expected)}, got {sorted(state)}")
        ema = state["ema"]
        self.state = L.ControllerState(
            lam=float(state["lam"]), alpha=float(state["alpha"]),
            ema=None if ema is None else float(ema), steps=int(state["steps"]),
        )


class ControlledSdar(Sdar):
    """SDAR whose λ and α come from Pillar 2's controller when `uses_controller` says so; otherwise exactly SDAR.

    The controller reads `StepStats.gate_activity` at `end_step` and is the method's whole checkpointed state.
    """

    Options: ClassVar[type] = ControlledOptions

    def __init__(self, options: ControlledOptions) -> None:
        super().__init__(options)
        self.controller = options.make_controller() if self.uses_controller else None

    @property
    def uses_controller(self) -> bool:
        """Whether Pillar 2 is on (always, unless a subclass has a switch)."""
        return True

    def _context(self, batch: L.TokenBatch, reduce: Reduce, **common: Any) -> StepContext:
        ctx = super()._context(batch, reduce, **common)
        if self.controller is None:
            return ctx
        ctx.metrics.update(self.controller.metrics())
        return dataclasses.replace(ctx, lam=self.controller.state.lam, alpha=self.controller.state.alpha)

    def _advance(self, stats: StepStats) -> None:
        if self.controller is None:
            return
        if stats.gate_activity is None:
            raise ValueError(f"{self.name} with Pillar 2 needs the step's gate activity in end_step "
                             "(StepStats.gate_activity from prepare, or metrics['sdar/gate_activity'] from loss())")
        self.controller.update(stats.gate_activity)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.controller is None else {"controller": self.controller.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.controller is None:
            super().load_state_dict(state)
            return
        if set(state) != {"controller"}:
            raise ValueError(f"{self.name} state must have the key 'controller', got {sorted(state)}")
        self.controller.load_state_dict(state["controller"])
        self._steps_seen = self.controller.state.steps
