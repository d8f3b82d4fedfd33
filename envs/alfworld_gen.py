"""Generates ALFWorld-format games offline from the floor plans, constants, PDDL domain and grammar of `alfworld`.
Each game is a `game.tw-pddl` + `traj_data.json` pair, verified solvable by Fast Downward and cached by seed."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

#: Bump whenever generated content changes for a given seed: it keys the cache and the data hash.
GENERATOR_VERSION = "2"

#: ALFWorld's six task types, in ALFWorld's own order (`alfred_tw_env.TASK_TYPES`).
TASK_TYPES: tuple[str, ...] = (
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
)

SPLITS: tuple[str, ...] = ("train", "valid", "test")
#: Seeds of split `s` are `SPLIT_SEED_BASE[s] + index`; the ranges never overlap while an index stays below
#: `MAX_TASKS_PER_TYPE`.
MAX_TASKS_PER_TYPE = 1_000_000
SPLIT_SEED_BASE = {split: i * MAX_TASKS_PER_TYPE for i, split in enumerate(SPLITS)}
#: Candidates tried per task id before giving up; the k-th candidate's seed is derived from (seed, k).
MAX_ATTEMPTS = 32
#: Plans longer than this are rejected, as ALFRED's generator does (`constants.PLANNER_MAX_STEPS` is for THOR).
MAX_PLAN_LENGTH = 40

#: Where a desk lamp may stand: ALFRED scenes put them on these furniture classes.
LAMP_RECEPTACLES = ("Desk", "SideTable", "Dresser", "Shelf", "CoffeeTable", "DiningTable", "TVStand")
LAMP_CLASS = "DeskLamp"
#: Receptacle class a state-change task needs, and the one it must not use as the final receptacle.
APPLIANCE = {
    "pick_clean_then_place_in_recep": ("SinkBasin", "Cleanable"),
    "pick_heat_then_place_in_recep": ("Microwave", "Heatable"),
    "pick_cool_then_place_in_recep": ("Fridge", "Coolable"),
}
#: Receptacles kept per game (see `_room_subset`), by task type; bounds the planner's search. Two-object goals
#: search much harder: with 8-14 receptacles a replan from a random agent's state took 196 ms on average (up to
#: 2.2 s), with 6-10 it takes 8 ms.
RECEPTACLE_RANGE = {"pick_two_obj_and_place": (6, 10)}
DEFAULT_RECEPTACLE_RANGE = (8, 14)
#: Distractor objects per game.
MIN_DISTRACTORS, MAX_DISTRACTORS = 3, 8
#: ALFRED writes receptacle poses on a 0.25 m navigation grid.
GRID_SIZE = 0.25


def _constants():
    import alfworld.gen.constants as constants

    return constants


def alfworld_paths() -> dict[str, Path]:
    """Paths of the files `alfworld` ships that the generator reads."""
    import alfworld.info as info

    root = Path(info.BUILTIN_DATA_PATH).parent
    return {
        "domain": Path(info.ALFRED_PDDL_PATH),
        "grammar": Path(info.ALFRED_TWL2_PATH),
        "layouts": root / "gen" / "layouts",
    }


def alfworld_version() -> str:
    """The installed alfworld version (recorded with every result: its syntax and data changed across versions)."""
    import alfworld.info as info

    return str(info.__version__)


def mangle(alfred_id: str) -> str:
    """ALFRED's PDDL spelling of an object id: `Drawer|+01.00|...` -> `Drawer_bar__plus_01_dot_00...`."""
    for char, word in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        alfred_id = alfred_id.replace(char, word)
    return alfred_id


@dataclass(frozen=True)
class FloorPlan:
    """One AI2-THOR floor plan as the alfworld package describes it."""

    scene_num: int
    receptacles: dict[str, tuple[float, float, int, int]]  # ALFRED receptacle id -> (x, z, rotation, horizon)
    object_classes: tuple[str, ...]  # pickupable object classes present in the scene

    @property
    def room_type(self) -> str:
        for room, numbers in _constants().SCENE_TYPE.items():
            if self.scene_num in numbers:
                return room
        raise ValueError(f"scene {self.scene_num} has no room type in alfworld.gen.constants.SCENE_TYPE")

    @property
    def receptacle_classes(self) -> set[str]:
        return {receptacle_class(r) for r in self.receptacles}


