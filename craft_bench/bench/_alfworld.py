"""ALFWorld rows of `python -m craft_bench.bench envs`: ALFWorld's raw engine, one craft-bench env, and the cost of
privileged-plan steps with the cached plan versus a planner call on every step (run directly for just these rows).

All rows play the same generated games (`craft/ALFWorldGen-v0`, split `valid`, two tasks per type) with a seeded
policy and time steps only (resets are timed apart: they load and translate a PDDL problem, a different cost).
`--loads` times those loads instead: a game's first reset in a process and a sibling's reset after it, with and
without the SAS disk cache, the game-grammar fast path (`envs/sas_cache.py`, `alfworld_env.split_task_rule`), and
the reset's hand-off of its load's state with one PDDL parse per problem (`alfworld_env._handing_off_state_class`,
`sas_cache.parsed_task`). `--single-turn` times the group runner's resets and steps in `bench train`'s single-turn
shape.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np

ENV_ID = "craft/ALFWorldGen-v0"
ENV_KWARGS: dict[str, Any] = {"split": "valid", "tasks_per_type": 2, "max_steps": 50}
#: Probability that the "mostly on plan" policy takes the expert's next action (else a random admissible one).
ON_PLAN_PROB = 0.9


def _tasks() -> list[str]:
    from craft_bench.envs.alfworld_env import ALFWorldGenEnv

    return ALFWorldGenEnv(**ENV_KWARGS).task_ids


def _random_choice(options: list[str], rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))] if options else "look"


def raw_engine_steps(n_steps: int, seed: int = 0, memo: bool = True, deep_context_copy: bool = False,
                     deepcopy_symbols: bool = False) -> dict[str, float]:
    """ALFWorld's engine as ALFWorld builds it (PddlEnv + AlfredDemangler + AlfredInfos, same infos as the env),
    driven by the random policy; `memo` chooses whether TextWorld's parsers are memoised as in the env,
    `deep_context_copy` puts TextWorld's own `textgen.copy_context` back under the memos, and `deepcopy_symbols`
    `copy.deepcopy` in place of `alfworld_env.copy_symbols` (to time each of those changes alone)."""
    import copy

    from textworld.envs.pddl import textgen

    from craft_bench.envs import alfworld_env

    (alfworld_env.install_engine_memos if memo else alfworld_env.uninstall_engine_memos)()
    with contextlib.ExitStack() as stack:
        if memo and deep_context_copy:
            stack.enter_context(mock.patch.object(textgen, "copy_context", alfworld_env._STOCK["copy_context"]))
        if memo and deepcopy_symbols:
            stack.enter_context(mock.patch.object(textgen, "deepcopy", copy.deepcopy))
            stack.enter_context(mock.patch.object(alfworld_env, "copy_symbols", copy.deepcopy))
        return _play_raw_engine(n_steps, seed)


def _play_raw_engine(n_steps: int, seed: int) -> dict[str, float]:
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs.pddl import PddlEnv

    from craft_bench.envs import alfworld_gen

    infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
    env = AlfredInfos(AlfredDemangler()(PddlEnv(infos)))
    games = [str(alfworld_gen.cached_game(task) / "game.tw-pddl") for task in _tasks()]
    rng = np.random.default_rng(seed)
    out = dict.fromkeys(["steps", "seconds", "cpu_seconds"], 0.0)
    episode = 0
    while out["steps"] < n_steps:
        env.load(games[episode % len(games)])
        state = env.reset()
        for _ in range(ENV_KWARGS["max_steps"]):
            action = _random_choice(state["admissible_commands"], rng)
            start, cpu_start = time.perf_counter(), time.process_time()
            state, _, done = env.step(action)
            out["seconds"] += time.perf_counter() - start
            out["cpu_seconds"] += time.process_time() - cpu_start
            out["steps"] += 1
            if done or out["steps"] >= n_steps:
                break
        episode += 1
    return out


def env_steps(n_steps: int, policy: str, seed: int = 0, **env_kwargs: Any) -> dict[str, float]:
    """One craft-bench env under `policy` ("random" or "on_plan"): steps, their wall and CPU seconds, planner calls
    and planner seconds during those steps, resets and their seconds."""
    from craft_bench.envs.alfworld_env import (
        ALFWorldGenEnv,
        clear_plan_memo,
        install_engine_memos,
    )

    install_engine_memos()
    env = ALFWorldGenEnv(**ENV_KWARGS, **env_kwargs)
    tasks = env.task_ids
    for task in tasks:  # games are generated and cached outside the timing
        env.reset(options={"task_id": task})
    clear_plan_memo()  # the memo starts empty, as in a fresh process
    rng = np.random.default_rng(seed)
    choose: Callable[[dict[str, Any]], str]
    if policy == "random":
        choose = lambda info: _random_choice(info["admissible_actions"], rng)  # noqa: E731
    elif policy == "on_plan":
        choose = lambda info: (  # noqa: E731
            info["privileged"]["expert_plan"][0]
            if info["privileged"]["expert_plan"] and rng.random() < ON_PLAN_PROB
            else _random_choice(info["admissible_actions"], rng)
        )
    else:
        raise ValueError(f"unknown policy {policy!r}; valid: 'random', 'on_plan'")
    out = dict.fromkeys(
        ["steps", "seconds", "cpu_seconds", "planner_calls", "planner_seconds", "resets", "reset_seconds"], 0.0
    )
    episode = 0
    while out["steps"] < n_steps:
        start = time.perf_counter()
        _, info = env.reset(options={"task_id": tasks[episode % len(tasks)]})
        out["reset_seconds"] += time.perf_counter() - start
        out["resets"] += 1
        done = False
        while not done and out["steps"] < n_steps:
            action = choose(info)
            calls, planner_seconds = env.planner_calls, env.planner_seconds
            start, cpu_start = time.perf_counter(), time.process_time()
            _, _, terminated, truncated, info = env.step(action)
            out["seconds"] += time.perf_counter() - start
            out["cpu_seconds"] += time.process_time() - cpu_start
            out["planner_calls"] += env.planner_calls - calls
            out["planner_seconds"] += env.planner_seconds - planner_seconds
            out["steps"] += 1
            done = terminated or truncated
        episode += 1
    return out


def _row(setting: str, measured: dict[str, float], note: str) -> dict[str, Any]:
    steps, seconds, cpu = int(measured["steps"]), measured["seconds"], measured["cpu_seconds"]
    return {
        "env": ENV_ID, "setting": setting, "steps": steps, "seconds": round(seconds, 3),
        "steps_per_s": steps / seconds if seconds > 0 else float("nan"),
        "cpu_steps_per_s": steps / cpu if cpu > 0 else float("nan"),
        "note": f"{steps} steps in {seconds:.2f} s; {note}",
    }


def alfworld_rows(n_steps: int, num_workers: int) -> list[dict[str, Any]]:
    """The ALFWorld rows. `num_workers` is accepted for the harness's signature; group-runner rows are generic and
    measured by `craft_bench.bench.envs` for every env id. `one env` is the env as users get it (cached plan), under
    the raw engine's random policy, so the two play identical trajectories."""
    del num_workers
    rows = [
        _row("raw engine, textworld as shipped", raw_engine_steps(n_steps, memo=False), "random policy, no engine memos"),
        _row("raw engine, memos, TextWorld's deep context copies", raw_engine_steps(n_steps, deep_context_copy=True),
             "random policy, engine memos on but textgen.copy_context as shipped"),
        _row("raw engine, memos, deepcopy for symbols", raw_engine_steps(n_steps, deepcopy_symbols=True),
             "random policy, engine memos on but symbols copied by copy.deepcopy, as shipped"),
        _row("raw engine", raw_engine_steps(n_steps, memo=True), "random policy, engine memos on as in the env"),
    ]
    for policy in ("random", "on_plan"):
        for replan, label in ((False, "cached plan"), (True, "replan every step")):
            m = env_steps(n_steps, policy, replan_every_step=replan)
            setting = "one env" if (policy, replan) == ("random", False) else f"privileged, {label}, {policy} policy"
            row = _row(setting, m, f"{m['planner_calls']:.0f} planner calls, planner "
                                   f"{1000 * m['planner_seconds'] / m['steps']:.2f} ms/step, "
                                   f"reset {1000 * m['reset_seconds'] / m['resets']:.0f} ms")
            row["planner_ms_per_step"] = 1000 * m["planner_seconds"] / m["steps"]
            rows.append(row)
    return rows


