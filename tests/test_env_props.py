"""Property-based tests (hypothesis) of the environment contract on every registered env id that needs no external
data, and of env-side action parsing: any seed, task index, reset option and text action keeps the contract.

Example counts are bounded so the module stays fast: `ENV_EXAMPLES` per env property and id (engine calls),
`PARSE_EXAMPLES` for `normalize_action` (pure); no per-example deadline, because the first reset of a task builds
its game (seconds on a loaded machine). Ids registered later by other modules are included automatically; an id
whose construction needs data that is not here (FileNotFoundError) is skipped with the reason.
"""

from __future__ import annotations

import math
import os

import gymnasium as gym
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import craft_bench
from craft_bench.envs.base import (
    INVALID_ACTION_FEEDBACK,
    MAX_ACTION_CHARS,
    TEXT_CHARSET,
    TextAgentEnv,
    normalize_action,
)
from craft_bench.envs.textworld_env import TEXTWORLD_ALIASES

ENV_EXAMPLES = 12
PARSE_EXAMPLES = 300
ENV_SETTINGS = settings(
    max_examples=ENV_EXAMPLES, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
#: Small constructions of the ids this suite knows; any other id is made with its defaults.
SMALL_KWARGS: dict[str, dict] = {
    # One compiled game: compiling dominates this module's time (seconds per game, more on a loaded machine).
    "craft/TextWorld-v0": {"n_games": 1},
    "craft/ALFWorldGen-v0": {"split": "valid", "tasks_per_type": 2, "task_types": ["pick_and_place_simple"]},
    "craft/ALFWorld-v0": {"task_types": ["pick_and_place_simple"]},
    "craft/SearchQAGen-v0": {"questions_per_family": 2},
}
ENV_IDS = sorted(craft_bench.ENV_IDS)
_ENVS: dict[str, gym.Env] = {}


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Games and data sets are built into a private cache, so results never depend on an earlier run's."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CRAFT_BENCH_HOME", str(tmp_path_factory.mktemp("craft_home")))
    yield
    patch.undo()
    for env in _ENVS.values():
        env.close()
    _ENVS.clear()


def make_env(env_id: str):
    """One env per id for the module (building games is the slow part); skipped when its data is not here."""
    if env_id not in _ENVS:
        try:
            _ENVS[env_id] = gym.make(env_id, disable_env_checker=True, **SMALL_KWARGS.get(env_id, {})).unwrapped
        except FileNotFoundError as error:
            pytest.skip(f"{env_id} needs data that is not here: {str(error).splitlines()[0][:200]}")
    return _ENVS[env_id]


seeds = st.one_of(st.none(), st.integers(0, 2**32 - 1))
any_text = st.text(max_size=40) | st.text(alphabet=st.sampled_from(" .!\t\nNSEWnsewx"), max_size=12)


def check_observation(env, obs) -> None:
    assert isinstance(obs, str) and obs, "an observation is a non-empty str"
    assert env.observation_space.contains(obs) and set(obs) <= TEXT_CHARSET


def check_info(env, info: dict) -> None:
    assert info["task_id"] in env.task_ids
    assert isinstance(info["admissible_actions"], list) and all(isinstance(a, str) for a in info["admissible_actions"])
    assert isinstance(info["won"], bool) and 0.0 <= info["progress"] <= 1.0
    assert info["action_format"]["kind"] in ("choice", "free")
    assert isinstance(info["privileged"]["text"], str) and isinstance(info["privileged"]["expert_plan"], list)


@pytest.mark.parametrize("env_id", ENV_IDS)
@ENV_SETTINGS
@given(seed=seeds, index=st.integers(-(10**6), 10**6))
def test_any_seed_and_task_index_give_a_valid_start_and_the_same_start_twice(env_id, seed, index):
    env = make_env(env_id)
    obs, info = env.reset(seed=seed, options={"task_index": index})
    tasks = env.task_ids
    assert info["task_id"] == tasks[index % len(tasks)] and info["step"] == 0
    check_observation(env, obs)
    check_info(env, info)
    if seed is not None:
        again, again_info = env.reset(seed=seed, options={"task_index": index})
        assert again == obs and again_info["admissible_actions"] == info["admissible_actions"]


bad_task_index = st.one_of(st.text(max_size=5), st.floats(allow_nan=True), st.booleans(), st.none(),
                           st.lists(st.integers(), max_size=2))


@pytest.mark.parametrize("env_id", ENV_IDS)
@ENV_SETTINGS
@given(index=bad_task_index, key=st.text(min_size=1, max_size=12).filter(lambda k: k not in ("task_id", "task_index")),
       task_id=st.text(max_size=30))
def test_bad_reset_options_are_errors_naming_the_option_and_leave_the_episode_alone(env_id, index, key, task_id):
    env = make_env(env_id)
    obs, info = env.reset(seed=0, options={"task_index": 0})
    with pytest.raises(ValueError, match="task_index must be an int"):
        env.reset(options={"task_index": index})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={key: 1})
    if task_id not in env.task_ids:
        with pytest.raises(ValueError, match="is not in split"):
            env.reset(options={"task_id": task_id})
    # A rejected reset never touched the episode: it plays on as if nothing happened.
    assert env.render() is None or env.render() == obs
    if info["admissible_actions"]:
        _, _, _, _, after = env.step(info["admissible_actions"][0])
        assert after["task_id"] == info["task_id"] and after["step"] == 1