def receptacle_class(alfred_id: str) -> str:
    """`Sink|x|y|z|SinkBasin` is a SinkBasin; other ids start with their class."""
    parts = alfred_id.split("|")
    return parts[4] if len(parts) > 4 else parts[0]


@lru_cache(maxsize=None)
def pickupable_classes() -> frozenset[str]:
    """Object classes some receptacle may hold, minus the static receptacles themselves."""
    constants = _constants()
    static = set(constants.RECEPTACLES) - set(constants.MOVABLE_RECEPTACLES)
    held = set().union(*constants.VAL_RECEPTACLE_OBJECTS.values())
    return frozenset(c for c in held if c not in static and "Sliced" not in c and c in constants.OBJECTS)


@lru_cache(maxsize=None)
def load_floor_plan(scene_num: int) -> FloorPlan:
    """A floor plan's receptacles that can hold objects (with poses) and the object classes it contains."""
    constants = _constants()
    layouts = alfworld_paths()["layouts"]
    with open(layouts / f"FloorPlan{scene_num}-openable.json") as f:
        poses = json.load(f)
    with open(layouts / f"FloorPlan{scene_num}-objects.json") as f:
        present = set(json.load(f))
    holders = set(constants.VAL_RECEPTACLE_OBJECTS) - set(constants.MOVABLE_RECEPTACLES)
    receptacles = {
        rid: (float(p[0]), float(p[1]), int(p[2]), int(p[3]))
        for rid, p in poses.items()
        if receptacle_class(rid) in holders
    }
    objects = tuple(sorted((present & pickupable_classes()) | ({LAMP_CLASS} & present)))
    return FloorPlan(scene_num, receptacles, objects)


def split_scenes(split: str) -> list[int]:
    """Floor plans of a split: train and valid use ALFRED's train scenes, test only its held-out test scenes."""
    constants = _constants()
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    scenes = constants.TEST_SCENE_NUMBERS if split == "test" else constants.TRAIN_SCENE_NUMBERS
    return sorted(scenes)


def task_seed(split: str, index: int) -> int:
    """The seed of the `index`-th task of a split; split ranges are disjoint."""
    if not 0 <= index < MAX_TASKS_PER_TYPE:
        raise ValueError(f"task index must be in [0, {MAX_TASKS_PER_TYPE}), got {index}")
    return SPLIT_SEED_BASE[split] + index


# ---------------------------------------------------------------------------------------------- task sampling
@dataclass(frozen=True)
class TaskSpec:
    """What one candidate game asks and where its objects lie (ALFRED ids, unmangled)."""

    task_type: str
    scene_num: int
    object_target: str
    parent_target: str
    toggle_target: str
    receptacles: tuple[str, ...]  # the floor plan's receptacles this game keeps
    objects: dict[str, str]  # object id -> receptacle id holding it
    agent_location: tuple[int, int, int, int]
    goal: str


def _can_hold(receptacle_cls: str, object_cls: str) -> bool:
    return object_cls in _constants().VAL_RECEPTACLE_OBJECTS.get(receptacle_cls, ())


def _combos(task_type: str, plan: FloorPlan) -> list[tuple[str, str, str]]:
    """Every (object, parent receptacle, toggle) class triple this task type can use in this floor plan."""
    constants = _constants()
    rclasses = plan.receptacle_classes
    objs = [o for o in plan.object_classes if o != LAMP_CLASS]
    if task_type == "look_at_obj_in_light":
        if LAMP_CLASS not in plan.object_classes or not rclasses & set(LAMP_RECEPTACLES):
            return []
        return [(o, "", LAMP_CLASS) for o in objs if any(_can_hold(r, o) for r in rclasses)]
    appliance, ability = APPLIANCE.get(task_type, (None, None))
    if appliance is not None and appliance not in rclasses:
        return []
    combos = []
    for o in objs:
        if ability is not None and o not in constants.VAL_ACTION_OBJECTS[ability]:
            continue
        for parent in sorted(rclasses):
            if parent == appliance or not _can_hold(parent, o):
                continue
            # The objects must start somewhere other than the goal receptacle class.
            if any(_can_hold(r, o) for r in rclasses if r != parent):
                combos.append((o, parent, ""))
    return combos