#: (label, SAS disk cache on, game grammar parsed once with a stand-in goal, a reset taking over its load's state and
#: one PDDL parse per problem on disk-cache hits) of each `--loads` row.
LOAD_SETTINGS = (
    ("as before: translate, parse the whole grammar", False, False, False),
    ("grammar fast path only", False, True, False),
    ("SAS disk cache (warm) only", True, False, False),
    ("both", True, True, False),
    ("both + state hand-off + one parse (the env as shipped)", True, True, True),
)


def reset_seconds(task_ids: list[str], sas_disk_cache: bool, grammar_fast_path: bool,
                  reuse: bool) -> tuple[list[float], list[float]]:
    """Seconds of each task's first reset in this process (fresh engine memos, so nothing is remembered in memory;
    the disk cache, when on, holds every task's translations already), and of a sibling's reset right after it (a
    second env of the same process resetting the same game, as GRPO's group members do in one worker)."""
    import gymnasium as gym
    import textworld.envs.pddl.logic as pddl_logic

    from craft_bench.envs import alfworld_env, sas_cache

    alfworld_env.uninstall_engine_memos()
    alfworld_env.install_engine_memos()
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.dict(os.environ, {sas_cache.SAS_CACHE_VARIABLE: "1" if sas_disk_cache else "0"}))
        if not grammar_fast_path:  # the memo then parses each game's grammar whole
            stack.enter_context(mock.patch.object(alfworld_env, "split_task_rule", lambda text: None))
        if not reuse:  # TextWorld's own class: the reset builds the state again instead of taking the offered one
            stack.enter_context(mock.patch.object(pddl_logic, "PddlState", alfworld_env._STOCK["pddl_state"]))
            stack.enter_context(mock.patch.object(sas_cache, "parsed_task", sas_cache.parse_task))
        env, sibling = (stack.enter_context(contextlib.closing(gym.make(ENV_ID, **ENV_KWARGS))) for _ in range(2))
        first, second = [], []
        for task in task_ids:
            for which, seconds in ((env, first), (sibling, second)):
                tick = time.perf_counter()
                which.reset(seed=0, options={"task_id": task})
                seconds.append(time.perf_counter() - tick)
        return first, second


