"""craft/TextWorld-v0: TextWorld games (coin collector, treasure hunter, cooking) generated offline by TextWorld's own
generator and played by its engine; privileged context = the winning policy from the current state + the walkthrough."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Sequence
from typing import Any

from craft_bench.envs.base import EngineStep, TaskStart, TextAgentEnv, normalize_action
from craft_bench.envs.textworld_games import (
    GAMES_REVISION,
    GameSpec,
    game_file,
    game_pool,
    parse_task_id,
    textworld_version,
)

_DIRECTIONS = ("north", "south", "east", "west")

#: The abbreviations text-adventure players type (Infocom conventions), mapped to TextWorld's command grammar.
TEXTWORLD_ALIASES: dict[str, str] = {
    **{d[0]: f"go {d}" for d in _DIRECTIONS},
    **{d: f"go {d}" for d in _DIRECTIONS},
    **{f"go {d[0]}": f"go {d}" for d in _DIRECTIONS},
    **{f"walk {d}": f"go {d}" for d in _DIRECTIONS},
    "l": "look",
    "look around": "look",
    "i": "inventory",
    "inv": "inventory",
    "x ": "examine ",
    "look at ": "examine ",
    "get ": "take ",
    "pick up ": "take ",
}

# A line of TextWorld's ASCII-art banner holds no letter; the prose that follows it always does.
_LETTER = re.compile(r"[A-Za-z]")
# The prompt and status line TextWorld appends to every reply: ">  ...  -= Room =-<score>/<moves>".
_PROMPT_AND_STATUS = re.compile(r"\n\s*>\s*(-=.*=-\s*\d+/\d+)?\s*$")
_RESTART_PROMPT = "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"


def clean_feedback(text: str) -> str:
    """This step's feedback without TextWorld's banner, trailing prompt, status line and restart prompt."""
    lines = text.replace("\r", "").split("\n")
    while lines and not _LETTER.search(lines[0]):
        lines.pop(0)
    text = "\n".join(line.strip() for line in lines)
    text = _PROMPT_AND_STATUS.sub("", text).replace(_RESTART_PROMPT, "")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _as_tuple(value: Any, name: str) -> tuple:
    if isinstance(value, (str, int)):
        return (value,)
    if isinstance(value, Sequence) and value:
        return tuple(value)
    raise ValueError(f"{name} must be one value or a non-empty sequence of values, got {value!r}")


class TextWorldEnv(TextAgentEnv):
    """TextWorld games from `textworld.challenges`, one compiled game per task id, built on first use.

    Args:
        split: `train`, `valid`, `test`, or `sft` (games to fine-tune a model on before RL, `TinyBudget.collect_split`);
            each draws its games from its own seed range.
        family: `coin_collector`, `treasure_hunter`, `cooking`, or a sequence of them (a mix).
        level: difficulty level, or a sequence of levels; every family is paired with every level. TextWorld's own
            levels for coin collector (1-100, 101-150, 201-233: the ones within 100 rooms) and treasure hunter
            (1-30); cooking 1-6, see `textworld_games.COOKING_LEVELS`.
        n_games: games per (family, level) pair.
        max_steps: steps before truncation.
    """

    action_aliases = TEXTWORLD_ALIASES

    def __init__(
        self,
        split: str = "train",
        family: str | Sequence[str] = "coin_collector",
        level: int | Sequence[int] = 1,
        n_games: int = 8,
        max_steps: int = 50,
        render_mode: str | None = None,
    ):
        super().__init__(split=split, max_steps=max_steps, render_mode=render_mode)
        self.families = _as_tuple(family, "family")
        self.levels = _as_tuple(level, "level")
        self._pool: list[GameSpec] = game_pool(split, self.families, self.levels, n_games)
        self._task_id_list = [spec.task_id for spec in self._pool]
        # Two builds of one game can differ in bytes (TextWorld writes some rules in Python's set order, which varies
        # between processes) while playing identically, so the data is identified by what determines it.
        identity = {"textworld": textworld_version(), "revision": GAMES_REVISION, "task_ids": self._task_id_list}
        self.data_sha256 = hashlib.sha256(json.dumps(identity).encode()).hexdigest()
        self._engine: Any = None
        self._engine_path: str | None = None
        self._state: Any = None
        self._walkthrough: list[str] = []
        # TextWorld lists ~10-40 admissible commands per step from a small per-game vocabulary; normalising each
        # once instead of every step keeps the wrapper's cost per step small next to the engine's.
        self._canonical: dict[str, str] = {}

    @property
    def data_source(self) -> str:
        return "generated"

    # ------------------------------------------------------------------ engine hooks
    def _task_ids(self) -> list[str]:
        return self._task_id_list

    def _start_task(self, task_id: str) -> TaskStart:
        spec = parse_task_id(task_id)
        path = str(game_file(spec))
        if path != self._engine_path:
            self.close()
            self._engine = start_engine(path)
            self._engine_path = path
        self._state = self._engine.reset()
        self._walkthrough = [normalize_action(c) for c in (self._state.get("extra.walkthrough") or [])]
        goal = clean_feedback(self._state.objective)
        # The intro repeats the objective, which the agent already gets as `info["goal"]`; keep the room only.
        feedback = clean_feedback(self._state.feedback).removeprefix(goal).strip()
        return TaskStart(
            feedback=feedback,
            goal=goal,
            task_type=spec.task_type,
            extra_info={"family": spec.family, "level": spec.level, "max_score": int(self._state.max_score)},
        )

    def _engine_step(self, action: str) -> EngineStep:
        self._state, score, _ = self._engine.step(action)
        max_score = self._state.max_score or 1
        return EngineStep(
            feedback=clean_feedback(self._state.feedback),
            won=bool(self._state.won),
            lost=bool(self._state.lost),
            progress=score / max_score,
        )

    def _admissible_actions(self) -> list[str]:
        canonical = self._canonical
        for command in self._state.admissible_commands:
            if command not in canonical:
                canonical[command] = normalize_action(command)
        return sorted({canonical[command] for command in self._state.admissible_commands})

    def _expert_plan(self) -> list[str]:
        return [normalize_action(c) for c in (self._state.policy_commands or [])]

    def _privileged_extras(self) -> dict[str, Any]:
        return {"walkthrough": list(self._walkthrough)}

    def _render_privileged(self, plan: list[str], extras: dict[str, Any]) -> str:
        text = super()._render_privileged(plan, extras)
        return text + "\nWalkthrough from the start: " + "; ".join(extras["walkthrough"])

    def _extra_info(self) -> dict[str, Any]:
        return {"score": int(self._state.score), "data_sha256": self.data_sha256}

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None
        self._engine_path = None
        self._canonical.clear()


def start_engine(path: str, infos: Any = None) -> Any:
    """`textworld.start` on the compiled game at `path`, asked for `infos` (default: what the wrapper needs)."""
    import textworld

    with warnings.catch_warnings():
        # Jericho warns that it cannot track score in TextWorld's games; TextWorld tracks score itself.
        warnings.filterwarnings("ignore", message=".*is not fully supported.*")
        return textworld.start(path, request_infos=requested_infos() if infos is None else infos)


def requested_infos() -> Any:
    """What the env asks TextWorld to compute each step (also used by the raw-engine benchmark, for a fair baseline)."""
    from textworld import EnvInfos

    return EnvInfos(
        admissible_commands=True,
        policy_commands=True,
        score=True,
        max_score=True,
        won=True,
        lost=True,
        objective=True,
        extras=["walkthrough"],
    )
