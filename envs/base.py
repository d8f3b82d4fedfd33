"""The environment contract of craft-bench (DESIGN.md), implemented once for every text game.
Subclasses plug in an engine; this class owns seeding, task choice, action normalisation and validation,
step counting, termination, and the `info` dict with its privileged channel for the teacher."""

from __future__ import annotations

import copy
import math
import re
import string
import unicodedata
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

#: Every character an observation or an action may hold. Engines speak printable ASCII; anything else an engine
#: emits is replaced by "?" so that `observation_space.contains(obs)` always holds.
TEXT_CHARSET = frozenset(string.printable)
MAX_OBSERVATION_CHARS = 65_536
#: Longer actions are rejected as invalid before reaching the engine (no game command is anywhere near this long).
MAX_ACTION_CHARS = 512
INVALID_ACTION_FEEDBACK = "Nothing happens."
PRIVILEGED_HEADER = "Privileged guidance (teacher only)"


@dataclass(frozen=True)
class ActionFormat:
    """How an environment expects its actions: picked from `info["admissible_actions"]`, or free-form text.

    Agents read it from `info["action_format"]` (a plain dict of these fields), so prompts, reply parsing and
    tiny-model data follow the environment's declaration and `agents/` needs no per-environment case.
    """

    kind: str = "choice"
    """`choice`: the action is one of `info["admissible_actions"]`, which is complete. `free`: free-form text in
    `syntax`; `admissible_actions` then lists only the concrete actions the current state offers (may be empty)."""
    syntax: str = ""
    """The action grammar in one line, e.g. `search[QUERY] | answer[TEXT]` (empty for `choice`)."""
    instruction: str = ""
    """One or two sentences for the prompt on how to write an action (empty: the default for the kind)."""
    examples: tuple[str, ...] = ()
    """A few well-formed actions, for prompts and documentation."""

    def __post_init__(self) -> None:
        if self.kind not in ACTION_KINDS:
            raise ValueError(f"ActionFormat.kind must be one of {ACTION_KINDS}, got {self.kind!r}")
        if self.kind == "free" and not self.syntax:
            raise ValueError("a free-form ActionFormat needs its syntax, e.g. 'search[QUERY] | answer[TEXT]'")

    def to_info(self) -> dict[str, Any]:
        """The plain-dict form carried in `info["action_format"]` (JSON- and pickle-friendly)."""
        return {"kind": self.kind, "syntax": self.syntax, "instruction": self.instruction,
                "examples": list(self.examples)}

    @classmethod
    def from_info(cls, value: dict[str, Any]) -> "ActionFormat":
        """The inverse of `to_info`."""
        return cls(value["kind"], value.get("syntax", ""), value.get("instruction", ""),
                   tuple(value.get("examples", ())))


ACTION_KINDS = ("choice", "free")
#: The declaration of every environment whose actions are picked from the admissible list (the default).
CHOOSE_ADMISSIBLE = ActionFormat("choice")


@dataclass
class TaskStart:
    """What an engine reports when it starts a task."""

    feedback: str
    goal: str
    task_type: str
    extra_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class EngineStep:
    """What an engine reports after executing one admissible action."""

    feedback: str
    won: bool
    lost: bool
    progress: float


def clean_text(text: str) -> str:
    """Map text into `TEXT_CHARSET`: unicode normalised, non-printable characters replaced by '?'."""
    text = unicodedata.normalize("NFKC", text)
    return "".join(ch if ch in TEXT_CHARSET else "?" for ch in text)[:MAX_OBSERVATION_CHARS]


def normalize_action(action: str, aliases: dict[str, str] | None = None) -> str:
    """Canonical form of a typed action: lower case, single spaces, no trailing period, aliases expanded.

    `aliases` maps a whole normalised command (e.g. "n") or a leading verb followed by a space
    (e.g. "put ") to its replacement.
    """
    text = unicodedata.normalize("NFKC", action).lower()
    # Trailing periods and exclamation marks go with any spaces between them ("open door . !" is "open door"), so
    # that normalising twice changes nothing.
    text = re.sub(r"[ .!]+$", "", re.sub(r"\s+", " ", text).strip())
    for short, full in (aliases or {}).items():
        if text == short:
            return full
        if short.endswith(" ") and text.startswith(short):
            return full + text[len(short):]
    return text


