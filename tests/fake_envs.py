"""Tiny deterministic TextAgentEnvs for tests without heavy engines: a counter and a pick-and-place room (choice
actions), and a quiz (free-form actions). Importing this module registers them as `craft_test/*`; worker processes
import it through the entry points."""

from __future__ import annotations

import os
import re
from typing import Any

import gymnasium as gym
import numpy as np

from craft_bench.envs.base import ActionFormat, EngineStep, TaskStart, TextAgentEnv

COUNTER_ENV_ID = "craft_test/Counter-v0"


class CounterEnv(TextAgentEnv):
    """Task "count-N-K": reach exactly N by adding 1, 2 or 3 (going past N loses); K only varies the id.
    The seeded `np_random` sets a random noise word in every observation, so seeding matters for the runner."""

    def __init__(
        self,
        split: str = "train",
        max_steps: int = 8,
        num_tasks: int = 6,
        with_broken_task: bool = False,
        crash_file: str = "",
        always_crash: bool = False,
        show_pid: bool = False,
    ):
        super().__init__(split=split, max_steps=max_steps)
        # While `crash_file` exists, the next "crash" action deletes it and kills its worker process: a one-shot
        # crash in the middle of a request, which the replay after the restart must not repeat.
        self._crash_file = crash_file
        # With `always_crash`, every "crash" action kills the worker, however often it is restarted.
        self._always_crash = always_crash
        # With `show_pid`, observations name the process: an engine that is not deterministic across processes.
        self._show_pid = show_pid
        # "count-boom" is a task whose engine raises on start, "count-3-lambda" one whose info cannot be pickled.
        broken = ["count-boom", "count-3-lambda"] if with_broken_task else []
        self._tasks = sorted([f"count-{3 + index % 4}-{index}" for index in range(num_tasks)] + broken)
        self._target = 0
        self._total = 0

    @property
    def data_source(self) -> str:
        return "generated"

    def _task_ids(self) -> list[str]:
        return self._tasks

    def _start_task(self, task_id: str) -> TaskStart:
        if task_id == "count-boom":
            raise RuntimeError("the engine exploded")
        self._target = int(task_id.split("-")[1])
        self._total = 0
        feedback = f"Reach {self._target}. {self._noise()}"
        return TaskStart(feedback=feedback, goal=f"reach {self._target}", task_type="count")

    def _engine_step(self, action: str) -> EngineStep:
        if action == "crash":
            if self._always_crash:
                os._exit(17)
            if self._crash_file and os.path.exists(self._crash_file):
                os.remove(self._crash_file)
                os._exit(17)
            return EngineStep(feedback="Nothing crashed.", won=False, lost=False, progress=self._progress)
        self._total += int(action.split()[1])
        won, lost = self._total == self._target, self._total > self._target
        return EngineStep(f"Total {self._total}. {self._noise()}", won, lost, min(self._total / self._target, 1.0))

    def _extra_info(self) -> dict[str, Any]:
        # The task "count-3-lambda" puts a value in `info` that cannot cross a process boundary.
        return {"unpicklable": lambda: None} if self._task_id == "count-3-lambda" else {}

    def _admissible_actions(self) -> list[str]:
        return ["add 1", "add 2", "add 3", "crash"]

    def _expert_plan(self) -> list[str]:
        remaining = self._target - self._total
        return ["add 3"] * (remaining // 3) + ([f"add {remaining % 3}"] if remaining % 3 else [])

    def _noise(self) -> str:
        pid = f" (process {os.getpid()})" if self._show_pid else ""
        return "Noise " + str(int(self.np_random.integers(1_000_000))) + pid


if COUNTER_ENV_ID not in gym.registry:
    gym.register(id=COUNTER_ENV_ID, entry_point="fake_envs:CounterEnv")


# ---------------------------------------------------------------------------------------------- a free-form env
QUIZ_ENV_ID = "craft_test/Quiz-v0"
QUIZ_FORMAT = ActionFormat(
    "free",
    syntax="search[NAME] | answer[CITY]",
    instruction="Search a name to learn where that person lives, then answer with the city.",
    examples=("search[alice]", "answer[paris]"),
)
_QUIZ_ACTION = re.compile(r"^(search|answer)\[([a-z ]+)\]$")
QUIZ_NAMES = ["alice", "bruno", "chiara", "dmitri", "esme", "farid", "greta", "hugo"]
QUIZ_CITIES = ["paris", "lima", "oslo", "quito", "rome", "seoul", "tunis", "vienna"]


class QuizEnv(TextAgentEnv):
    """A two-step question answering game with free-form actions: `search[NAME]` returns where NAME lives,
    `answer[CITY]` ends the episode (won if right, lost if wrong). Task "quiz-<split>-<i>" asks about one person.
    The raw action string the env received is reported in `info["raw_action"]`, so tests can check that the agent
    side sends free text untouched."""

    action_format = QUIZ_FORMAT

    def __init__(self, split: str = "train", max_steps: int = 6, num_tasks: int = 8):
        super().__init__(split=split, max_steps=max_steps)
        first = {"train": 0, "valid": 100, "test": 200}[split]
        self._tasks = [f"quiz-{split}-{first + i:03d}" for i in range(num_tasks)]
        self._raw = ""

    @property
    def data_source(self) -> str:
        return "generated"

    def _task_ids(self) -> list[str]:
        return self._tasks

    def _person_city(self, index: int) -> tuple[str, str]:
        return QUIZ_NAMES[index % len(QUIZ_NAMES)], QUIZ_CITIES[(3 * index + 1) % len(QUIZ_CITIES)]

    def _start_task(self, task_id: str) -> TaskStart:
        self._index = int(task_id.rsplit("-", 1)[1])
        self._person, self._city = self._person_city(self._index)
        self._known = False
        self._raw = ""
        return TaskStart(f"A quiz about {self._person}.", f"In which city does {self._person} live?", "quiz")

    def step(self, action: str):
        self._raw = action
        return super().step(action)

    def _is_valid_action(self, command: str) -> bool:
        return _QUIZ_ACTION.match(command) is not None

    def _engine_step(self, action: str) -> EngineStep:
        verb, argument = _QUIZ_ACTION.match(action).groups()
        if verb == "search":
            cities = dict(self._person_city(i) for i in range(len(QUIZ_NAMES)))
            if argument not in cities:
                return EngineStep(f"No result for {argument}.", won=False, lost=False, progress=self._progress)
            self._known = self._known or argument == self._person
            return EngineStep(f"{argument} lives in {cities[argument]}.", False, False, 0.5 if self._known else 0.0)
        won = argument == self._city
        return EngineStep("Right answer." if won else "Wrong answer.", won=won, lost=not won, progress=float(won))

    def _admissible_actions(self) -> list[str]:
        return []

    def _expert_plan(self) -> list[str]:
        return ([] if self._known else [f"search[{self._person}]"]) + [f"answer[{self._city}]"]

    def _extra_info(self) -> dict[str, Any]:
        return {"raw_action": self._raw}


if QUIZ_ENV_ID not in gym.registry:
    gym.register(id=QUIZ_ENV_ID, entry_point="fake_envs:QuizEnv")


# ---------------------------------------------------------------------------------------------- a pick-and-place env
PICK_PLACE_ENV_ID = "craft_test/PickPlace-v0"
PLACES = ["desk 1", "drawer 1", "drawer 2", "shelf 1", "cabinet 1", "countertop 1", "sidetable 1", "bed 1"]
THINGS = ["mug", "pen", "book", "apple", "key", "cd"]


class PickPlaceEnv(TextAgentEnv):
    """Put an object, lying somewhere in a room, into a target place (choice actions, an ALFWorld stand-in for
    tiny-model tests); task i is generated from seed i."""

    def __init__(self, split: str = "train", max_steps: int = 20, render_mode: str | None = None):
        super().__init__(split, max_steps, render_mode)
        first = {"train": 0, "valid": 1000, "sft": 2000}.get(split)
        if first is None:
            raise ValueError(f"unknown split {split!r}")
        self._ids = [f"{split}-{i:04d}" for i in range(first, first + 40)]
        self.data_sha256 = "pick-place-data-v0"

    @property
    def data_source(self) -> str:
        return "generated"

    def _task_ids(self) -> list[str]:
        return self._ids

    def _start_task(self, task_id: str) -> TaskStart:
        rng = np.random.default_rng(int(task_id.split("-")[1]))
        self._thing = str(rng.choice(THINGS))
        self._where, self._target = (str(p) for p in rng.choice(PLACES, size=2, replace=False))
        self._at, self._holding, self._placed = "door", False, False
        return TaskStart(f"You are in a room next to {', '.join(PLACES)}.", f"put a {self._thing} in {self._target}",
                         "pick_and_place")

    def _engine_step(self, action: str) -> EngineStep:
        if action.startswith("go to "):
            self._at = action[len("go to "):]
            there = f"a {self._thing}" if self._where == self._at and not self._holding else "nothing"
            feedback = f"You arrive at {self._at}. You see {there}."
        elif action.startswith("take "):
            self._holding, feedback = True, f"You pick up the {self._thing}."
        elif action.startswith("move "):
            self._holding, self._placed, feedback = False, True, f"You put the {self._thing} in {self._at}."
        else:
            feedback = f"You are at {self._at}."
        return EngineStep(feedback, won=self._placed, lost=False, progress=0.5 * self._holding + self._placed)

    def _admissible_actions(self) -> list[str]:
        actions = ["look"] + [f"go to {p}" for p in PLACES if p != self._at]
        if self._at == self._where and not self._holding and not self._placed:
            actions.append(f"take {self._thing} from {self._at}")
        if self._holding and self._at == self._target:
            actions.append(f"move {self._thing} to {self._at}")
        return actions

    def _expert_plan(self) -> list[str]:
        plan = []
        if not self._holding:
            plan += [f"go to {self._where}"] if self._at != self._where else []
            plan.append(f"take {self._thing} from {self._where}")
        if self._at != self._target or not self._holding:
            plan.append(f"go to {self._target}")
        return plan + [f"move {self._thing} to {self._target}"]


if PICK_PLACE_ENV_ID not in gym.registry:
    gym.register(id=PICK_PLACE_ENV_ID, entry_point="fake_envs:PickPlaceEnv")
