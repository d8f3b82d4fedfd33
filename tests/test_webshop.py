"""Tests of craft/WebShopGen-v0 and craft/WebShop-v0: the expert wins every generated task, pages and navigation
keep WebShop's session state, invalid clicks are invalid actions, the contract holds (check_env, determinism,
privileged text never in an observation), and the official-format loader reads a directory the generator writes."""

from __future__ import annotations

import copy
import hashlib
import json
import random
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import craft_bench  # noqa: F401  (registers the ids)
from craft_bench.envs import webshop, webshop_gen
from craft_bench.envs.base import INVALID_ACTION_FEEDBACK, PRIVILEGED_HEADER
from craft_bench.envs.webshop import WebShopEnv
from craft_bench.envs.webshop_gen import GenConfig, WebShopGenEnv

#: The smallest generated data set with all three of WebShop's splits (500 test, 1000 eval, the rest train).
GEN = {"n_products": 1700, "n_goals": 1510}


@pytest.fixture(scope="module", autouse=True)
def cache_home(tmp_path_factory: pytest.TempPathFactory):
    """Generated catalogues go to a private cache, so tests never depend on what an earlier run left behind."""
    patch = pytest.MonkeyPatch()
    patch.setenv("CRAFT_BENCH_HOME", str(tmp_path_factory.mktemp("craft_home")))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def official_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small-setting directory in WebShop's layout (items_shuffle_1000.json, ...), written by the generator."""
    root = tmp_path_factory.mktemp("webshop_data")
    webshop_gen.write_dataset(root, GenConfig.make(n_products=700, n_goals=600, seed=3, small_file_names=True))
    return root


def gen_env(split: str = "test", **kwargs) -> WebShopGenEnv:
    return gym.make("craft/WebShopGen-v0", split=split, **{**GEN, **kwargs}).unwrapped


def play_expert(env: gym.Env, **reset_kwargs) -> tuple[dict, list[str], list[str], list[float]]:
    obs, info = env.reset(**reset_kwargs)
    observations, actions, rewards, done = [obs], [], [], False
    while not done:
        assert info["privileged"]["expert_plan"][0] in info["admissible_actions"]
        actions.append(info["privileged"]["expert_plan"][0])
        obs, reward, terminated, truncated, info = env.step(actions[-1])
        observations.append(obs)
        rewards.append(reward)
        done = terminated or truncated
    return info, actions, observations, rewards


def assert_expert_wins_every_task(env: gym.Env) -> None:
    for task_id in env.task_ids:
        info, actions, _, rewards = play_expert(env, seed=7, options={"task_id": task_id})
        assert info["won"] and info["task_score"] == 1.0, (task_id, actions, info["score_parts"])
        assert rewards[-1] == 1.0 and sum(rewards) == 1.0
        assert info["privileged"]["expert_plan"] == []


def test_the_expert_wins_every_generated_test_task() -> None:
    assert_expert_wins_every_task(gen_env("test"))


@pytest.mark.slow
def test_the_expert_wins_every_generated_task_of_every_split() -> None:
    """This module's catalogue in full, then the default `craft/WebShopGen-v0` (6000 products, 4500 goals):
    a few minutes on one core (`pytest -m slow tests/test_webshop.py`)."""
    for split in webshop.SPLIT_RANGES:
        assert_expert_wins_every_task(gen_env(split))
        assert_expert_wins_every_task(gym.make("craft/WebShopGen-v0", split=split).unwrapped)


def test_check_env_passes_on_both_ids(official_root: Path) -> None:
    check_env(gen_env("test"))
    check_env(gym.make("craft/WebShop-v0", data_dir=official_root, split="test").unwrapped)


