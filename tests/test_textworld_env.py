"""Tests for craft/TextWorld-v0: the environment contract on TextWorld games, their cache and split pools.
Games are compiled once per test module into a shared temporary $CRAFT_BENCH_HOME (about a second per game)."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import craft_bench  # noqa: F401  (registers the craft/* ids)
from craft_bench.bench._textworld import SAME_INFOS, WRAPPED, textworld_rows, wrapper_overhead
from craft_bench.envs.base import INVALID_ACTION_FEEDBACK, MAX_ACTION_CHARS, PRIVILEGED_HEADER
from craft_bench.envs.textworld_env import TextWorldEnv, clean_feedback
from craft_bench.envs.textworld_games import (
    COOKING_LEVELS,
    FAMILIES,
    SPLIT_SEED_OFFSET,
    GameSpec,
    _challenge_settings,
    game_file,
    game_pool,
    parse_task_id,
    prebuild,
)
from craft_bench.registration import ENV_IDS

TEXTWORLD_IDS = [env_id for env_id, entry in ENV_IDS.items() if entry.endswith("textworld_env:TextWorldEnv")]


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    """One cache for the whole module, so every game is compiled once."""
    previous = os.environ.get("CRAFT_BENCH_HOME")
    home = tmp_path_factory.mktemp("craft_bench_home")
    os.environ["CRAFT_BENCH_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("CRAFT_BENCH_HOME", None)
    else:
        os.environ["CRAFT_BENCH_HOME"] = previous


def small_env(**kwargs) -> TextWorldEnv:
    kwargs.setdefault("n_games", 2)
    return TextWorldEnv(**kwargs)


def play(env: TextWorldEnv, seed: int, actions_between: list[str]) -> list[str]:
    """Follow the expert plan, slipping `actions_between` in after the first step; return every observation."""
    obs, info = env.reset(seed=seed)
    observations = [obs]
    extra = list(actions_between)
    done = False
    while not done:
        action = extra.pop(0) if extra and len(observations) > 1 else info["privileged"]["expert_plan"][0]
        obs, _, terminated, truncated, info = env.step(action)
        observations.append(obs)
        done = terminated or truncated
    return observations


@pytest.mark.parametrize("env_id", TEXTWORLD_IDS)
def test_check_env_passes_on_every_registered_textworld_id_with_its_defaults(env_id):
    env = gym.make(env_id)
    check_env(env.unwrapped, skip_render_check=True)


def test_check_env_passes_on_a_mix_of_all_families():
    env = TextWorldEnv(family=sorted(FAMILIES), level=1, n_games=1)
    check_env(env, skip_render_check=True)


def test_same_seed_gives_the_same_observation_sequence():
    detour = ["look", "dance wildly", "inventory"]
    first = play(small_env(family="cooking", level=2), seed=5, actions_between=detour)
    second = play(small_env(family="cooking", level=2), seed=5, actions_between=detour)
    assert first == second
    assert len(first) > 3


def test_a_game_rebuilt_in_a_fresh_cache_plays_identically(tmp_path):
    reference = play(small_env(family="treasure_hunter", level=12), seed=1, actions_between=["look"])
    os.environ["CRAFT_BENCH_HOME"], saved = str(tmp_path), os.environ["CRAFT_BENCH_HOME"]
    try:
        rebuilt = play(small_env(family="treasure_hunter", level=12), seed=1, actions_between=["look"])
    finally:
        os.environ["CRAFT_BENCH_HOME"] = saved
    assert rebuilt == reference


def test_seed_picks_the_task_deterministically():
    env = small_env(family="coin_collector", level=[1, 2])
    picks = [env.reset(seed=seed)[1]["task_id"] for seed in range(6)]
    assert picks == [small_env(family="coin_collector", level=[1, 2]).reset(seed=s)[1]["task_id"] for s in range(6)]
    assert len(set(picks)) > 1


def test_expert_plan_wins_with_reward_on_the_winning_step_and_progress_from_score():
    env = small_env(family="cooking", level=2)
    obs, info = env.reset(seed=0)
    assert info["progress"] == 0.0 and info["max_score"] > 1
    progress, rewards = [info["progress"]], []
    while not info["won"]:
        obs, reward, terminated, truncated, info = env.step(info["privileged"]["expert_plan"][0])
        progress.append(info["progress"])
        rewards.append(reward)
    assert terminated and not truncated
    assert rewards[-1] == 1.0 and sum(rewards) == 1.0
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert 0.0 < progress[-2] < 1.0  # the cooking score rises before the meal is eaten
    assert info["privileged"]["expert_plan"] == []
    assert "*** The End ***" in obs and "RESTART" not in obs


@pytest.mark.parametrize(
    "action",
    ["dance wildly", "", "   ", "go " + "north" * (MAX_ACTION_CHARS // 5 + 1), "gehe nach N\u00f6rden", "\u2603"],
    ids=["not-admissible", "empty", "blank", "very-long", "non-ascii-words", "snowman"],
)
def test_invalid_actions_leave_the_state_unchanged_and_count_as_a_step(action):
    env = small_env()
    obs, info = env.reset(seed=0)
    obs, reward, terminated, truncated, after = env.step(action)
    assert obs == INVALID_ACTION_FEEDBACK
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert after["action_valid"] is False and after["step"] == 1
    assert after["admissible_actions"] == info["admissible_actions"]
    assert after["privileged"]["expert_plan"] == info["privileged"]["expert_plan"]
    assert after["score"] == info["score"]


@pytest.mark.parametrize("action", [None, 3, b"look", ["look"]])
def test_non_string_action_raises_type_error(action):
    env = small_env()
    env.reset(seed=0)
    with pytest.raises(TypeError, match="action must be a str"):
        env.step(action)


def test_aliases_case_whitespace_and_fullwidth_text_are_normalised():
    env = small_env(family="coin_collector", level=2)
    _, info = env.reset(seed=0)
    direction = info["privileged"]["expert_plan"][0].split()[-1]
    typed_forms = [direction[0].upper(), direction, f"go {direction[0]}", f"  GO   {direction.title()}. "]
    typed_forms.append("\uff47\uff4f " + direction)  # full-width letters, NFKC-normalised to ASCII
    for typed in typed_forms:
        _, info = env.reset(seed=0)
        _, _, _, _, info = env.step(typed)
        assert info["action_valid"], typed
    for typed, expected_obs_part in [("l", "-="), ("i", "carrying")]:
        env.reset(seed=0)
        obs, _, _, _, info = env.step(typed)
        assert info["action_valid"] and expected_obs_part in obs


def test_observations_are_clean_feedback_only():
    env = small_env(family="coin_collector", level=3)
    obs, info = env.reset(seed=0)
    assert "$$" not in obs and "-= " in obs  # banner gone, room title kept
    obs, *_ = env.step("look")
    assert not obs.rstrip().endswith("/2") and ">" not in obs
    first_obs, info = env.reset(seed=0)
    assert info["goal"] and info["goal"] not in first_obs and first_obs.startswith("-= ")


def test_privileged_text_never_appears_in_any_observation():
    env = TextWorldEnv(family=sorted(FAMILIES), level=2, n_games=1)
    for index in range(len(env.task_ids)):
        obs, info = env.reset(options={"task_index": index})
        assert obs.startswith("-= ") and info["goal"] not in obs  # the room, without the intro's copy of the goal
        observations, privileged = [obs], [info["privileged"]]
        for step in range(env.max_steps):
            plan, admissible = info["privileged"]["expert_plan"], info["admissible_actions"]
            assert set(plan[:1]) <= set(admissible), "the expert's next action must be admissible"
            action = plan[0] if plan and step % 3 != 2 else admissible[step % len(admissible)]
            obs, _, terminated, truncated, info = env.step(action)
            observations.append(obs)
            privileged.append(info["privileged"])
            if terminated or truncated:
                break
        for block in privileged:
            assert block["text"].startswith(PRIVILEGED_HEADER) and "Walkthrough" in block["text"]
            for obs in observations:
                assert block["text"] not in obs
                assert PRIVILEGED_HEADER not in obs and "Expert plan" not in obs and "Walkthrough" not in obs
                if len(block["expert_plan"]) > 1:
                    assert "; ".join(block["expert_plan"]) not in obs


def test_info_has_walkthrough_task_type_and_generated_data_source():
    env = small_env(family="treasure_hunter", level=3)
    _, info = env.reset(seed=0)
    assert info["task_type"] == "treasure_hunter-L3" and info["family"] == "treasure_hunter" and info["level"] == 3
    assert info["data_source"] == "generated" and info["env_version"] == "v0"
    assert info["privileged"]["walkthrough"] and isinstance(info["privileged"]["walkthrough"], list)
    assert len(info["data_sha256"]) == 64
    assert info["data_sha256"] == small_env(family="treasure_hunter", level=3).data_sha256
    assert info["data_sha256"] != small_env(family="treasure_hunter", level=3, split="test").data_sha256


def test_split_pools_are_disjoint_sorted_and_cost_no_compilation(shared_cache):
    before = sorted(Path(shared_cache).rglob("*.z8"))
    pools = {
        split: TextWorldEnv(split=split, family=sorted(FAMILIES), level=1, n_games=50).task_ids
        for split in SPLIT_SEED_OFFSET
    }
    assert sorted(Path(shared_cache).rglob("*.z8")) == before
    for split, ids in pools.items():
        assert ids == sorted(ids) and len(ids) == 150
        assert all(parse_task_id(task_id).split == split for task_id in ids)
    assert set(pools) == {"train", "valid", "test", "sft"}
    for first, second in itertools.combinations(pools, 2):
        assert not set(pools[first]) & set(pools[second]), (first, second)


def test_cooking_sft_games_use_the_training_foods():
    # TextWorld's cooking generator splits its foods train/valid/test; fine-tuning games are training data.
    for split, foods in (("sft", "train"), ("train", "train"), ("valid", "valid"), ("test", "test")):
        spec = GameSpec("cooking", 1, SPLIT_SEED_OFFSET[split] + 5)
        assert _challenge_settings(spec)["split"] == foods


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"family": "zork"}, "unknown TextWorld family"),
        ({"family": "treasure_hunter", "level": 31}, "level for 'treasure_hunter'"),
        ({"family": "cooking", "level": 0}, "level for 'cooking'"),
        ({"family": "coin_collector", "level": 151}, "needs 102 rooms"),
        ({"family": "coin_collector", "level": 234}, r"in \[1, 233\]"),
        ({"family": "coin_collector", "level": True}, "must be an int"),
        ({"split": "dev"}, "unknown split"),
        ({"n_games": 0}, "n_games"),
        ({"family": []}, "family must be"),
        ({"max_steps": "50"}, "max_steps must be an int >= 1, got str"),
        ({"max_steps": 0}, "max_steps must be an int >= 1"),
        ({"n_games": "2"}, "n_games must be an int"),
    ],
)
def test_bad_constructor_arguments_raise_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TextWorldEnv(**kwargs)


def test_unknown_task_id_is_rejected_with_a_hint():
    env = small_env()
    with pytest.raises(ValueError, match="not in split 'train'"):
        env.reset(options={"task_id": "coin_collector-L1-2000000"})
    with pytest.raises(ValueError, match="malformed TextWorld task id"):
        parse_task_id("coin_collector-1")


def test_clean_feedback_removes_banner_prompt_status_and_restart_prompt():
    raw = (
        "\n\n  ________ \n |  $$$$$ \\\n\nWelcome! Find the coin.\n\n-= Attic =-\nAn attic.\n\n\n\n"
        ">                                       -= Attic =-0/1"
    )
    assert clean_feedback(raw) == "Welcome! Find the coin.\n\n-= Attic =-\nAn attic."
    ending = (
        "You win.\n\n\n   *** The End ***\n\n"
        "Would you like to RESTART, RESTORE a saved game, QUIT or UNDO the last command?"
    )
    assert clean_feedback(ending) == "You win.\n\n*** The End ***"


def _build_in_child(spec: GameSpec, queue) -> None:
    queue.put(str(game_file(spec)))


def test_concurrent_processes_build_one_game_once(tmp_path):
    spec = game_pool("valid", ["coin_collector"], [4], 1)[0]
    saved = os.environ["CRAFT_BENCH_HOME"]
    os.environ["CRAFT_BENCH_HOME"] = str(tmp_path)
    try:
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        workers = [context.Process(target=_build_in_child, args=(spec, queue)) for _ in range(3)]
        for worker in workers:
            worker.start()
        paths = {queue.get(timeout=120) for _ in workers}
        for worker in workers:
            worker.join(timeout=60)
            assert worker.exitcode == 0
    finally:
        os.environ["CRAFT_BENCH_HOME"] = saved
    assert len(paths) == 1
    built = Path(paths.pop())
    assert built.is_file() and built.with_suffix(".json").is_file()
    assert not list(built.parent.parent.glob("*.tmp"))


def test_prebuild_over_worker_processes_gives_the_games_envs_use():
    specs = game_pool("valid", ["treasure_hunter"], [1], 2)
    paths = prebuild(specs, workers=2)
    assert paths == [game_file(spec) for spec in specs] and all(path.is_file() for path in paths)


def test_benchmark_rows_cover_the_raw_engine_and_the_wrapper_on_the_same_steps():
    rows = textworld_rows(n_steps=20)
    by_setting = {row["setting"]: row for row in rows}
    assert {SAME_INFOS, WRAPPED} <= set(by_setting) and len(rows) == 3
    assert len({row["steps"] for row in rows}) == 1 and rows[0]["steps"] >= 20
    for row in rows:
        assert row["env"] == "craft/TextWorld-v0" and row["steps_per_s"] > 0 and row["cpu_seconds"] > 0
    assert wrapper_overhead(rows) > -1.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "family, level",
    [("cooking", level) for level in COOKING_LEVELS]
    + [("treasure_hunter", level) for level in (1, 10, 20, 30)]
    + [("coin_collector", level) for level in (1, 100, 150, 233)],
)
def test_the_expert_plan_wins_at_every_cooking_level_and_the_hardest_levels(family, level):
    env = TextWorldEnv(split="test", family=family, level=level, n_games=1, max_steps=200)
    _, info = env.reset(seed=0)
    while not info["won"]:
        plan = info["privileged"]["expert_plan"]
        assert plan, f"no expert plan at step {info['step']} of {info['task_id']}"
        _, _, terminated, truncated, info = env.step(plan[0])
        assert info["action_valid"] and not truncated
    assert terminated and info["progress"] == 1.0
