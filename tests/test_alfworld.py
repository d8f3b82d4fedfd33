"""Tests of craft/ALFWorldGen-v0 and craft/ALFWorld-v0: expert plans win, the contract holds, caches are exact,
and the official-data loader works on a generated directory in ALFWorld's own layout."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import craft_bench  # noqa: F401  (registers the ids)
from craft_bench.envs import alfworld_gen, sas_cache
from craft_bench.envs.alfworld_env import ALFWorldEnv, ALFWorldGenEnv, clear_plan_memo, normalize_put, strip_intro

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module", autouse=True)
def cache_home(tmp_path_factory: pytest.TempPathFactory):
    """Generated games go to a private cache, so tests never depend on what an earlier run left behind."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CRAFT_BENCH_HOME", str(tmp_path_factory.mktemp("craft_home")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def official_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return alfworld_gen.write_official_layout(tmp_path_factory.mktemp("alfworld_data"), tasks_per_type=1)


def play_expert(env: gym.Env, **reset_kwargs) -> tuple[dict, list[float], int]:
    obs, info = env.reset(**reset_kwargs)
    rewards, steps, done = [], 0, False
    while not done:
        obs, reward, terminated, truncated, info = env.step(info["privileged"]["expert_plan"][0])
        rewards.append(reward)
        steps += 1
        done = terminated or truncated
    return info, rewards, steps


@pytest.mark.parametrize("task_type", alfworld_gen.TASK_TYPES)
def test_following_the_expert_plan_wins_every_task_type(task_type: str) -> None:
    env = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1, max_steps=60)
    info, rewards, steps = play_expert(env, options={"task_id": f"gen/valid/{task_type}-000000"})
    assert info["won"] and info["task_type"] == task_type
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0
    assert info["progress"] == 1.0 and info["privileged"]["expert_plan"] == []
    assert steps == json.loads(
        (alfworld_gen.cached_game(f"gen/valid/{task_type}-000000") / "traj_data.json").read_text()
    )["craft_bench"]["plan_length"]


def test_check_env_passes_on_generated_id() -> None:
    check_env(gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1).unwrapped)


def test_check_env_passes_on_official_id(official_root: Path) -> None:
    check_env(gym.make("craft/ALFWorld-v0", split="valid_seen", data_path=official_root).unwrapped)


def test_same_seed_same_episode() -> None:
    a = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=2)
    b = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=2)
    obs_a, info_a = a.reset(seed=3)
    obs_b, info_b = b.reset(seed=3)
    assert (obs_a, info_a) == (obs_b, info_b)
    action = info_a["admissible_actions"][0]
    assert a.step(action) == b.step(action)


def test_generator_is_deterministic_and_splits_disjoint() -> None:
    assert alfworld_gen.generate_game("pick_heat_then_place_in_recep", "train", 7) == \
        alfworld_gen.generate_game("pick_heat_then_place_in_recep", "train", 7)
    seeds = {split: {alfworld_gen.task_seed(split, i) for i in (0, 999_999)} for split in alfworld_gen.SPLITS}
    assert not seeds["train"] & seeds["valid"] and not seeds["train"] & seeds["test"]
    assert not set(alfworld_gen.split_scenes("train")) & set(alfworld_gen.split_scenes("test"))
    traj = json.loads((alfworld_gen.cached_game("gen/test/pick_and_place_simple-000000") / "traj_data.json").read_text())
    assert traj["scene"]["scene_num"] in alfworld_gen.split_scenes("test")


def test_generated_names_are_demangled_and_observation_has_no_banner_or_goal() -> None:
    env = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1)
    obs, info = env.reset(options={"task_id": "gen/valid/pick_clean_then_place_in_recep-000000"})
    assert "Welcome" not in obs and "Your task" not in obs and "_bar_" not in obs
    assert "sinkbasin 1" in obs
    assert info["goal"] and info["goal"] not in obs
    assert info["data_source"] == "generated" and info["alfworld_version"] == alfworld_gen.alfworld_version()
    assert len(info["data_sha256"]) == 64 and info["gamefile"].endswith("game.tw-pddl")
    assert "Strategy:" in info["privileged"]["text"] and info["privileged"]["next_action"]