def _room_subset(plan: FloorPlan, task_type: str, rng: np.random.Generator) -> FloorPlan:
    """A floor plan restricted to some of its receptacles, keeping every class once where possible.

    Whole floor plans (up to 47 receptacles, 30 of them openable) make Fast Downward's optimal replanning take
    minutes on a state-change task; ALFRED's own problems likewise list only the task-relevant part of a scene.
    """
    by_class: dict[str, list[str]] = {}
    for rid in sorted(plan.receptacles):
        by_class.setdefault(receptacle_class(rid), []).append(rid)
    keep = [ids[int(rng.integers(len(ids)))] for ids in by_class.values()]
    rest = [rid for rid in sorted(plan.receptacles) if rid not in keep]
    low, high = RECEPTACLE_RANGE.get(task_type, DEFAULT_RECEPTACLE_RANGE)
    n_extra = min(len(rest), max(0, int(rng.integers(low, high + 1)) - len(keep)))
    keep += [rest[i] for i in rng.choice(len(rest), size=n_extra, replace=False)] if n_extra else []
    return FloorPlan(plan.scene_num, {rid: plan.receptacles[rid] for rid in sorted(keep)}, plan.object_classes)


def _object_id(cls: str, near: tuple[float, float, int, int], rng: np.random.Generator, taken: set[str]) -> str:
    """A fresh ALFRED-style id for an object lying near a receptacle pose (coordinates are cosmetic)."""
    while True:
        x = near[0] + rng.uniform(-0.4, 0.4)
        y = rng.uniform(0.0, 1.8)
        z = near[1] + rng.uniform(-0.4, 0.4)
        oid = f"{cls}|{x:+06.2f}|{y:+06.2f}|{z:+06.2f}"
        if oid not in taken:
            taken.add(oid)
            return oid


def sample_task(task_type: str, split: str, rng: np.random.Generator) -> TaskSpec | None:
    """One candidate game of `task_type` in a floor plan of `split`, or None when the draw cannot host it."""
    constants = _constants()
    rooms = constants.GOALS_VALID[task_type]
    scenes = [s for s in split_scenes(split) if load_floor_plan(s).room_type in rooms]
    plan = _room_subset(load_floor_plan(int(rng.choice(scenes))), task_type, rng)
    combos = _combos(task_type, plan)
    if not combos:
        return None
    obj_cls, parent_cls, toggle_cls = combos[int(rng.integers(len(combos)))]

    taken: set[str] = set()
    objects: dict[str, str] = {}

    def place(cls: str, allowed: list[str]) -> None:
        recep = allowed[int(rng.integers(len(allowed)))]
        objects[_object_id(cls, plan.receptacles[recep], rng, taken)] = recep

    start_receps = [r for r in sorted(plan.receptacles)
                    if receptacle_class(r) != parent_cls and _can_hold(receptacle_class(r), obj_cls)]
    if not start_receps:
        return None
    n_targets = 2 if task_type == "pick_two_obj_and_place" else 1
    if task_type != "pick_two_obj_and_place":
        n_targets += int(rng.integers(0, 2))  # sometimes a spare instance, as in ALFRED scenes
    for _ in range(n_targets):
        place(obj_cls, start_receps)
    if toggle_cls:
        lamp_receps = [r for r in sorted(plan.receptacles) if receptacle_class(r) in LAMP_RECEPTACLES]
        place(toggle_cls, lamp_receps)
    distractor_classes = [c for c in plan.object_classes if c not in (obj_cls, LAMP_CLASS)]
    for _ in range(int(rng.integers(MIN_DISTRACTORS, MAX_DISTRACTORS + 1)) if distractor_classes else 0):
        cls = distractor_classes[int(rng.integers(len(distractor_classes)))]
        allowed = [r for r in sorted(plan.receptacles) if _can_hold(receptacle_class(r), cls)]
        if allowed:
            place(cls, allowed)

    used = {_location(pose) for pose in plan.receptacles.values()}
    while True:
        agent = (int(rng.integers(-20, 21)), int(rng.integers(-20, 21)), int(rng.integers(0, 4)) * 90, 30)
        if agent not in used:
            break
    templates = _goal_library()[task_type]["templates"]
    template = templates[int(rng.integers(len(templates)))]
    goal = template.format(obj=obj_cls.lower(), recep=parent_cls.lower(), toggle=toggle_cls.lower(), mrecep="")
    return TaskSpec(task_type, plan.scene_num, obj_cls, parent_cls, toggle_cls, tuple(sorted(plan.receptacles)),
                    objects, agent, goal)