def hit_against_translation_rows(task_ids: list[str]) -> list[str]:
    """A markdown table: what a disk-cache hit does instead of translating (`sas_cache.parse_task`) against Fast
    Downward's translation itself, per optimize flag, median and range over the tasks' problems (the first is a
    warm-up)."""
    import json

    from fast_downward.interface import pddl2sas

    from craft_bench.envs import alfworld_gen, sas_cache

    games = [json.loads((alfworld_gen.cached_game(task) / "game.tw-pddl").read_text()) for task in task_ids]
    lines = ["| per problem | optimize | median ms | range ms |", "|---|---|---|---|"]
    for label, run in (("a disk-cache hit: parse the PDDL into the task", lambda d, p, o: sas_cache.parse_task(d, p)),
                       ("Fast Downward's translation (pddl2sas)", lambda d, p, o: pddl2sas(d, p, optimize=o))):
        for optimize in (False, True):
            seconds = []
            for game in games:
                tick = time.perf_counter()
                run(game["pddl_domain"], game["pddl_problem"], optimize)
                seconds.append(time.perf_counter() - tick)
            timed = seconds[1:] or seconds
            lines.append(f"| {label} | {optimize} | {1000 * statistics.median(timed):.1f} | "
                         f"{1000 * min(timed):.1f}-{1000 * max(timed):.1f} |")
    return lines


def load_rows(repeats: int, n_tasks: int | None = None) -> list[str]:
    """A markdown table: median first reset of the `valid` tasks (the first `n_tasks`, default all) and of a sibling
    right after, per setting, the settings interleaved per repeat."""
    from craft_bench.envs import alfworld_gen

    tasks = _tasks()[:n_tasks]
    for task in tasks:
        alfworld_gen.cached_game(task)  # generated (or checked) before anything is timed
    # Untimed: imports, TextWorld's grammar templates, and the disk cache filled for the "warm" rows.
    reset_seconds(tasks, True, True, True)
    first: dict[str, list[float]] = {label: [] for label, *_ in LOAD_SETTINGS}
    sibling: dict[str, list[float]] = {label: [] for label, *_ in LOAD_SETTINGS}
    for _ in range(repeats):
        for label, *setting in LOAD_SETTINGS:
            timed = reset_seconds(tasks, *setting)
            first[label] += timed[0]
            sibling[label] += timed[1]
    before = (statistics.median(first[LOAD_SETTINGS[0][0]]), statistics.median(sibling[LOAD_SETTINGS[0][0]]))
    lines = [f"a game's first reset in a process, then a sibling's reset of it ({len(tasks)} tasks of {ENV_ID} "
             f"{ENV_KWARGS['split']}, {repeats} repeat(s), settings interleaved):", "",
             "| setting | first reset median ms | mean ms | speed-up | sibling reset median ms | speed-up |",
             "|---|---|---|---|---|---|"]
    for label, *_ in LOAD_SETTINGS:
        median, sibling_median = statistics.median(first[label]), statistics.median(sibling[label])
        lines.append(f"| {label} | {1000 * median:.0f} | {1000 * statistics.mean(first[label]):.0f} | "
                     f"{before[0] / median:.2f}x | {1000 * sibling_median:.1f} | {before[1] / sibling_median:.2f}x |")
    return lines