def test_invalid_action_changes_nothing_and_counts_as_a_step() -> None:
    env = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1)
    _, info = env.reset(seed=0)
    obs, reward, terminated, truncated, after = env.step("fly to the moon")
    assert obs == "Nothing happens." and reward == 0.0 and not terminated and not truncated
    assert not after["action_valid"] and after["step"] == 1
    assert after["admissible_actions"] == info["admissible_actions"]
    assert after["privileged"]["expert_plan"] == info["privileged"]["expert_plan"]
    with pytest.raises(TypeError):
        env.step(3)


def test_old_put_syntax_maps_to_move() -> None:
    assert normalize_put("put apple 1 in fridge 1") == "move apple 1 to fridge 1"
    assert normalize_put("put apple 1 on countertop 1") == "move apple 1 to countertop 1"
    assert normalize_put("go to fridge 1") == "go to fridge 1"
    env = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1)
    _, info = env.reset(options={"task_id": "gen/valid/pick_and_place_simple-000000"})
    plan = info["privileged"]["expert_plan"]
    for action in plan[:-1]:
        env.step(action)
    last = plan[-1].replace("move ", "Put ", 1).replace(" to ", " in ", 1)
    _, reward, terminated, _, info = env.step(last)
    assert info["action_valid"] and info["won"] and reward == 1.0 and terminated


def test_cached_plan_equals_a_fresh_planner_call() -> None:
    clear_plan_memo()  # plans other tests remembered in this process would hide the replan counted below
    env = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1).unwrapped
    _, info = env.reset(options={"task_id": "gen/valid/pick_two_obj_and_place-000000"})
    calls = env.planner_calls
    # A detour (an action off the plan) invalidates the cache; looking around does not.
    detour = next(a for a in info["admissible_actions"]
                  if a.startswith("go to ") and a != info["privileged"]["expert_plan"][0])
    checks = 0
    for action in ["look", detour] + [None] * 40:
        plan = info["privileged"]["expert_plan"]
        assert plan == env.fresh_plan()
        checks += 1
        if not plan:
            break
        _, _, terminated, _, info = env.step(action or plan[0])
    assert info["won"]
    assert env.planner_calls == calls + checks + 1  # the env itself replanned once, after the detour


def test_plans_are_remembered_per_state() -> None:
    env = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1).unwrapped
    task = {"task_id": "gen/valid/look_at_obj_in_light-000000"}
    _, first = env.reset(options=task)
    calls = env.planner_calls
    _, again = env.reset(options=task)
    assert env.planner_calls == calls  # the initial state's plan came from the memo
    assert again["privileged"]["expert_plan"] == first["privileged"]["expert_plan"] == env.fresh_plan()


def test_siblings_share_remembered_plans_and_each_plan_is_fresh() -> None:
    # GRPO siblings live in one worker process: a state one sibling planned costs the next one no planner call, and
    # every plan it gets is the one a planner call from its own state gives.
    clear_plan_memo()
    task = {"task_id": "gen/valid/pick_clean_then_place_in_recep-000000"}
    first, second = (gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1).unwrapped for _ in range(2))
    _, info = first.reset(options=task)
    detour = next(a for a in info["admissible_actions"]
                  if a.startswith("go to ") and a != info["privileged"]["expert_plan"][0])
    own_calls = []
    for env in (first, second):
        calls = env.planner_calls
        _, info = env.reset(options=task)
        checks = 0
        for action in [detour] + [None] * 40:
            if not info["privileged"]["expert_plan"]:
                break
            _, _, _, _, info = env.step(action or info["privileged"]["expert_plan"][0])
            assert info["privileged"]["expert_plan"] == env.fresh_plan()
            checks += 1
        assert info["won"]
        own_calls.append(env.planner_calls - calls - checks)
    # The first sibling planned the state after the detour (its start was planned by the reset that chose the
    # detour); the second planned nothing.
    assert own_calls == [1, 0]
    # Another game's plan is never served for this one, even at a state with the same facts.
    other = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1).unwrapped
    _, info = other.reset(options={"task_id": "gen/valid/pick_and_place_simple-000000"})
    assert info["privileged"]["expert_plan"] == other.fresh_plan()


def test_replan_every_step_gives_the_same_plans() -> None:
    cached = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1)
    replan = gym.make("craft/ALFWorldGen-v0", split="valid", tasks_per_type=1, replan_every_step=True)
    task = {"task_id": "gen/valid/pick_cool_then_place_in_recep-000000"}
    assert play_expert(cached, options=task) == play_expert(replan, options=task)
    assert replan.unwrapped.planner_calls > cached.unwrapped.planner_calls


