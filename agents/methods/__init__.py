"""The trainers' methods: `make_method(name, **options)` builds grpo, opsd, sdar, skill_sd, rlsd, adaptive_cringe or
craft (CRAFT_SPEC.md §5). Each exposes `needs`, prepare/loss/end_step, config and state (see methods/base.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

from craft_bench.agents.methods.adaptive_cringe import AdaptiveCringe
from craft_bench.agents.methods.base import Method, Needs, StepContext, StepStats, combine_metrics
from craft_bench.agents.methods.craft import Craft
from craft_bench.agents.methods.grpo import Grpo
from craft_bench.agents.methods.rlsd import Rlsd
from craft_bench.agents.methods.sdar import Opsd, Sdar
from craft_bench.agents.methods.skill_sd import SkillSd

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Grpo, Opsd, Sdar, SkillSd, Rlsd, AdaptiveCringe, Craft)
}
METHOD_NAMES: tuple[str, ...] = tuple(METHODS)
"""Every method name, in the order of CRAFT_SPEC.md §3."""

def _method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHOD_NAMES)}")
    return METHODS[name]


def method_defaults(name: str) -> dict[str, Any]:
    """The documented default of every option of method `name` (a plain dict)."""
    return dataclasses.asdict(_method_class(name).Options())


def method_options_help(name: str) -> dict[str, str]:
    """One line of help per option of method `name`; options marked (ours) are choices the CRAFT paper leaves open."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(_method_class(name).Options)}


def make_method(name: str, **options: Any) -> Method:
    """Build method `name` with `options` overriding its defaults; an unknown name or option is a ValueError
    listing the valid ones."""
    cls = _method_class(name)
    valid = [f.name for f in dataclasses.fields(cls.Options)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid options: {', '.join(valid)}")
    return cls(cls.Options(**options))


__all__ = [
    "METHODS", "METHOD_NAMES", "Method", "Needs", "StepContext", "StepStats", "combine_metrics", "make_method",
    "method_defaults", "method_options_help",
]
