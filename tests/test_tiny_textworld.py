"""The tiny model of craft/TextWorld-v0 on the "textworld" budget (cooking, level 1): it builds, wins held-out games,
and its teacher prompt clearly beats its student prompt. Slow: compiles 128 TextWorld games."""

from __future__ import annotations

import os

import pytest
import torch
from craft_bench.agents import tiny
from craft_bench.agents.tiny.evaluate import evaluate_success

ENV_ID = "craft/TextWorld-v0"
#: The setting of docs/tiny_models.md: cooking level 1 hides the ingredient in the cookbook, which the expert never
#: reads, so only the teacher block (the expert plan) names it. 64 games per split: sft builds, valid evaluates (train
#: is left to RL).
ENV_KWARGS = {"family": "cooking", "level": 1, "n_games": 64}
N_EPISODES = 64
#: Measured (docs/tiny_models.md, seed 0, greedy): student 18/64, teacher 33/64 (the build on `train` games: 24/64 and
#: 39/64 on one machine, 20/64 and 32/64 on another). A model that collapsed to one memorised action (3 epochs) won
#: 0/64 on both prompts; the floor sits below every teacher measured and far above that.
MIN_TEACHER_SUCCESSES = 30
#: Teacher wins minus student wins, measured +15 (+12 and +15 on `train` builds). 8 (12.5 points) is about half of
#: it, and more than twice what models that barely read the block reached (+3 with 8 epochs, see the docs page), so a
#: regression that stops the model from reading the block fails, while small numeric drift between torch builds does
#: not.
MIN_MARGIN = 8


@pytest.mark.slow
def test_textworld_cooking_teacher_prompt_clearly_beats_student_prompt_on_held_out_games(tmp_path, monkeypatch):
    """Builds the "textworld" budget's model (collect, tokenizer, SFT) and plays the 64 held-out `valid` games
    greedily on each prompt. Run with `OMP_NUM_THREADS=1 python -m pytest -m slow tests/test_tiny_textworld.py`:
    about 11 minutes of build and 2 of evaluation on a busy core, plus compiling 128 games (5-15 s each) unless
    `CRAFT_BENCH_HOME` already holds them (precompile: `python -m craft_bench.envs.textworld_games --split sft
    --family cooking --level 1 --n-games 64 --workers 1`, the model's training games, and the same with `--split
    valid`)."""
    if not os.environ.get("CRAFT_BENCH_HOME"):
        # A home that already holds the games (or the model: its cache key covers every setting) is reused.
        monkeypatch.setenv("CRAFT_BENCH_HOME", str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The recipe, not the shipped model (tests/test_tiny_shipped.py finds that one): a rebuild is another model.
        path = tiny.tiny_model_path(ENV_ID, seed=0, budget="textworld", progress=False, workers=0,
                                    env_kwargs=ENV_KWARGS, shipped=False)
        metadata = tiny.load_metadata(path)
        assert metadata["collection"]["episodes_won"] > 0
        assert metadata["examples_dropped_too_long"] == 0
        student, teacher = (
            evaluate_success(path, ENV_ID, "valid", N_EPISODES, with_privileged, max_steps=50, workers=0,
                             progress=False, env_kwargs=ENV_KWARGS)
            for with_privileged in (False, True)
        )
    finally:
        torch.set_num_threads(threads)
    assert student.n_episodes == teacher.n_episodes == N_EPISODES
    assert teacher.successes >= MIN_TEACHER_SUCCESSES, (student, teacher)
    assert teacher.successes - student.successes >= MIN_MARGIN, (student, teacher)