class TextAgentEnv(gym.Env[str, str], ABC):
    """A multi-turn text game with a privileged channel for a self-distillation teacher.

    Subclasses implement the engine hooks (`_task_ids`, `_start_task`, `_engine_step`, `_admissible_actions`,
    `_expert_plan`) and may add privileged keys (`_privileged_extras`), aliases (`action_aliases`) or their own
    normalisation (`_normalize`).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 1}
    #: Bumped (and the registered `-vN` id with it) whenever data, action syntax or reward change.
    env_version: str = "v0"
    #: Whole-command or verb aliases, see `normalize_action`.
    action_aliases: dict[str, str] = {}
    #: How actions are chosen (reported in `info["action_format"]`); free-form environments override it.
    action_format: ActionFormat = CHOOSE_ADMISSIBLE

    def __init__(self, split: str = "train", max_steps: int = 50, render_mode: str | None = None):
        if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
            raise ValueError(f"max_steps must be an int >= 1, got {type(max_steps).__name__}: {max_steps!r}")
        if not isinstance(split, str):
            raise ValueError(f"split must be a str, got {type(split).__name__}: {split!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.split = split
        self.max_steps = int(max_steps)
        self.render_mode = render_mode
        self.observation_space = spaces.Text(MAX_OBSERVATION_CHARS, min_length=1, charset=TEXT_CHARSET)
        self.action_space = spaces.Text(MAX_ACTION_CHARS, min_length=0, charset=TEXT_CHARSET)
        self._task_id: str | None = None
        self._start: TaskStart | None = None
        self._step_count = 0
        self._won = False
        self._progress = 0.0
        self._done = True
        self._last_obs = ""
        self._admissible: list[str] = []
        # Set when a reset failed part-way (e.g. on a corrupt cached game): the engine may hold half a task, so the
        # env refuses `step` with this message until a reset succeeds, instead of playing on under the new task id.
        self._failed_reset: str | None = None

    # ------------------------------------------------------------------ engine hooks
    @property
    @abstractmethod
    def data_source(self) -> str:
        """`official`, `generated`, or the user path the tasks came from."""

    @abstractmethod
    def _task_ids(self) -> list[str]:
        """Every task id of `self.split`, sorted; cheap (no engine work)."""

    @abstractmethod
    def _start_task(self, task_id: str) -> TaskStart:
        """Start the engine on `task_id` from its initial state."""

    @abstractmethod
    def _engine_step(self, action: str) -> EngineStep:
        """Execute an admissible, normalised action."""

    @abstractmethod
    def _admissible_actions(self) -> list[str]:
        """The normalised admissible actions of the current state."""

    @abstractmethod
    def _expert_plan(self) -> list[str]:
        """A winning action sequence from the current state (empty once won)."""

    def _privileged_extras(self) -> dict[str, Any]:
        """Environment-specific privileged keys, beyond `expert_plan` and `text`."""
        return {}

    def _render_privileged(self, plan: list[str], extras: dict[str, Any]) -> str:
        """The teacher block: the remaining expert plan and any textual extras, never shown to the student."""
        lines = [f"{PRIVILEGED_HEADER}:"]
        lines.append("Expert plan from here: " + ("; ".join(plan) if plan else "(task complete)"))
        for key, value in extras.items():
            if isinstance(value, str) and value:
                lines.append(f"{key.replace('_', ' ').capitalize()}: {value}")
        return "\n".join(lines)

    def _normalize(self, action: str) -> str:
        """The canonical form of a typed action; override for rewrites that aliases cannot express."""
        return normalize_action(action, self.action_aliases)

    def _is_valid_action(self, command: str) -> bool:
        """Whether a normalised, non-empty command may reach the engine. The default (choice format) accepts exactly
        the admissible actions; free-form environments override it with their syntax check."""
        return command in self._admissible

    def _extra_info(self) -> dict[str, Any]:
        """Environment-specific info keys (engine version, data hash, ...)."""
        return {}

    # ------------------------------------------------------------------ public API
    @property
    def task_ids(self) -> list[str]:
        """The split's sorted task ids (a copy)."""
        return list(self._task_ids())

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = set(options) - {"task_id", "task_index"}
        if unknown:
            raise ValueError(f"unknown reset option(s) {sorted(unknown)}; valid: ['task_id', 'task_index']")
        tasks = self._task_ids()
        if not tasks:
            raise RuntimeError(f"{type(self).__name__}: split {self.split!r} has no tasks")
        if "task_id" in options:
            task_id = str(options["task_id"])
            if task_id not in set(tasks):
                raise ValueError(
                    f"task_id {task_id!r} is not in split {self.split!r} ({len(tasks)} tasks, e.g. {tasks[0]!r}); "
                    "see env.unwrapped.task_ids"
                )
        elif "task_index" in options:
            index = options["task_index"]
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                raise ValueError(
                    f"reset option task_index must be an int (taken modulo the split's {len(tasks)} tasks), got "
                    f"{type(index).__name__}: {index!r:.80}"
                )
            task_id = tasks[int(index) % len(tasks)]
        else:
            task_id = tasks[int(self.np_random.integers(len(tasks)))]

        # Nothing of the previous episode survives a reset that fails part-way: the env holds no episode then.
        # (`_task_id` is set first because engine hooks read it while they start the task.)
        self._task_id, self._start, self._done = task_id, None, True
        self._failed_reset = f"the last reset (task {task_id!r}) failed"
        try:
            start = self._start_task(task_id)
            self._start = start
            self._step_count = 0
            self._won = False
            self._progress = 0.0
            self._admissible = self._admissible_actions()
            self._last_obs = clean_text(start.feedback) or INVALID_ACTION_FEEDBACK
            info = self._info(action_valid=True)
        except BaseException as error:
            self._task_id, self._start, self._done, self._last_obs = None, None, True, ""
            self._failed_reset += f" ({type(error).__name__}: {str(error).strip()[:300]})"
            raise
        self._failed_reset = None
        self._done = False
        return self._last_obs, info

    def step(self, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        if not isinstance(action, str):
            raise TypeError(f"action must be a str (a text command), got {type(action).__name__}: {action!r:.80}")
        if self._failed_reset is not None:
            raise RuntimeError(f"{self._failed_reset}, so this env holds no episode; call reset() again")
        if self._start is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the episode is over (terminated or truncated); call reset() to start a new one")

        command = self._normalize(action) if len(action) <= MAX_ACTION_CHARS else ""
        valid = bool(command) and self._is_valid_action(command)
        self._step_count += 1
        reward = 0.0
        terminated = False
        if valid:
            result = self._engine_step(command)
            feedback = result.feedback
            progress = float(result.progress)
            if not math.isfinite(progress):  # a NaN would pass the clamp below and poison every shaped return
                raise ValueError(f"{type(self).__name__}._engine_step returned progress={progress}; it must be a finite number in [0, 1]")
            self._progress = min(max(progress, 0.0), 1.0)
            if result.won and not self._won:
                reward = 1.0
            self._won = self._won or result.won
            terminated = result.won or result.lost
            self._admissible = [] if terminated else self._admissible_actions()
        else:
            feedback = INVALID_ACTION_FEEDBACK
        truncated = not terminated and self._step_count >= self.max_steps
        self._done = terminated or truncated
        self._last_obs = clean_text(feedback) or INVALID_ACTION_FEEDBACK
        return self._last_obs, reward, terminated, truncated, self._info(action_valid=valid)

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return self._last_obs
        return None

    # ------------------------------------------------------------------ helpers
    def _info(self, action_valid: bool) -> dict[str, Any]:
        assert self._start is not None and self._task_id is not None
        plan = [] if self._won else list(self._expert_plan())
        extras = self._privileged_extras()
        privileged = {"expert_plan": plan, "text": self._render_privileged(plan, extras), **extras}
        info = {
            "task_id": self._task_id,
            "task_type": self._start.task_type,
            "goal": self._start.goal,
            "admissible_actions": list(self._admissible),
            "won": self._won,
            "progress": self._progress,
            "step": self._step_count,
            "action_valid": action_valid,
            "action_format": self.action_format.to_info(),
            "privileged": privileged,
            "data_source": self.data_source,
            "env_version": self.env_version,
            **self._start.extra_info,
            **self._extra_info(),
        }
        # Users keep what we return: hand out fresh containers every call (Gymnasium's check_env checks this).
        return copy.deepcopy(info)


def seeded_generator(seed: int) -> np.random.Generator:
    """A numpy Generator for offline data generation, independent of any global random state."""
    return np.random.default_rng(np.random.SeedSequence(seed))