def test_splits_follow_webshops_ranges_with_disjoint_products_and_instructions() -> None:
    sizes = {split: len(gen_env(split).task_ids) for split in webshop.SPLIT_RANGES}
    assert sizes == {"test": 500, "eval": 1000, "train": 10}
    env = gen_env("test")
    catalogue = env.catalogue
    goals = catalogue.goals
    by_split = {split: [goals[i] for i in webshop.split_range(split, len(goals), "x")] for split in sizes}
    for a, b in (("test", "eval"), ("test", "train"), ("eval", "train")):
        assert not {g["asin"] for g in by_split[a]} & {g["asin"] for g in by_split[b]}
        assert not {g["instruction"] for g in by_split[a]} & {g["instruction"] for g in by_split[b]}
    # WebShop's order: goals in product order, then random.seed(233); random.shuffle(goals).
    unshuffled = webshop.human_goals(catalogue.products, json.loads(
        (env.data_dir / webshop.HUMAN_INSTRUCTIONS_FILE).read_text()))
    state = random.getstate()
    try:
        random.seed(233)
        random.shuffle(unshuffled)
    finally:
        random.setstate(state)
    assert [g["instruction"] for g in unshuffled] == [g["instruction"] for g in goals]


def test_a_data_set_too_small_for_the_split_is_an_error_that_says_so(official_root: Path) -> None:
    assert len(WebShopEnv(data_dir=official_root, split="test").task_ids) == 500
    for split in ("eval", "train"):
        with pytest.raises(ValueError, match=r"has 600 goals, too few for WebShop's split"):
            WebShopEnv(data_dir=official_root, split=split).task_ids


def test_the_official_loader_reads_the_small_layout_the_generator_writes(official_root: Path) -> None:
    assert sorted(p.name for p in official_root.glob("items_*.json")) == [
        "items_human_ins.json", "items_ins_v2_1000.json", "items_shuffle_1000.json"]
    env = gym.make("craft/WebShop-v0", data_dir=official_root, split="test").unwrapped
    assert env.setting == "small" and env.data_source == "official"
    human = json.loads((official_root / "items_human_ins.json").read_text())
    goal = env.catalogue.goals[0]
    assert goal["instruction"] == human[goal["asin"]][0]["instruction"]
    assert goal["attributes"] == human[goal["asin"]][0]["instruction_attributes"]
    product = env.catalogue.products[env.catalogue.position[goal["asin"]]]
    assert product["Attributes"] and product["options"] and product["Price"].startswith("$")
    for task_id in env.task_ids[:40]:
        assert play_expert(env, seed=0, options={"task_id": task_id})[0]["won"]
    digest = hashlib.sha256()
    for name in ("items_shuffle_1000.json", "items_ins_v2_1000.json", "items_human_ins.json"):
        digest.update(name.encode() + (official_root / name).read_bytes())
    assert env.reset(seed=0)[1]["data_sha256"] == digest.hexdigest()
    with pytest.raises(FileNotFoundError, match="items_shuffle.json"):
        WebShopEnv(data_dir=official_root, setting="all")