def _goal_library() -> dict[str, Any]:
    import alfworld.gen.goal_library as goal_library

    return goal_library.gdict


def _location(pose: tuple[float, float, int, int]) -> tuple[int, int, int, int]:
    return (int(round(pose[0] / GRID_SIZE)), int(round(pose[1] / GRID_SIZE)), int(pose[2]), int(pose[3]))


# ---------------------------------------------------------------------------------------------- PDDL writing
def _loc_name(loc: tuple[int, int, int, int]) -> str:
    return mangle("loc|%d|%d|%d|%d" % loc)


def problem_pddl(spec: TaskSpec, name: str) -> str:
    """The PDDL problem of a task, in the shape ALFRED's `PlannedGameState.state_to_pddl` writes."""
    constants = _constants()
    poses = load_floor_plan(spec.scene_num).receptacles
    receptacle_types = set(constants.RECEPTACLES) - set(constants.MOVABLE_RECEPTACLES)
    object_types = set(constants.OBJECTS_SET) - receptacle_types

    # Each receptacle gets its own location: the grammar's "go to" lists every receptacle of a location.
    locations: dict[str, tuple[int, int, int, int]] = {}
    used: set[tuple[int, int, int, int]] = {spec.agent_location}
    for rid in spec.receptacles:
        loc = _location(poses[rid])
        while loc in used:
            loc = (loc[0], loc[1], loc[2], loc[3] + 1)
        used.add(loc)
        locations[rid] = loc

    objects = {oid: oid.split("|")[0] for oid in spec.objects}
    receptacles = {rid: receptacle_class(rid) for rid in spec.receptacles}
    actions = constants.VAL_ACTION_OBJECTS
    decl = ["agent1 - agent"]
    decl += [f"{t}Type - otype" for t in sorted(object_types)]
    decl += [f"{t}Type - rtype" for t in sorted(receptacle_types)]
    decl += [f"{mangle(o)} - object" for o in sorted(objects)]
    decl += [f"{mangle(r)} - receptacle" for r in sorted(receptacles)]
    decl += [f"{_loc_name(loc)} - location" for loc in sorted(used)]

    init = ["(= (total-cost) 0)", f"(atLocation agent1 {_loc_name(spec.agent_location)})"]
    for rid, cls in sorted(receptacles.items()):
        init.append(f"(receptacleType {mangle(rid)} {cls}Type)")
        init.append(f"(receptacleAtLocation {mangle(rid)} {_loc_name(locations[rid])})")
        if cls in constants.OPENABLE_CLASS_SET:
            init.append(f"(openable {mangle(rid)})")
    for oid, cls in sorted(objects.items()):
        m = mangle(oid)
        init.append(f"(objectType {m} {cls}Type)")
        init.append(f"(inReceptacle {m} {mangle(spec.objects[oid])})")
        init.append(f"(objectAtLocation {m} {_loc_name(locations[spec.objects[oid]])})")
        if cls in actions["Toggleable"]:
            init.append(f"(toggleable {m})")
        else:
            init.append(f"(pickupable {m})")
        for ability, predicate in (("Cleanable", "cleanable"), ("Heatable", "heatable"),
                                   ("Coolable", "coolable"), ("Sliceable", "sliceable")):
            if cls in actions[ability]:
                init.append(f"({predicate} {m})")
    for rcls in sorted(set(receptacles.values())):
        for ocls in sorted(set(objects.values())):
            if _can_hold(rcls, ocls):
                init.append(f"(canContain {rcls}Type {ocls}Type)")

    goal = _goal_library()[spec.task_type]["pddl"].format(
        obj=spec.object_target, recep=spec.parent_target, toggle=spec.toggle_target, mrecep=""
    ).replace("#", "-")
    nl = "\n        "
    return (
        f"(define (problem {name})\n    (:domain alfred)\n    (:objects\n        {nl.join(decl)}\n    )\n"
        f"    (:init\n        {nl.join(init)}\n    )\n{goal.rstrip()}\n"
    )


