"""End to end with a free-form environment (the fake quiz of fake_envs.py, `search[NAME] | answer[CITY]`): the
prompt states the env's syntax, a policy's reply is parsed and sent verbatim, the runner steps it, and the tiny
model builds for the env from its expert plan, so a new free-form env needs no special case in agents/."""

from __future__ import annotations

import pytest
from fake_envs import QUIZ_ENV_ID
from test_policy import ScriptedEngine

from craft_bench.agents import tiny
from craft_bench.agents.policy import Policy
from craft_bench.agents.tiny.data import collect_expert_records
from craft_bench.agents.tiny.evaluate import evaluate_success
from craft_bench.envs.group_runner import GroupRunner


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def quiz_model(tmp_path_factory):
    home = tmp_path_factory.mktemp("craft_home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CRAFT_BENCH_HOME", str(home))
        return tiny.tiny_model_path(QUIZ_ENV_ID, budget="test", progress=False, workers=0)


def test_a_policy_plays_the_free_form_env_through_the_runner(quiz_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(quiz_model)  # plain format: the reply is the first line
    policy = Policy(ScriptedEngine(tokenizer, [" search[Chiara]\n", " answer[Vienna]\n"]), tokenizer)
    with GroupRunner(QUIZ_ENV_ID, {"split": "train"}, num_workers=0) as runner:
        observations, infos = runner.reset(["quiz-train-002"], group_size=1)
        for expected_raw in ("search[Chiara]", "answer[Vienna]"):
            info = infos[0]
            prompts = policy.turn_prompts(info["goal"], [], observations[0], info["admissible_actions"],
                                          info["privileged"]["text"], action_format=info["action_format"])
            student = tokenizer.decode(prompts.student_ids)
            assert "Action syntax: search[NAME] | answer[CITY]. Search a name to learn where" in student
            assert "Admissible actions" not in student
            assert tokenizer.decode(prompts.teacher_ids).startswith("Privileged guidance")
            (act,) = policy.act([prompts.student_ids], policy.sampling(temperature=0.0), [0])
            assert act.env_action == expected_raw  # parsed verbatim: brackets and case kept
            (step,) = runner.step([act.env_action])
            assert step.info["raw_action"] == expected_raw and step.info["action_valid"]
            observations, infos = [step.obs], [step.info]
        assert observations[0] == "Right answer." and step.terminated and step.info["won"]


def test_the_tiny_model_builds_from_the_expert_plan_and_plays(quiz_model):
    metadata = tiny.load_metadata(quiz_model)
    assert metadata["env_id"] == QUIZ_ENV_ID and metadata["collection"]["planner_failures"] == 0
    assert metadata["collection"]["episodes_won"] > 0
    records, _ = collect_expert_records(QUIZ_ENV_ID, tiny.BUDGETS["test"], seed=0, progress=False)
    # Every label is the first step of the expert plan shown to the teacher at that state.
    assert all(f"Expert plan from here: {r.action}" in r.privileged for r in records)
    assert {r.action[:7] for r in records} == {"search[", "answer["}
    for with_privileged in (False, True):
        result = evaluate_success(quiz_model, QUIZ_ENV_ID, "valid", n_episodes=2, with_privileged=with_privileged,
                                  max_steps=3, workers=0, progress=False)
        assert result.n_episodes == 2 and 1.0 <= result.steps_mean <= 3.0
