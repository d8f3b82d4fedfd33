"""craft_bench.envs: the Gymnasium suite of multi-turn text-agent environments and the group runner.
Import `craft_bench` to register the `craft/*` ids; environment classes are imported lazily by Gymnasium."""

from craft_bench.envs.base import ActionFormat, EngineStep, TaskStart, TextAgentEnv, normalize_action

__all__ = ["ActionFormat", "EngineStep", "TaskStart", "TextAgentEnv", "normalize_action"]
