"""The tiny models that craft-bench ships for its generated Search-QA and WebShop environments and for TextWorld
cooking: `--model tiny` finds them, and on held-out tasks their teacher prompt (privileged block shown) beats their
student prompt."""

from __future__ import annotations

import pytest
from craft_bench.agents import tiny
from craft_bench.agents.tiny.build import SHIPPED_DIR
from craft_bench.agents.tiny.evaluate import evaluate_success

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

#: env id -> (held-out split, episodes on its evaluation list, least teacher-minus-student margin). Measured greedily
#: on CPU (docs/tiny_models.md): SearchQAGen teacher 9/96, student 1/96 on `valid`; WebShopGen teacher 42/96, student
#: 8/96 on `test` (WebShop's held-out goals). Each margin is a bit over half of the measured one: a model that stops
#: reading its block (or a prompt that loses it) scores about the same on both.
CASES = {"craft/SearchQAGen-v0": ("valid", 96, 5), "craft/WebShopGen-v0": ("test", 96, 20)}


@pytest.mark.slow
@pytest.mark.parametrize("env_id", sorted(CASES))
def test_the_shipped_model_is_the_default_and_its_teacher_beats_its_student(env_id):
    """Plays the held-out evaluation list greedily on each prompt: `python -m pytest -m slow
    tests/test_tiny_shipped.py`. SearchQAGen: 19 s on an idle 2-core machine, with or without a warm cache (3 minutes
    while two other jobs used the cores); WebShopGen: about 4 minutes beside one other job (longer pages)."""
    path = tiny.tiny_model_path(env_id, progress=False)  # "default": the env's own budget, shipped
    assert path.is_relative_to(SHIPPED_DIR)
    split, episodes, margin = CASES[env_id]
    student, teacher = (
        evaluate_success(path, env_id, split, episodes, with_privileged=privileged, workers=0, progress=False)
        for privileged in (False, True)
    )
    assert student.n_episodes == teacher.n_episodes == episodes
    assert teacher.successes - student.successes >= margin, (student, teacher)


def test_the_textworld_cooking_model_is_shipped_for_its_setting():
    # The setting of docs/tiny_models.md and of the README's TextWorld learning runs (`--set 'tiny_budget="textworld"'`).
    # Resolving it costs no game compilation; a change to the build key (budget, recipe, env fingerprint) fails here.
    kwargs = {"family": "cooking", "level": 1, "n_games": 64}
    path = tiny.tiny_model_path("craft/TextWorld-v0", 0, "textworld", progress=False, env_kwargs=kwargs)
    assert path.is_relative_to(SHIPPED_DIR)
    assert tiny.load_metadata(path)["env_kwargs"] == kwargs
