"""Tests of building and caching tiny models: a build on the "test" budget reloads through the Auto* classes, is
deterministic for a seed, is reused from the cache, and gets a new cache key when the env or the budget changes."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import craft_bench.agents.tiny.build as build_module
import pytest
from craft_bench.agents import tiny
from craft_bench.agents.prompts import format_prompt
from craft_bench.agents.tiny.__main__ import main as tiny_cli
from craft_bench.agents.tiny.evaluate import evaluate_success
from craft_bench.agents.tiny.tokenizer import newline_token_id
from craft_bench.envs.cache import CorruptCacheError
from fake_envs import PICK_PLACE_ENV_ID, PickPlaceEnv

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The stand-in's tiny model, built once for the module on the "test" budget in a private cache."""
    home = tmp_path_factory.mktemp("craft_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CRAFT_BENCH_HOME", str(home))
        path = tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False, workers=0)
    return home, path


def weights_sha256(path: Path) -> str:
    return hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()


def test_newline_is_one_token_and_prompt_ids_ignore_special_tokens(built):
    from transformers import AutoTokenizer

    _, path = built
    tokenizer = AutoTokenizer.from_pretrained(path)
    newline = newline_token_id(tokenizer)
    ids = tokenizer.encode(" go to desk 1\n", add_special_tokens=False)
    assert ids[-1] == newline and ids.count(newline) == 1
    prompt = format_prompt(tokenizer, "Task: put a mug in desk 1")
    assert tokenizer.encode(prompt) == tokenizer.encode(prompt, add_special_tokens=False)
    assert tokenizer.decode(tokenizer.encode(prompt)) == prompt


def test_built_model_reloads_through_auto_classes_and_stops_at_newline(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    home, path = built
    assert path.is_relative_to(home) and path.name.startswith("test-seed0-")
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    metadata = tiny.load_metadata(path)
    assert json.loads((path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert metadata["parameters"] == sum(p.numel() for p in model.parameters())
    assert metadata["env_id"] == PICK_PLACE_ENV_ID and metadata["recipe_version"] == tiny.RECIPE_VERSION
    assert newline_token_id(tokenizer) in model.generation_config.eos_token_id
    batch = tokenizer(["Task: put a mug in desk 1\nAction:"], return_tensors="pt")
    output = model.generate(**batch, do_sample=False, max_new_tokens=8)
    assert output.shape[1] > batch["input_ids"].shape[1]


def test_cached_model_is_reused(built, monkeypatch):
    home, path = built
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(home))
    monkeypatch.setattr(build_module, "build_tiny_model", lambda *a, **k: pytest.fail("rebuilt a cached model"))
    assert tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False) == path


def test_build_is_deterministic_for_a_seed(built, tmp_path):
    _, path = built
    tiny.build_tiny_model(tmp_path / "again", PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False, workers=0)
    assert weights_sha256(path) == weights_sha256(tmp_path / "again")
    assert (path / "tokenizer.json").read_text() == (tmp_path / "again" / "tokenizer.json").read_text()


def test_another_seed_builds_other_weights(built, tmp_path):
    _, path = built
    tiny.build_tiny_model(tmp_path / "seed1", PICK_PLACE_ENV_ID, seed=1, budget="test", progress=False, workers=0)
    assert weights_sha256(path) != weights_sha256(tmp_path / "seed1")


def test_cache_key_changes_with_env_version_data_hash_kwargs_and_budget(monkeypatch, tmp_path):
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    monkeypatch.setattr(build_module, "build_verified", lambda target, build: target)  # the path only, no build

    def path(**kwargs):
        return tiny.tiny_model_path(**{"env_id": PICK_PLACE_ENV_ID, "budget": "test", **kwargs})

    base = path()
    assert path() == base
    assert path(env_kwargs={"max_steps": 3, "split": "valid"}) == base  # the data always comes from train
    others = [path(seed=1), path(budget="smoke"), path(budget=dataclasses.replace(tiny.BUDGETS["test"], lr=0.1))]
    monkeypatch.setattr(PickPlaceEnv, "env_version", "v1")
    others.append(path())
    monkeypatch.undo()
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    monkeypatch.setattr(build_module, "build_verified", lambda target, build: target)
    original_init = PickPlaceEnv.__init__

    def regenerated(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.data_sha256 = "regenerated data"

    monkeypatch.setattr(PickPlaceEnv, "__init__", regenerated)
    others.append(path())
    assert len({base, *others}) == len(others) + 1
    assert all(p.parent == base.parent for p in others)


def test_build_key_covers_every_setting():
    budget = tiny.BUDGETS["test"]
    keys = {
        tiny.build_key(PICK_PLACE_ENV_ID, 0, budget),
        tiny.build_key(PICK_PLACE_ENV_ID, 1, budget),
        tiny.build_key("craft/Other-v0", 0, budget),
        tiny.build_key(PICK_PLACE_ENV_ID, 0, dataclasses.replace(budget, lr=budget.lr / 2)),
        tiny.build_key(PICK_PLACE_ENV_ID, 0, budget, {"env_version": "v0", "data_sha256": "new data"}),
        tiny.build_key(PICK_PLACE_ENV_ID, 0, budget, {"action_format": {"kind": "free"}}),
        tiny.build_key(PICK_PLACE_ENV_ID, 0, budget, env_kwargs={"level": 2}),
    }
    assert len(keys) == 7


def test_cli_prints_the_model_path_first(built, monkeypatch, capsys):
    home, path = built
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(home))
    tiny_cli(["--env", PICK_PLACE_ENV_ID, "--budget", "test", "--workers", "0", "--quiet"])
    out, err = capsys.readouterr()
    assert out.splitlines() == [str(path)]
    assert json.loads(err)["env_id"] == PICK_PLACE_ENV_ID
    with pytest.raises(SystemExit):
        tiny_cli(["--env", PICK_PLACE_ENV_ID, "--env-kwargs", "[1]"])


def test_evaluation_runs_greedy_episodes_in_both_formats(built):
    _, path = built
    for with_privileged in (False, True):
        result = evaluate_success(path, PICK_PLACE_ENV_ID, "valid", n_episodes=3, with_privileged=with_privileged,
                                  max_steps=4, batch_size=2, workers=0, progress=False)
        assert result.n_episodes == 3 and result.successes == round(3 * result.success_rate)
        assert 1.0 <= result.steps_mean <= 4.0


def test_bad_settings_are_rejected_with_their_name():
    with pytest.raises(ValueError, match="unknown tiny-model budget"):
        tiny.resolve_budget("huge")
    with pytest.raises(ValueError, match="perturb_prob"):
        tiny.TinyBudget(perturb_prob=1.5)
    with pytest.raises(ValueError, match="num_heads"):
        tiny.TinyBudget(hidden_size=30, num_heads=4)
    with pytest.raises(ValueError, match="seed"):
        tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=-1)
    with pytest.raises(TypeError, match="env_kwargs"):
        tiny.tiny_model_path(PICK_PLACE_ENV_ID, env_kwargs=[("level", 1)])