def grammar_with_goal(goal: str) -> str:
    """ALFWorld's grammar with the goal sentence put in, as `alfworld.agents.utils.misc.add_task_to_grammar` does."""
    return alfworld_paths()["grammar"].read_text().replace("UNKNOWN GOAL", goal)


def traj_data(spec: TaskSpec, task_id: str, seed: int) -> dict[str, Any]:
    """The `traj_data.json` fields ALFWorld's loader and templating read, plus our provenance."""
    return {
        "task_type": spec.task_type,
        "task_id": task_id,
        "pddl_params": {
            "object_target": spec.object_target,
            "parent_target": spec.parent_target,
            "toggle_target": spec.toggle_target,
            "mrecep_target": "",
            "object_sliced": False,
        },
        "scene": {"floor_plan": f"FloorPlan{spec.scene_num}", "scene_num": spec.scene_num, "random_seed": seed},
        "turk_annotations": {"anns": [{"task_desc": spec.goal}]},
        "craft_bench": {"generator_version": GENERATOR_VERSION, "seed": seed},
    }


# ---------------------------------------------------------------------------------------------- verification
class Planner:
    """Fast Downward, driven as TextWorld's PDDL engine drives it, to check that a game is solvable."""

    def __init__(self) -> None:
        import fast_downward

        self._lib = fast_downward.load_lib()
        self._logic: Any = None

    def plan(self, domain: str, grammar: str, problem: str) -> list[str] | None:
        """Operator names of a plan from the initial state; None when unsolvable; [] when already won."""
        import fast_downward
        from textworld.envs.pddl import logic as pddl_logic

        if self._logic is None:  # the domain and the grammar's actions are the same for every game
            self._logic = pddl_logic.GameLogic(domain=domain, grammar=grammar)
        state = pddl_logic.PddlState(self._lib, problem, self._logic)
        if state.check_goal():
            return []
        if not self._lib.replan(False):
            return None
        operators = (fast_downward.Operator * self._lib.get_last_plan_length())()
        self._lib.get_last_plan(operators)
        return [op.name for op in operators]


@lru_cache(maxsize=1)
def _planner() -> Planner:
    return Planner()