def actions():
    """An action: an admissible one (by position), or arbitrary text, or text longer than MAX_ACTION_CHARS."""
    return st.one_of(
        st.integers(0, 10**6).map(lambda i: ("admissible", i)),
        any_text.map(lambda text: ("text", text)),
        st.integers(MAX_ACTION_CHARS + 1, MAX_ACTION_CHARS + 50).map(lambda n: ("text", "go north " * (n // 9 + 1))),
    )


@pytest.mark.parametrize("env_id", ENV_IDS)
@ENV_SETTINGS
@given(seed=st.integers(0, 2**16), plan=st.lists(actions(), min_size=1, max_size=6))
def test_any_text_action_keeps_the_step_contract(env_id, seed, plan):
    env = make_env(env_id)
    obs, info = env.reset(seed=seed, options={"task_index": seed})
    kind = info["action_format"]["kind"]
    done = False
    for step_index, (source, value) in enumerate(plan, start=1):
        if done:
            with pytest.raises(RuntimeError, match="episode is over"):
                env.step("look")
            break
        admissible = info["admissible_actions"]
        action = admissible[value % len(admissible)] if source == "admissible" and admissible else str(value)
        obs, reward, terminated, truncated, new_info = env.step(action)
        check_observation(env, obs)
        check_info(env, new_info)
        assert isinstance(reward, float) and math.isfinite(reward) and 0.0 <= reward <= 1.0
        assert isinstance(terminated, bool) and isinstance(truncated, bool)
        assert new_info["step"] == step_index and new_info["task_id"] == info["task_id"]
        assert isinstance(new_info["action_valid"], bool)
        if len(action) > MAX_ACTION_CHARS or not action.strip():
            assert not new_info["action_valid"]
        if kind == "choice" and type(env)._is_valid_action is TextAgentEnv._is_valid_action:
            expected_valid = len(action) <= MAX_ACTION_CHARS and env._normalize(action) in admissible
            assert new_info["action_valid"] == expected_valid
            if not new_info["action_valid"]:  # an invalid action changes nothing but the step count
                assert obs == INVALID_ACTION_FEEDBACK and reward == 0.0 and not terminated
                assert new_info["admissible_actions"] == admissible
        done = terminated or truncated
        info = new_info


@pytest.mark.parametrize("env_id", ENV_IDS)
@pytest.mark.parametrize("action", [None, 3, b"look", ["look"]])
def test_a_non_text_action_is_a_type_error(env_id, action):
    env = make_env(env_id)
    env.reset(seed=0)
    with pytest.raises(TypeError, match="action must be a str"):
        env.step(action)


# ---------------------------------------------------------------------------------------------- action parsing
@settings(max_examples=PARSE_EXAMPLES, deadline=None)
@given(text=st.text(max_size=60) | st.text(alphabet=st.sampled_from(" .!\t\nAaİıßẞﬁ½Ｇｏ"), max_size=20),
       aliases=st.sampled_from([None, TEXTWORLD_ALIASES]))
@example(text="a. .", aliases=None)  # once normalised to "a." (found by this property)
@example(text="x !.", aliases=TEXTWORLD_ALIASES)
def test_normalize_action_is_idempotent_and_canonical(text, aliases):
    once = normalize_action(text, aliases)
    assert normalize_action(once, aliases) == once
    assert once == once.strip() and "  " not in once and not any(ch in once for ch in "\t\n\r")
    assert not once.endswith((".", "!"))


@settings(max_examples=PARSE_EXAMPLES, deadline=None)
@given(words=st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8), min_size=1, max_size=5),
       spaces=st.lists(st.sampled_from([" ", "  ", "\t", " \n "]), min_size=6, max_size=6),
       upper=st.lists(st.booleans(), min_size=5, max_size=5), ending=st.sampled_from(["", ".", "!", " .", "..."]))
def test_normalize_action_ignores_case_spacing_and_final_punctuation(words, spaces, upper, ending):
    typed = spaces[0] + "".join(
        (word.upper() if upper[i] else word) + spaces[i + 1] for i, word in enumerate(words)
    ) + ending
    assert normalize_action(typed) == " ".join(words)


@pytest.mark.skipif(not os.environ.get("ALFWORLD_DATA"), reason="set $ALFWORLD_DATA to include craft/ALFWorld-v0")
def test_the_official_alfworld_id_is_covered_when_its_data_is_here():
    assert make_env("craft/ALFWorld-v0").task_ids


def test_a_non_finite_progress_from_an_engine_is_an_error_naming_it(monkeypatch):
    """The clamp to [0, 1] lets NaN through; shaped returns (progress_reward) would then be NaN, so it is refused."""
    from fake_envs import COUNTER_ENV_ID, CounterEnv

    from craft_bench.envs.base import EngineStep

    monkeypatch.setattr(CounterEnv, "_engine_step", lambda self, action: EngineStep("ok", False, False, math.nan))
    env = gym.make(COUNTER_ENV_ID).unwrapped
    env.reset(seed=0)
    with pytest.raises(ValueError, match="progress=nan"):
        env.step("add 1")