def test_official_layout_plays_to_a_win(official_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALFWORLD_DATA", str(official_root))
    env = gym.make("craft/ALFWorld-v0", split="valid_unseen")
    ids = env.unwrapped.task_ids
    assert len(ids) == len(alfworld_gen.TASK_TYPES)
    assert all(i.startswith("valid_unseen/") and "/trial_" in i for i in ids)
    info, rewards, _ = play_expert(env, options={"task_id": ids[0]})
    assert info["won"] and rewards[-1] == 1.0
    assert info["data_source"] == "official" and len(info["data_sha256"]) == 64
    assert info["alfworld_version"] == alfworld_gen.alfworld_version()


def test_official_loader_skips_what_alfworld_skips(official_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(official_root, root)
    split = root / "json_2.1.1" / "valid_seen"
    first = sorted(split.iterdir())[0]
    shutil.copytree(first, split / "pick_and_place_with_movable_recep-Apple-Bowl-Fridge-1")
    shutil.copytree(first, split / "pick_heat_then_place_in_recep-AppleSliced-None-Fridge-1")
    unsolvable = next(split.glob("pick_two_obj_and_place-*"))
    game = next(unsolvable.rglob("game.tw-pddl"))
    game.write_text(json.dumps({**json.loads(game.read_text()), "solvable": False}))
    env = ALFWorldEnv(split="valid_seen", data_path=root)
    assert len(env.task_ids) == len(alfworld_gen.TASK_TYPES) - 1
    assert not any("movable" in i or "Sliced" in i for i in env.task_ids)
    untouched = ALFWorldEnv(split="valid_seen", data_path=official_root)
    assert env.data_sha256 != untouched.data_sha256


def test_missing_official_data_names_the_way_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    for make in (lambda: gym.make("craft/ALFWorld-v0"), lambda: ALFWorldEnv(data_path=tmp_path / "nowhere")):
        with pytest.raises(FileNotFoundError) as error:
            make()
        for hint in ("alfworld-download", "$ALFWORLD_DATA", "craft/ALFWorldGen-v0"):
            assert hint in str(error.value)


def test_a_split_with_zero_games_is_an_error(official_root: Path, tmp_path: Path) -> None:
    (tmp_path / "json_2.1.1" / "valid_seen").mkdir(parents=True)
    with pytest.raises(RuntimeError, match="zero playable games"):
        ALFWorldEnv(split="valid_seen", data_path=tmp_path)
    with pytest.raises(FileNotFoundError, match="valid_unseen"):
        ALFWorldEnv(split="valid_unseen", data_path=tmp_path)


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        ALFWorldGenEnv(split="valid_seen")
    with pytest.raises(ValueError, match="task types"):
        ALFWorldGenEnv(split="train", task_types=("pick_and_place_with_movable_recep",))
    with pytest.raises(ValueError, match="tasks_per_type"):
        ALFWorldGenEnv(split="train", tasks_per_type=0)
    with pytest.raises(ValueError, match="not a generated"):
        alfworld_gen.parse_task_id("valid_seen/whatever")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_types": "pick_and_place_sim"}, r"task_types: unknown task types \['pick_and_place_sim'\]"),
        ({"task_types": 3}, "task_types must be a task type name or a sequence of them"),
        ({"max_steps": "10"}, "max_steps must be an int >= 1, got str"),
        ({"max_steps": 2.5}, "max_steps must be an int >= 1, got float"),
        ({"max_steps": 0}, "max_steps must be an int >= 1"),
        ({"tasks_per_type": "3"}, "tasks_per_type must be an int, got str"),
    ],
)
def test_badly_typed_arguments_name_the_argument(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ALFWorldGenEnv(split="train", **kwargs)


def test_one_task_type_name_is_accepted_as_a_one_type_tuple() -> None:
    assert ALFWorldGenEnv(split="train", task_types="pick_and_place_simple").task_types == ("pick_and_place_simple",)


@pytest.mark.parametrize("index", ["3", 1.5, None, True])
def test_a_task_index_that_is_not_an_int_is_an_error_naming_it(index) -> None:
    env = ALFWorldGenEnv(split="valid", tasks_per_type=1)
    with pytest.raises(ValueError, match="task_index must be an int"):
        env.reset(options={"task_index": index})


def test_task_list_is_cheap_and_lazy() -> None:
    env = ALFWorldGenEnv(split="train", tasks_per_type=5000)
    assert len(env.task_ids) == 6 * 5000 and env.task_ids == sorted(env.task_ids)
    assert env._engine is None  # nothing generated or loaded until a reset


def test_strip_intro_removes_banner_and_task() -> None:
    intro = "-= Welcome to TextWorld, ALFRED! =-\n\nYou are in the middle of a room.\n\nYour task is to: put a x in y."
    assert strip_intro(intro) == "You are in the middle of a room."


@pytest.mark.parametrize(
    "task_type",
    [
        "pick_heat_then_place_in_recep",
        "pick_and_place_simple",
        "look_at_obj_in_light",
        "pick_clean_then_place_in_recep",
        "pick_cool_then_place_in_recep",
        "pick_two_obj_and_place",
    ],
)
def test_engine_memos_change_no_output(task_type: str) -> None:
    # Every task type's grammar derives its own texts (lights, sinks, fridges, two objects): the memos and the
    # shallow context copy must leave each of them as TextWorld writes it.
    import textworld
    from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
    from textworld.envs.pddl import PddlEnv

    from craft_bench.envs.alfworld_env import _AlfredEngine, install_engine_memos, uninstall_engine_memos

    game = str(alfworld_gen.cached_game(f"gen/valid/{task_type}-000000") / "game.tw-pddl")

    def play(engine: bool = True) -> list[tuple[int, str, tuple[str, ...]]]:
        # Two siblings of one game, stepped alternately with their own random actions: with the memos they share
        # the game's parsed grammar (and translation), which must change neither one's episode. `engine`: load
        # through craft-bench's _AlfredEngine, whose reset takes over the state its load built.
        if engine:
            engines = [_AlfredEngine() for _ in range(2)]
            envs = [e.env for e in engines]
        else:
            envs = [AlfredInfos(AlfredDemangler()(PddlEnv(textworld.EnvInfos(won=True, admissible_commands=True))))
                    for _ in range(2)]
        states, rngs, seen = [], [np.random.default_rng(k) for k in range(2)], []
        for k, env in enumerate(envs):
            if engine:
                engines[k].load(game)
                states.append(engines[k].state)
            else:
                env.load(game)
                states.append(env.reset())
            seen.append((k, states[k]["feedback"], tuple(states[k]["admissible_commands"])))  # the intro: the goal
        for _ in range(12):
            for k, env in enumerate(envs):
                commands = states[k]["admissible_commands"]
                states[k], _, _ = env.step(commands[int(rngs[k].integers(len(commands)))])
                seen.append((k, states[k]["feedback"], tuple(states[k]["admissible_commands"])))
        return seen

    uninstall_engine_memos()
    try:
        stock = play(engine=False)
    finally:
        install_engine_memos()
    assert play() == stock
    assert play(engine=False) == stock  # the memos without the engine's hand-off of the loaded state
    # Fresh in-process memos (a new worker process): the translations now come from the disk cache, with the
    # task object parsed again instead of translated, and the episodes are still TextWorld's.
    uninstall_engine_memos()
    translations = count_translations()
    try:
        install_engine_memos()
        assert play() == stock
        assert translations == []
    finally:
        uninstall_engine_memos()
        import fast_downward

        fast_downward.pddl2sas = translations.stock  # type: ignore[attr-defined]
        install_engine_memos()
    # ...and the memo is what the siblings used: their parsed grammars are one object, parsed once.
    first, second = PddlEnv(textworld.EnvInfos()), PddlEnv(textworld.EnvInfos())
    first.load(game)
    second.load(game)
    assert first._logic.actions and all(
        first._logic.actions[name] is action for name, action in second._logic.actions.items()
    )


def test_a_reset_takes_over_only_the_state_its_own_load_built(monkeypatch: pytest.MonkeyPatch) -> None:
    # TextWorld's load builds a PddlState and its reset builds the same one again; _AlfredEngine.load hands the
    # first to the second. Only there: the offer is used once, by a state of the same game, on the same thread.
    import textworld.envs.pddl.logic as pddl_logic

    from craft_bench.envs.alfworld_env import _FRESH_STATE, _STOCK, _AlfredEngine

    engine = _AlfredEngine()
    game = str(alfworld_gen.cached_game("gen/valid/pick_and_place_simple-000000") / "game.tw-pddl")  # built first:
    stock_class = _STOCK["pddl_state"]  # generating a game builds states of its own
    stock_init = stock_class.__init__
    built: list[str] = []

    def counted(self: Any, *args: Any) -> None:
        built.append(args[1])
        stock_init(self, *args)

    monkeypatch.setattr(stock_class, "__init__", counted)
    engine.load(game)
    assert len(built) == 1  # TextWorld as shipped builds two
    assert getattr(_FRESH_STATE, "state", None) is None  # nothing stays on offer after the load
    pddl_env = engine.env.unwrapped
    assert type(pddl_env._pddl_state) is stock_class  # states stay TextWorld's own (copied and pickled as before)
    args = (pddl_env.downward_lib, pddl_env._game_data["pddl_problem"], pddl_env._logic)
    offered = pddl_env._pddl_state
    _FRESH_STATE.state = offered
    try:
        elsewhere: list[Any] = []
        thread = threading.Thread(target=lambda: elsewhere.append(pddl_logic.PddlState(*args)))
        thread.start()
        thread.join()
        assert elsewhere[0] is not offered  # another thread builds its own
        assert pddl_logic.PddlState(args[0], args[1] + "\n", args[2]) is not offered  # another problem: built
        assert pddl_logic.PddlState(*args) is offered  # this thread, this game: taken over, once
        assert pddl_logic.PddlState(*args) is not offered
    finally:
        _FRESH_STATE.state = None
    assert len(built) == 4

    def failing_reset() -> Any:
        raise RuntimeError("reset failed")

    monkeypatch.setattr(engine.env, "reset", failing_reset)
    with pytest.raises(RuntimeError, match="reset failed"):
        engine.load(game)
    assert getattr(_FRESH_STATE, "state", None) is None  # a failed reset leaves nothing on offer


def test_the_plain_and_optimized_hits_of_one_problem_share_one_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    from fast_downward.interface import pddl2sas

    game = json.loads((alfworld_gen.cached_game("gen/valid/pick_cool_then_place_in_recep-000000") / "game.tw-pddl")
                      .read_text())
    domain, problem = game["pddl_domain"], game["pddl_problem"]
    for optimize in (False, True):
        sas_cache.translate(pddl2sas, domain, problem, optimize=optimize)  # both entries on disk
    parses: list[str] = []
    stock_parse = sas_cache.parse_task
    monkeypatch.setattr(sas_cache, "parse_task", lambda d, p: parses.append(p) or stock_parse(d, p))
    sas_cache.parsed_task.cache_clear()
    plain = sas_cache.translate(pddl2sas, domain, problem)
    optimized = sas_cache.translate(pddl2sas, domain, problem, optimize=True)
    assert parses == [problem]
    assert plain[0] is optimized[0]
    assert plain[1] != optimized[1]
    assert dumped(plain[0]) == dumped(pddl2sas(domain, problem, optimize=True)[0])


def test_copy_symbols_is_a_deep_copy_of_parsed_symbols() -> None:
    # TextWorld copies a rule's symbols before deriving them into it: the specialised copy must give what deepcopy
    # gives, share no list or symbol with the original, and leave anything it was not written for to deepcopy.
    import copy

    from textworld.envs.pddl.textgen import EvalSymbol, ListSymbol, Symbol

    from craft_bench.envs.alfworld_env import _STOCK, copy_symbols, install_engine_memos

    install_engine_memos()
    text = (alfworld_gen.cached_game("gen/valid/pick_two_obj_and_place-000000") / "game.tw-pddl").read_text()
    actions, grammar = _STOCK["game_grammar"](json.loads(text)["grammar"], rule_name="pddlStart")
    rhs = [rule.rhs for rules in grammar._rules.values() for rule in rules]
    # ...and what derivation parses: the actions' command templates and feedback rules, and the intro.
    rhs += [_STOCK["template"](start, rule_name="symbols") for action in actions.values()
            for start in (action.template, action.feedback_rule)] + [_STOCK["template"]("#intro#", rule_name="symbols")]
    assert len(rhs) > 50 and any(isinstance(p, ListSymbol) for symbols in rhs for p in symbols)

    def parts(value: Any) -> list[Any]:
        if isinstance(value, list):
            return [value, *(p for item in value for p in parts(item))]
        if isinstance(value, Symbol):
            return [value, value.context, *(p for field in vars(value).values() for p in parts(field))]
        return []

    for symbols in rhs:
        copied = copy_symbols(symbols)
        assert repr(copied) == repr(copy.deepcopy(symbols))
        assert [type(p) for p in parts(copied)] == [type(p) for p in parts(symbols)]
        assert not {id(p) for p in parts(copied)} & {id(p) for p in parts(symbols)}
    with_context = EvalSymbol("o.name", {"variables": {"o": "apple"}})
    copied = copy_symbols([with_context])[0]
    assert copied.context == with_context.context and copied.context["variables"] is not with_context.context["variables"]


def parsed_grammar(parsed: tuple[dict[str, Any], Any]) -> tuple[list[tuple[str, ...]], dict[str, str]]:
    """A parsed game grammar as comparable text: its actions' fields and every rule of every symbol."""
    actions, grammar = parsed
    return ([(name, a.name, a.template, a.pddl, a.grammar, a.feedback_rule) for name, a in actions.items()],
            {symbol: repr(rules) for symbol, rules in grammar._rules.items()})


def test_a_game_grammar_parsed_with_a_stand_in_goal_is_the_game_grammar() -> None:
    # The memo parses ALFWorld's grammar once and swaps each game's goal rule in: the result must be TextWorld's own
    # parse of the game's grammar, for goals of every task type, including ones that need JSON escapes.
    from craft_bench.envs.alfworld_env import (
        _STOCK,
        STAND_IN_TASK_LITERAL,
        install_engine_memos,
        split_task_rule,
        with_task_rule,
    )

    install_engine_memos()
    stock_parse = _STOCK["game_grammar"]
    grammars = [json.loads((alfworld_gen.cached_game(f"gen/valid/{task_type}-00000{i}") / "game.tw-pddl")
                           .read_text())["grammar"] for task_type in alfworld_gen.TASK_TYPES for i in range(2)]
    template = alfworld_gen.grammar_with_goal("UNKNOWN GOAL")
    grammars += [template.replace("UNKNOWN GOAL", goal) for goal in
                 ("put a \\\"clean\\\" mug in sink", "ünïcode goal \\u00e9", "#look.feedback# {r.name}")]
    for text in grammars:
        split = split_task_rule(text)
        assert split is not None and STAND_IN_TASK_LITERAL in split[0]
        actions, grammar = stock_parse(split[0], rule_name="pddlStart")
        assert parsed_grammar((actions, with_task_rule(grammar, split[1]))) == \
            parsed_grammar(stock_parse(text, rule_name="pddlStart"))
    # A grammar that names "task" twice, or writes the rule otherwise, is parsed whole.
    assert split_task_rule(template.replace('"notImplemented"', '"task"')) is None
    assert split_task_rule(template.replace('"rhs": "Your task', '"weight": 2, "rhs": "Your task')) is None


class _Calls(list):
    stock: Any


def count_translations() -> _Calls:
    """Replace fast_downward.pddl2sas (memos uninstalled) by a wrapper that records each call's problem."""
    import fast_downward

    calls = _Calls()
    calls.stock = stock = fast_downward.pddl2sas

    def counted(domain: str, problem: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(problem)
        return stock(domain, problem, *args, **kwargs)

    fast_downward.pddl2sas = counted
    return calls


def counted_translation() -> tuple[list[int], Any]:
    """(calls, a `stock_translate` for sas_cache.translate that appends to `calls` and runs Fast Downward's own)."""
    from fast_downward.interface import pddl2sas

    calls: list[int] = []

    def stock(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return pddl2sas(*args, **kwargs)

    return calls, stock


def dumped(task: Any) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        task.dump()
    return out.getvalue()


@pytest.mark.parametrize("optimize", [False, True])
def test_a_disk_cache_hit_returns_what_fast_downward_translates(optimize: bool) -> None:
    from fast_downward.interface import pddl2sas

    game = json.loads((alfworld_gen.cached_game("gen/valid/pick_two_obj_and_place-000000") / "game.tw-pddl")
                      .read_text())
    domain, problem = game["pddl_domain"], game["pddl_problem"]
    stock_task, stock_sas = pddl2sas(domain, problem, optimize=optimize)
    calls = []

    def stock(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs["optimize"])
        return pddl2sas(*args, **kwargs)

    key = sas_cache.entry_key(domain, problem, optimize)
    sas_cache.entry_path(key).unlink(missing_ok=True)
    missed = sas_cache.translate(stock, domain, problem, optimize=optimize)  # translates and writes the entry
    hit = sas_cache.translate(stock, domain, problem, optimize=optimize)  # reads it
    assert calls == [optimize]
    assert sas_cache.entry_path(key).is_file()
    assert missed[1] == hit[1] == stock_sas
    assert dumped(hit[0]) == dumped(stock_task)  # the task object TextWorld reads actions, types and facts from
    assert sas_cache.entry_key(domain, problem, not optimize) != key


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data[: len(data) // 2],  # truncated (a crash mid-write by something other than us)
        lambda data: data[:-9] + bytes([data[-9] ^ 1]) + data[-8:],  # a flipped bit: gzip's CRC fails
        lambda data: gzip.compress(gzip.decompress(data).replace(b"begin_variable", b"begin_variablf", 1)),
        lambda data: b"",
    ],
    ids=["truncated", "bit-flip", "edited-under-a-valid-gzip", "empty"],
)
def test_a_damaged_entry_is_translated_again_and_rewritten(damage) -> None:
    game = json.loads((alfworld_gen.cached_game("gen/valid/pick_and_place_simple-000000") / "game.tw-pddl")
                      .read_text())
    domain, problem = game["pddl_domain"], game["pddl_problem"]
    calls, stock = counted_translation()
    _, sas = sas_cache.translate(stock, domain, problem)
    path = sas_cache.entry_path(sas_cache.entry_key(domain, problem, False))
    good = path.read_bytes()
    path.write_bytes(damage(good))
    assert sas_cache.read_entry(sas_cache.entry_key(domain, problem, False)) is None
    calls.clear()
    assert sas_cache.translate(stock, domain, problem)[1] == sas
    assert calls == [1]  # translated again...
    assert path.read_bytes() == good  # ...and the entry rewritten


def test_an_entry_on_another_keys_file_is_not_read_but_translated_again() -> None:
    # Each entry's header names its key: another problem's entry copied onto this one's file (its own text intact,
    # so its sha256 passes) must not feed this problem another game's SAS text.
    games = [json.loads((alfworld_gen.cached_game(f"gen/valid/{task}") / "game.tw-pddl").read_text())
             for task in ("pick_and_place_simple-000000", "pick_and_place_simple-000001")]
    (domain, problem), (_, other_problem) = ((g["pddl_domain"], g["pddl_problem"]) for g in games)
    calls, stock = counted_translation()
    _, sas = sas_cache.translate(stock, domain, problem)
    _, other_sas = sas_cache.translate(stock, domain, other_problem)
    assert sas != other_sas
    path, other_path = (sas_cache.entry_path(sas_cache.entry_key(domain, p, False)) for p in (problem, other_problem))
    good = path.read_bytes()
    path.write_bytes(other_path.read_bytes())
    assert sas_cache.read_entry(sas_cache.entry_key(domain, other_problem, False)) == other_sas
    assert sas_cache.read_entry(sas_cache.entry_key(domain, problem, False)) is None
    calls.clear()
    assert sas_cache.translate(stock, domain, problem)[1] == sas
    assert calls == [1]
    assert path.read_bytes() == good


def test_a_write_removes_temporary_files_that_killed_writers_left_but_not_live_ones() -> None:
    from fast_downward.interface import pddl2sas

    game = json.loads((alfworld_gen.cached_game("gen/valid/pick_heat_then_place_in_recep-000000") / "game.tw-pddl")
                      .read_text())
    path = sas_cache.entry_path(sas_cache.entry_key(game["pddl_domain"], game["pddl_problem"], False))
    path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    stale, live = path.parent / ".0123456789abcdef-stale", path.parent / ".fedcba9876543210-live"
    for leftover in (stale, live):
        leftover.write_bytes(b"half an entry")
    old = time.time() - sas_cache.STALE_TEMPORARY_S - 60
    os.utime(stale, (old, old))
    sas_cache.translate(pddl2sas, game["pddl_domain"], game["pddl_problem"])  # a miss: writes the entry
    assert path.is_file() and not stale.exists() and live.exists()
    live.unlink()


def test_the_disk_cache_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from fast_downward.interface import pddl2sas

    game = json.loads((alfworld_gen.cached_game("gen/valid/look_at_obj_in_light-000000") / "game.tw-pddl")
                      .read_text())
    path = sas_cache.entry_path(sas_cache.entry_key(game["pddl_domain"], game["pddl_problem"], True))
    path.unlink(missing_ok=True)
    monkeypatch.setenv(sas_cache.SAS_CACHE_VARIABLE, "0")
    sas_cache.translate(pddl2sas, game["pddl_domain"], game["pddl_problem"], optimize=True)
    assert not path.exists()


def test_an_unwritable_cache_home_costs_only_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from fast_downward.interface import pddl2sas

    game = json.loads((alfworld_gen.cached_game("gen/valid/look_at_obj_in_light-000000") / "game.tw-pddl")
                      .read_text())
    not_a_directory = tmp_path / "home"
    not_a_directory.write_text("a file where the cache home should be")
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(not_a_directory))
    _, sas = sas_cache.translate(pddl2sas, game["pddl_domain"], game["pddl_problem"])
    assert sas == pddl2sas(game["pddl_domain"], game["pddl_problem"])[1]


def test_the_load_benchmark_times_every_setting_and_restores_the_env() -> None:
    from craft_bench.bench import _alfworld as bench
    from craft_bench.envs import alfworld_env

    stock_split, stock_load, shared_parse = (alfworld_env.split_task_rule, alfworld_env._AlfredEngine.load,
                                             sas_cache.parsed_task)
    lines = bench.load_rows(repeats=1, n_tasks=2)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| setting")]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == [label for label, *_ in bench.LOAD_SETTINGS]
    assert rows[0].endswith("| 1.00x |")
    assert alfworld_env.split_task_rule is stock_split  # the "off" settings leave nothing patched behind
    assert alfworld_env._AlfredEngine.load is stock_load and sas_cache.parsed_task is shared_parse
    assert sas_cache.SAS_CACHE_VARIABLE not in os.environ


def test_the_step_benchmark_times_each_copy_change_alone_and_restores_it() -> None:
    from textworld.envs.pddl import textgen

    from craft_bench.bench import _alfworld as bench
    from craft_bench.envs import alfworld_env

    for setting in ({"deep_context_copy": True}, {"deepcopy_symbols": True}, {}):
        assert bench.raw_engine_steps(5, **setting)["steps"] == 5
        assert textgen.copy_context is alfworld_env.copy_context_dicts
        assert textgen.deepcopy is alfworld_env.copy_symbols  # the env's own copy is back in place


def test_the_single_turn_benchmark_times_resets_and_steps_on_the_runner() -> None:
    from craft_bench.bench import _alfworld as bench

    lines = bench.single_turn_rows(rounds=1, workers=1)
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| call")]
    assert [row.split(" | ")[0] for row in rows] == ["| reset of 16 slots", "| one step of 16 slots"]
    assert all(float(row.split(" | ")[1]) > 0 for row in rows)


def test_official_game_with_goal_placeholder_gets_the_templated_goal(official_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(official_root, root)
    trial = next((root / "json_2.1.1" / "valid_seen").glob("pick_and_place_simple-*/trial_*"))
    game_path = trial / "game.tw-pddl"
    game = json.loads(game_path.read_text())
    goal = json.loads((trial / "traj_data.json").read_text())["turk_annotations"]["anns"][0]["task_desc"]
    game["grammar"] = game["grammar"].replace(f"Your task is to: {goal}.", "Your task is to: UNKNOWN GOAL.")
    game_path.write_text(json.dumps(game))
    env = ALFWorldEnv(split="valid_seen", data_path=root, task_types=("pick_and_place_simple",))
    assert len(env.task_ids) == 1
    info, rewards, _ = play_expert(env, options={"task_id": env.task_ids[0]})
    params = json.loads((trial / "traj_data.json").read_text())["pddl_params"]
    assert info["goal"] == f"put a {params['object_target'].lower()} in {params['parent_target'].lower()}"
    assert info["won"] and info["gamefile"] == str(game_path)
