"""GRPO: the clipped policy-gradient loss on group-normalised episode advantages, and nothing else.
No teacher forward pass is requested (`needs.teacher` is None); the reference is scored only when α > 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from craft_bench.agents.methods.base import CommonOptions, Method


@dataclass
class GrpoOptions(CommonOptions):
    """GRPO has only the common options."""


class Grpo(Method):
    """agg(pg + α·k3) - h·agg(H)."""

    name = "grpo"
    Options: ClassVar[type] = GrpoOptions