def generate_game(task_type: str, split: str, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (game.tw-pddl, traj_data.json) contents of one task; the first solvable candidate for its seed."""
    if task_type not in TASK_TYPES:
        raise ValueError(f"unknown task type {task_type!r}; valid: {list(TASK_TYPES)}")
    seed = task_seed(split, index)
    task_id = game_task_id(split, task_type, index)
    domain = alfworld_paths()["domain"].read_text()
    for attempt in range(MAX_ATTEMPTS):
        rng = np.random.default_rng(np.random.SeedSequence([seed, TASK_TYPES.index(task_type), attempt]))
        spec = sample_task(task_type, split, rng)
        if spec is None:
            continue
        grammar = grammar_with_goal(spec.goal)
        problem = problem_pddl(spec, name=f"craft_{split}_{task_type}_{index}")
        plan = _planner().plan(domain, grammar, problem)
        if not plan or len(plan) > MAX_PLAN_LENGTH:
            continue
        game = {"pddl_domain": domain, "grammar": grammar, "pddl_problem": problem, "solvable": True}
        traj = traj_data(spec, task_id, seed)
        traj["craft_bench"]["attempt"] = attempt
        traj["craft_bench"]["plan_length"] = len(plan)
        return game, traj
    raise RuntimeError(f"no solvable {task_type} game found for {split} index {index} in {MAX_ATTEMPTS} attempts")


def game_task_id(split: str, task_type: str, index: int) -> str:
    """The stable id of a generated task, e.g. `gen/train/pick_and_place_simple-000123`."""
    return f"gen/{split}/{task_type}-{index:06d}"


_TASK_ID = re.compile(r"^gen/(?P<split>[a-z_]+)/(?P<task_type>[a-z_]+)-(?P<index>\d{6})$")


def parse_task_id(task_id: str) -> tuple[str, str, int]:
    """`gen/train/pick_and_place_simple-000123` -> ("train", "pick_and_place_simple", 123)."""
    match = _TASK_ID.match(task_id)
    if not match:
        raise ValueError(f"not a generated ALFWorld task id: {task_id!r}")
    return match["split"], match["task_type"], int(match["index"])


def write_game(directory: Path, game: dict[str, Any], traj: dict[str, Any]) -> None:
    """Write a game as ALFWorld stores one: `game.tw-pddl` beside `traj_data.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "game.tw-pddl").write_text(json.dumps(game))
    (directory / "traj_data.json").write_text(json.dumps(traj, indent=1))


def cached_game(task_id: str) -> Path:
    """Directory holding `game.tw-pddl` and `traj_data.json` of a generated task, built on first use. The entry
    carries a manifest of its files' hashes, checked on load: a corrupt entry is regenerated (`cache.build_verified`)."""
    from craft_bench.envs.cache import build_verified, cache_dir

    split, task_type, index = parse_task_id(task_id)
    target = cache_dir("alfworld-gen", f"v{GENERATOR_VERSION}", split) / f"{task_type}-{index:06d}"

    def build(path: Path) -> None:
        write_game(path, *generate_game(task_type, split, index))

    return build_verified(target, build)


def split_fingerprint(split: str, task_types: tuple[str, ...], tasks_per_type: int) -> str:
    """The data hash of a generated split: games are a pure function of these, the generator and alfworld."""
    payload = json.dumps(
        {"generator": GENERATOR_VERSION, "alfworld": alfworld_version(), "split": split,
         "task_types": list(task_types), "tasks_per_type": tasks_per_type},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- official layout
#: Our split -> the official directory it plays the role of.
OFFICIAL_SPLIT_NAMES = {"train": "train", "valid": "valid_seen", "test": "valid_unseen"}


def write_official_layout(root: str | os.PathLike, tasks_per_type: int = 1,
                          task_types: tuple[str, ...] = TASK_TYPES) -> Path:
    """Write generated games in ALFWorld's data layout: `root/json_2.1.1/<split>/<task dir>/trial_*/`.

    Directory names follow ALFRED's `<task_type>-<object>-<mrecep>-<parent>-<scene>/trial_<id>` pattern, so
    `craft/ALFWorld-v0` (and ALFWorld's own loader) can read them with `$ALFWORLD_DATA=root`.
    """
    root = Path(root)
    for split, official in OFFICIAL_SPLIT_NAMES.items():
        for task_type in task_types:
            for index in range(tasks_per_type):
                game_dir = cached_game(game_task_id(split, task_type, index))
                traj = json.loads((game_dir / "traj_data.json").read_text())
                params = traj["pddl_params"]
                task_dir = "-".join([task_type, params["object_target"], params["mrecep_target"] or "None",
                                     params["parent_target"] or "None", str(traj["scene"]["scene_num"])])
                trial = root / "json_2.1.1" / official / task_dir / f"trial_G{traj['scene']['random_seed']:08d}"
                trial.mkdir(parents=True, exist_ok=True)
                for name in ("game.tw-pddl", "traj_data.json"):
                    (trial / name).write_bytes((game_dir / name).read_bytes())
    return root