def test_the_tiny_package_and_the_policy_import_each_other_in_no_cycle():
    """Every import of agents/prompts.py, policy.py and agents/tiny/*, at module level or inside functions, forms an
    acyclic graph: the policy depends on the tiny build, only `evaluate` and the CLI depend on the policy."""
    root = Path(tiny.__file__).parent.parent
    files = {"craft_bench.agents.prompts": root / "prompts.py", "craft_bench.agents.policy": root / "policy.py"}
    for file in (root / "tiny").glob("*.py"):
        name = "craft_bench.agents.tiny" + ("" if file.stem == "__init__" else f".{file.stem}")
        files[name] = file
    graph: dict[str, set[str]] = {}
    for name, file in files.items():
        edges = set()
        for node in ast.walk(ast.parse(file.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            for target in targets:
                # Importing a submodule runs its package's __init__ first, except the importer's own packages,
                # which Python always initialises before the importer.
                edges |= {t for t in files if (target == t or target.startswith(t + ".")) and
                          not name.startswith(t + ".")}
        graph[name] = edges - {name}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph[start])

    cycles = sorted(name for name in graph if reaches(name, name, {name}))
    assert not cycles, f"import cycle through {cycles}: {graph}"
    assert "craft_bench.agents.policy" not in graph["craft_bench.agents.tiny"]
    assert "craft_bench.agents.tiny" in graph["craft_bench.agents.policy"]


@pytest.mark.slow
def test_alfworldgen_builds_on_the_test_budget_and_plays(tmp_path, monkeypatch):
    """The real default environment end to end: generated tasks, expert plans from ALFWorld's planner, a build, and
    greedy episodes with the model on both prompts. Run with `pytest -m slow tests/test_tiny_build.py`."""
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    path = tiny.tiny_model_path("craft/ALFWorldGen-v0", budget="test", progress=False, workers=0)
    metadata = tiny.load_metadata(path)
    assert metadata["collection"]["episodes_won"] > 0 and metadata["examples"] > 0
    assert metadata["env_kwargs"] == {} and path.parent.name == "craft__ALFWorldGen-v0"
    for with_privileged in (False, True):
        result = evaluate_success(path, "craft/ALFWorldGen-v0", "valid", n_episodes=2, with_privileged=with_privileged,
                                  max_steps=3, workers=0, progress=False)
        assert result.n_episodes == 2 and result.steps_mean <= 3.0


@pytest.mark.slow
def test_model_tiny_works_for_textworld(tmp_path, monkeypatch):
    """`--model tiny` on craft/TextWorld-v0: the policy builds the env's own tiny model (2 games, "test" budget)
    and plays a held-out game with it. Compiles 3 TextWorld games. Run with `pytest -m slow tests/test_tiny_build.py`."""
    from craft_bench.agents.policy import Policy

    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    options = {"env_id": "craft/TextWorld-v0", "env_kwargs": {"n_games": 2}, "budget": "test", "progress": False,
               "workers": 0}
    policy = Policy.from_pretrained("tiny", tiny_options=options)
    (path,) = [p for p in (tmp_path / "models" / "tiny" / "craft__TextWorld-v0").iterdir() if p.is_dir()]
    assert tiny.load_metadata(path)["collection"]["episodes_won"] > 0
    result = evaluate_success(path, "craft/TextWorld-v0", "valid", n_episodes=1, with_privileged=True, max_steps=3,
                              workers=0, progress=False, env_kwargs={"n_games": 1})
    assert result.n_episodes == 1
    assert policy.max_positions == tiny.BUDGETS["test"].max_positions


def test_a_corrupt_cached_model_is_rebuilt_with_a_warning(tmp_path, monkeypatch):
    """Cache integrity (issue 15): the entry's manifest of sha256 hashes is checked on load; flipped bytes in the
    weights are found, and the deterministic build gives back the same model."""
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    path = tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False, workers=0)
    assert (path / "manifest.json").is_file()
    before = weights_sha256(path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt"):
        again = tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False, workers=0)
    assert again == path and weights_sha256(again) == before