def single_turn_rows(rounds: int, workers: int, on_plan: float = 0.3, seed: int = 0) -> list[str]:
    """A markdown table: the env work of single-turn GRPO steps on the group runner (`bench train`'s TRL comparison
    shape: 4 `train` tasks x 4 siblings reset, then one step each), medians over `rounds` rounds after 2 warm-up
    rounds. A share `on_plan` of the actions is the expert's next action, the rest a random admissible one. The
    games are generated before the timing, so resets are timed with the game cache warm (their translations are
    on disk only if an earlier run loaded them)."""
    import random

    import gymnasium as gym

    from craft_bench.envs import alfworld_gen
    from craft_bench.envs.group_runner import GroupRunner

    with contextlib.closing(gym.make(ENV_ID, split="train")) as env:
        ids = env.unwrapped.task_ids
    rng = random.Random(seed)
    tasks = [rng.sample(ids, 4) for _ in range(rounds + 2)]
    for task in {task for round_tasks in tasks for task in round_tasks}:
        alfworld_gen.cached_game(task)  # generated (or checked) before anything is timed
    runner = GroupRunner(ENV_ID, {"split": "train", "max_steps": 1}, num_workers=workers)
    resets, steps = [], []
    try:
        for round_, round_tasks in enumerate(tasks):
            tick = time.perf_counter()
            _, infos = runner.reset(round_tasks, 4, seed=round_)
            resets.append(time.perf_counter() - tick)
            actions = [(info["privileged"]["expert_plan"] or ["look"])[0] if rng.random() < on_plan
                       else rng.choice(info["admissible_actions"]) for info in infos]
            tick = time.perf_counter()
            runner.step(actions)
            steps.append(time.perf_counter() - tick)
    finally:
        runner.close()
    return [f"single-turn env work on the group runner ({workers} worker(s), 4 tasks x 4 siblings, {rounds} rounds "
            f"after 2 warm-up rounds, {on_plan:.0%} of actions the expert's):", "",
            "| call | median ms | range ms |", "|---|---|---|",
            *(f"| {label} | {1000 * statistics.median(seconds[2:]):.0f} | "
              f"{1000 * min(seconds[2:]):.0f}-{1000 * max(seconds[2:]):.0f} |"
              for label, seconds in (("reset of 16 slots", resets), ("one step of 16 slots", steps)))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench._alfworld", description=__doc__)
    parser.add_argument("--steps", type=int, default=500, help="environment steps per measurement")
    parser.add_argument("--loads", action="store_true",
                        help="time games' first and sibling resets (each load speed-up on and off) instead of steps")
    parser.add_argument("--single-turn", action="store_true",
                        help="time the group runner's resets and steps of single-turn GRPO steps instead of steps")
    parser.add_argument("--workers", type=int, default=2, help="--single-turn: env worker processes")
    parser.add_argument("--rounds", type=int, default=10, help="--single-turn: timed rounds")
    parser.add_argument("--repeats", type=int, default=2, help="--loads: passes over the tasks per setting")
    parser.add_argument("--tasks", type=int, default=None, help="--loads: only the first N tasks (default: all 12)")
    args = parser.parse_args(argv)
    if args.loads:
        print("\n".join(load_rows(args.repeats, args.tasks)))
        print()
        print("\n".join(hit_against_translation_rows(_tasks()[:args.tasks])))
        return
    if args.single_turn:
        print("\n".join(single_turn_rows(args.rounds, args.workers)))
        return
    rows = alfworld_rows(args.steps, 1)
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting'.ljust(width)}  steps/s  CPU est.  note")
    for r in rows:
        print(f"{r['setting'].ljust(width)}  {r['steps_per_s']:7.1f}  {r['cpu_steps_per_s']:8.1f}  {r['note']}")


if __name__ == "__main__":
    main()