def test_missing_data_names_the_generated_id_and_the_variable(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    monkeypatch.delenv("CRAFT_WEBSHOP_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match=r"craft/WebShopGen-v0") as error:
        gym.make("craft/WebShop-v0")
    assert "$CRAFT_WEBSHOP_DATA" in str(error.value)
    with pytest.raises(FileNotFoundError, match=r"craft/WebShopGen-v0"):
        WebShopEnv(data_dir=tmp_path)


def test_the_data_variable_points_at_the_data(monkeypatch: pytest.MonkeyPatch, official_root: Path) -> None:
    monkeypatch.setenv("CRAFT_WEBSHOP_DATA", str(official_root))
    assert len(gym.make("craft/WebShop-v0", split="test").unwrapped.task_ids) == 500


def test_pages_render_webshops_text_mode() -> None:
    env = gen_env()
    obs, info = env.reset(seed=0, options={"task_index": 0})
    assert obs == f"WebShop [SEP] Instruction: [SEP] {info['goal']} [SEP] Search"
    query = info["admissible_actions"][0]
    assert info["admissible_actions"] == [query] and query.startswith("search[")
    assert "price lower than" not in query  # the suggested query is the instruction without its price clause
    obs, *_, info = env.step(query)
    assert obs.startswith(f"Instruction: [SEP] {info['goal']} [SEP] Back to Search [SEP] Page 1 (Total results: ")
    assert info["admissible_actions"][:2] == ["click[back to search]", "click[next >]"]
    asin = info["admissible_actions"][2][len("click["):-1]
    obs, *_, info = env.step(f"click[{asin}]")
    product = env.catalogue.products[env.catalogue.position[asin.upper()]]
    assert f"[SEP] {product['Title']} [SEP] Price: {product['Price']} [SEP] Rating: N.A. [SEP] Description [SEP] " \
           "Features [SEP] Reviews [SEP] Buy Now" in obs
    assert info["admissible_actions"][:7] == [
        "click[back to search]", "click[< prev]", "click[description]", "click[features]", "click[reviews]",
        "click[buy now]", f"click[{next(iter(product['options'].values()))[0]}]"]
    obs, *_, info = env.step("click[features]")
    assert obs.endswith(" [SEP] ".join(["< Prev", *product["BulletPoints"]]))
    assert info["admissible_actions"] == ["click[back to search]", "click[< prev]"]


def first_task_with_many_results(env: WebShopGenEnv, minimum: int) -> tuple[str, str]:
    for task_id in env.task_ids:
        _, info = env.reset(seed=0, options={"task_id": task_id})
        query = info["admissible_actions"][0]
        if len(env.catalogue.search.search(query[len("search["):-1])) >= minimum:
            return task_id, query
    raise AssertionError("no task with enough results")


def test_pagination_and_back_navigation_keep_state() -> None:
    env = gen_env()
    task_id, query = first_task_with_many_results(env, 25)
    env.reset(seed=0, options={"task_id": task_id})
    page1, *_, info1 = env.step(query)
    assert "click[< prev]" not in info1["admissible_actions"]
    page2, *_, info2 = env.step("click[next >]")
    assert page2.split(" [SEP] ")[3].startswith("Page 2 (Total results: ")
    assert "click[< prev]" in info2["admissible_actions"] and page2 != page1
    third, *_ = env.step("click[next >]")
    assert "Page 3" in third
    back_to_2, *_ = env.step("click[< prev]")
    assert back_to_2 == page2
    # item -> description -> < prev keeps the chosen option; item -> < prev returns to the same results page
    product = info2["admissible_actions"][3]
    item, *_, item_info = env.step(product)
    options = [a for a in item_info["admissible_actions"][6:]]
    assert options, "generated products always have options"
    env.step(options[-1])
    env.step("click[description]")
    item_again, *_, again_info = env.step("click[< prev]")
    assert item_again == item and env._page.options and options[-1][len("click["):-1] in env._page.options.values()
    results_again, *_, results_info = env.step("click[< prev]")
    assert results_again == page2 and env._page.options == {}  # WebShop's results page resets the options
    start, *_ = env.step("click[back to search]")
    assert start.startswith("WebShop [SEP] Instruction:")
    page1_again, *_ = env.step(query)
    assert page1_again == page1


def test_pages_past_the_last_result_are_empty_as_in_webshop() -> None:
    env = gen_env()
    _, info = env.reset(seed=0, options={"task_index": 3})
    env.step(info["admissible_actions"][0])
    for _ in range(5):
        obs, *_, info = env.step("click[next >]")
    assert "Page 6" in obs and obs.endswith("< Prev [SEP] Next >")
    assert info["admissible_actions"] == ["click[back to search]", "click[< prev]", "click[next >]"]


@pytest.mark.parametrize("page_actions, invalid", [
    ([], "click[buy now]"),  # nothing to buy on the search page
    ([], "click[search]"),  # WebShop excludes its search button from clicks
    ([], "click[next >]"),
    (["SEARCH"], "search[another query]"),  # no search bar on the results page
    (["SEARCH"], "click[b0zzzzzzzz]"),  # not a product on this page
    (["SEARCH"], "click[< prev]"),  # page 1 has no prev button
    (["SEARCH", "PRODUCT"], "click[next >]"),
    (["SEARCH", "PRODUCT"], "click[not an option]"),
    (["SEARCH", "PRODUCT"], "buy now"),  # not in the action syntax
    (["SEARCH", "PRODUCT"], "click[]"),
])
def test_invalid_clicks_are_invalid_actions_and_change_nothing(page_actions: list[str], invalid: str) -> None:
    env = gen_env()
    obs, info = env.reset(seed=0, options={"task_index": 1})
    for action in page_actions:
        action = info["admissible_actions"][0] if action == "SEARCH" else info["admissible_actions"][2]
        obs, *_, info = env.step(action)
    page = copy.deepcopy(env._page)
    obs, reward, terminated, truncated, bad = env.step(invalid)
    assert not bad["action_valid"] and obs == INVALID_ACTION_FEEDBACK and reward == 0.0 and not terminated
    assert bad["admissible_actions"] == info["admissible_actions"] and bad["step"] == info["step"] + 1
    assert env._page == page  # the session state is untouched


def test_actions_are_normalised() -> None:
    env = gen_env()
    _, info = env.reset(seed=0, options={"task_index": 2})
    query = info["admissible_actions"][0][len("search["):-1]
    obs, *_, info = env.step(f"  Search [ {query.upper()} ] ")
    assert info["action_valid"] and "Page 1" in obs
    asin = info["admissible_actions"][2][len("click["):-1]
    obs, *_, info = env.step(f"CLICK[{asin.upper()}]")
    assert info["action_valid"] and "Buy Now" in obs
    obs, *_, info = env.step("Click [ Description ]")
    assert info["action_valid"]


def test_free_form_queries_are_valid_on_the_search_page() -> None:
    env = gen_env()
    env.reset(seed=0, options={"task_index": 0})
    obs, *_, info = env.step("search[xylophone quantum]")  # no product matches: an empty results page
    assert info["action_valid"] and "(Total results: 0)" in obs
    assert info["action_format"]["kind"] == "free" and "search[QUERY]" in info["action_format"]["syntax"]


def test_task_score_is_reported_on_every_step_and_won_iff_one() -> None:
    env = gen_env()
    index = 0
    while True:  # a goal with options: buying its product without choosing them scores below 1
        _, info = env.reset(seed=0, options={"task_index": index})
        if info["privileged"]["goal_options"]:
            break
        index += 1
    plan = info["privileged"]["expert_plan"]
    assert info["task_score"] == 0.0 and not info["won"]
    for action in plan[:2]:  # search, then the product
        *_, info = env.step(action)
        assert info["task_score"] == 0.0
    obs, reward, terminated, _, info = env.step("click[buy now]")
    n_attributes, n_options = len(info["privileged"]["goal_attributes"]), len(info["privileged"]["goal_options"])
    # every attribute and the price right, no option chosen: (attributes + 0 + 1) / (attributes + options + 1)
    assert info["task_score"] == pytest.approx((n_attributes + 1) / (n_attributes + n_options + 1))
    assert terminated and reward == 0.0 and not info["won"]
    assert info["score_parts"]["score"] == info["task_score"]
    assert obs == f"Thank you for shopping with us! [SEP] Your score (min 0.0, max 1.0) [SEP] {info['task_score']}"


def test_the_same_seed_gives_the_same_episode_and_price_bounds_come_from_the_env() -> None:
    env = gen_env()
    goals = {env.reset(seed=seed, options={"task_index": 0})[1]["goal"] for seed in range(12)}
    assert len(goals) > 1  # the price bound is drawn per episode...
    first = env.reset(seed=4)
    again = gen_env().reset(seed=4)
    assert first[0] == again[0] and first[1]["task_id"] == again[1]["task_id"]  # ...from the env's own generator
    state = random.getstate()
    env.reset(seed=5)
    assert random.getstate() == state  # no global random state is touched


def test_privileged_text_never_appears_in_an_observation() -> None:
    env = gen_env()
    rng = np.random.default_rng(0)
    for index in range(30):
        obs, info = env.reset(seed=index, options={"task_index": index})
        observations = [obs]
        secret = [info["privileged"]["text"], info["privileged"]["requirements"], info["privileged"]["target"],
                  PRIVILEGED_HEADER, "Expert plan"]
        done = False
        while not done:
            admissible = info["admissible_actions"]
            action = (info["privileged"]["expert_plan"][0] if rng.random() < 0.5 or not admissible
                      else admissible[int(rng.integers(len(admissible)))])
            obs, _, terminated, truncated, info = env.step(action)
            observations.append(obs)
            if info["privileged"]["text"]:
                secret.append(info["privileged"]["text"])
            done = terminated or truncated
        for text in observations:
            assert not any(s in text for s in secret if s)


def test_the_expert_recovers_from_a_detour() -> None:
    env = gen_env()
    _, info = env.reset(seed=0, options={"task_index": 9})
    plan = info["privileged"]["expert_plan"]
    *_, info = env.step(plan[0])
    *_, info = env.step("click[next >]")
    wrong = info["admissible_actions"][3]
    *_, info = env.step(wrong)
    *_, info = env.step("click[reviews]")
    while info["privileged"]["expert_plan"]:
        *_, terminated, truncated, info = env.step(info["privileged"]["expert_plan"][0])
        if terminated or truncated:
            break
    assert info["won"]


def test_generation_is_deterministic_and_cached(tmp_path: Path) -> None:
    config = GenConfig.make(n_products=300, n_goals=200, seed=11)
    webshop_gen.write_dataset(tmp_path / "a", config)
    webshop_gen.write_dataset(tmp_path / "b", config)
    for name in ("items_shuffle.json", "items_ins_v2.json", "items_human_ins.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    first = webshop_gen.cached_dataset(config)
    assert webshop_gen.cached_dataset(config) == first and (first / "items_shuffle.json").is_file()
    other = GenConfig.make(n_products=300, n_goals=200, seed=12)
    assert other.fingerprint() != config.fingerprint()


def test_generated_vocabularies_are_unambiguous_under_the_score() -> None:
    webshop_gen.check_vocabularies()  # raises on two values the fuzzy matching would confuse


def test_info_carries_the_webshop_keys() -> None:
    env = gen_env()
    _, info = env.reset(seed=0, options={"task_index": 0})
    assert info["data_source"] == "generated" and info["env_version"] == "v0"
    assert info["task_type"] in {c.name for c in webshop_gen.CATEGORIES}
    privileged = info["privileged"]
    assert set(privileged) >= {"expert_plan", "text", "goal_attributes", "goal_options", "price_upper",
                               "target_asin"}
    assert privileged["price_upper"] > env.catalogue.prices[env.catalogue.position[privileged["target_asin"]]]
    assert f"{privileged['price_upper']:.2f} dollars" in info["goal"]
    assert env.max_steps == 15 and info["data_sha256"] == env.gen_config.fingerprint()


def test_search_is_bm25_with_stemming_and_stop_words() -> None:
    search = webshop.ProductSearch([
        "red running shoes for men", "blue shoe rack", "the and of", "red dress", "running"])
    assert search.tokenize("The Running Shoes") == ["run", "shoe"]
    hits = search.search("running shoes")
    assert hits[0] == 0 and set(hits) == {0, 1, 4}  # stems match ("shoe" = "shoes"); doc 2 has only stop words
    assert search.search("the of") == [] and search.search("zebra") == []
    # equal scores keep catalogue order
    tied = webshop.ProductSearch(["lamp", "lamp", "lamp"])
    assert tied.search("lamp") == [0, 1, 2]


def test_a_query_term_that_stems_to_nothing_is_ignored_not_an_error(tmp_path) -> None:
    """"women's" tokenises to "women" and "s", which stems to "". When no document holds a lone "s" (the generated
    catalogue), bm25s keeps "" in its vocabulary without a column in the score matrix and raised ValueError on such
    a query (a trained WebShopGen policy wrote one). Built and reloaded from disk alike, the query now scores as if
    the lone "s" were absent; where documents hold one, "" is an indexed term as before."""
    search = webshop.ProductSearch(["women red dress", "men blue shirt", "red shoes"])
    assert search.tokenize("women's") == ["women", ""]
    search.save(tmp_path / "index")
    for index in (search, webshop.ProductSearch(saved=tmp_path / "index")):
        assert index.search("women's red") == index.search("women red") == [0, 2]
        assert index.search("s") == []
    possessive = webshop.ProductSearch(["women's red dress", "men blue shirt"])
    assert possessive.search("women's") == [0]