def test_a_shipped_model_is_used_when_its_pin_matches_and_never_silently_rebuilt(built, tmp_path, monkeypatch):
    home, path = built
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(home))
    shipped = tmp_path / "shipped"
    entry = shipped / path.parent.name / path.name
    shutil.copytree(path, entry)
    pins = shipped / "pins.json"
    monkeypatch.setattr(build_module, "SHIPPED_DIR", shipped)
    monkeypatch.setattr(build_module, "SHIPPED_PINS", pins)
    monkeypatch.setattr(build_module, "build_tiny_model", lambda *a, **k: pytest.fail("built instead of shipped"))
    # Without a pin for this key, the cache's model is used.
    assert tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False) == path
    pins.write_text(json.dumps({f"{path.parent.name}/{path.name}": weights_sha256(path)}))
    assert tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False) == entry
    # shipped=False (`--rebuild`) is the cache's own model.
    assert tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False, shipped=False) == path
    # Weights that are not the pinned ones are an error naming the fix, not a rebuild.
    pins.write_text(json.dumps({f"{path.parent.name}/{path.name}": "0" * 64}))
    with pytest.raises(CorruptCacheError, match="shipped with craft-bench .* is damaged: model.safetensors has sha256"):
        tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False)
    pins.write_text(json.dumps({f"{path.parent.name}/{path.name}": weights_sha256(path)}))
    (entry / "config.json").write_text("{}")
    with pytest.raises(CorruptCacheError, match="--rebuild"):
        tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="test", progress=False)


def test_the_shipped_default_models_match_their_pins():
    pins = json.loads(build_module.SHIPPED_PINS.read_text())
    assert pins, "craft-bench ships the embedded default's tiny model"
    for key in pins:
        env_dir, name = key.split("/")
        assert build_module.shipped_model(env_dir, name) == build_module.SHIPPED_DIR / env_dir / name


def test_default_budget_means_each_environments_own_measured_budget(built, monkeypatch):
    from craft_bench.agents.tiny.budget import ENV_DEFAULT_BUDGETS, env_budget_name

    assert env_budget_name("default", "craft/SearchQAGen-v0") == "searchqa"
    assert env_budget_name("default", "craft/WebShopGen-v0") == "webshop"
    assert env_budget_name("default", "craft/ALFWorldGen-v0") == "default"
    assert env_budget_name("smoke", "craft/SearchQAGen-v0") == "smoke"
    assert set(ENV_DEFAULT_BUDGETS.values()) <= set(tiny.BUDGETS)
    # tiny_model_path builds (and names) the mapped budget: "default" of an env mapped to "test" is the test build.
    home, path = built
    monkeypatch.setenv("CRAFT_BENCH_HOME", str(home))
    monkeypatch.setitem(ENV_DEFAULT_BUDGETS, PICK_PLACE_ENV_ID, "test")
    monkeypatch.setattr(build_module, "build_tiny_model", lambda *a, **k: pytest.fail("rebuilt instead of reused"))
    assert tiny.tiny_model_path(PICK_PLACE_ENV_ID, seed=0, budget="default", progress=False) == path
