"""Tests of the group runner: lockstep groups, masking, worker-count independence, crash recovery, clear errors.
They use the tiny `craft_test/Counter-v0` env from fake_envs.py, so no heavy engine is needed."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
from fake_envs import COUNTER_ENV_ID

from craft_bench.envs.group_runner import EnvWorkerError, GroupRunner, SlotStep, WorkerCrashError

TASKS = ["count-3-0", "count-6-3", "count-4-1"]
GROUP_SIZE = 3


def play(
    runner: GroupRunner, policy_seed: int = 0, kill_after_step: int | None = None, crash_at_step: int | None = None
) -> list[tuple]:
    """Play one group to the end with a seeded random policy; returns every observable result, in order."""
    rng = np.random.default_rng(policy_seed)
    obs, infos = runner.reset(TASKS, GROUP_SIZE, seed=7)
    trace = [("reset", obs, [info["task_id"] for info in infos])]
    step_index = 0
    while any(runner.active):
        actions = []
        for slot, active in enumerate(runner.active):
            choice = f"add {int(rng.integers(1, 4))}"
            if crash_at_step == step_index and slot == 1:
                choice = "crash"
            actions.append(choice if active else None)
        steps = runner.step(actions)
        results = [None if s is None else (s.obs, s.reward, s.terminated, s.truncated, s.info) for s in steps]
        trace.append(("step", results))
        step_index += 1
        if kill_after_step == step_index:
            os.kill(runner.worker_pids[1], signal.SIGKILL)
    trace.append(("histories", [list(h) for h in runner.histories], list(runner.last_obs)))
    return trace


def test_siblings_share_the_task_and_slots_follow_the_b_times_g_layout():
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
        obs, infos = runner.reset(TASKS, GROUP_SIZE)
        assert runner.num_slots == len(obs) == len(infos) == 9
        assert runner.group_size == GROUP_SIZE
        assert runner.task_ids == [task for task in TASKS for _ in range(GROUP_SIZE)]
        assert runner.group_ids == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert [info["task_id"] for info in infos] == runner.task_ids
        assert runner.active == [True] * 9
        # Siblings share their start (the fake env's observation holds a seeded noise word); groups do not.
        assert obs[0] == obs[1] == obs[2] and obs[3] == obs[4] == obs[5]
        two_groups_of_one_task, _ = runner.reset(["count-3-0", "count-3-0"], 2)
        assert two_groups_of_one_task[0] == two_groups_of_one_task[1] != two_groups_of_one_task[2]
        assert two_groups_of_one_task[2] == two_groups_of_one_task[3]


def test_successive_resets_without_a_seed_differ_and_replay_identically():
    def two_rounds() -> list[list[str]]:
        with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
            return [runner.reset(["count-3-0"], 2)[0] for _ in range(2)]

    first, second = two_rounds()
    assert first != second
    assert two_rounds() == [first, second]


def test_finished_slots_are_masked_not_reset_and_keep_their_terminal_observation():
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
        runner.reset(["count-3-0"], 2)
        steps = runner.step(["add 3", "add 1"])
        assert steps[0].terminated and steps[0].reward == 1.0 and steps[0].info["won"]
        assert runner.active == [False, True]
        terminal_obs = steps[0].obs
        later = runner.step([None, "add 1"])
        assert later[0] is None and isinstance(later[1], SlotStep)
        assert runner.last_obs[0] == terminal_obs
        assert runner.histories == [["add 3"], ["add 1", "add 1"]]
        with pytest.raises(ValueError, match="slot 0 .* has finished"):
            runner.step(["add 1", "add 1"])
        with pytest.raises(ValueError, match="slot 1 .* still playing"):
            runner.step([None, None])
        with pytest.raises(ValueError, match="expected 2 actions"):
            runner.step(["add 1"])


def test_results_are_identical_in_process_and_with_one_two_and_three_workers():
    traces = []
    for workers in (0, 1, 2, 3):
        with GroupRunner(COUNTER_ENV_ID, num_workers=workers) as runner:
            assert len(runner.worker_pids) == workers
            traces.append(play(runner))
    assert traces[0] == traces[1] == traces[2] == traces[3]
    # The seeded random policy must exercise masking: some slots finish before others.
    step_results = [entry[1] for entry in traces[0] if entry[0] == "step"]
    assert any(None in results for results in step_results)


def test_a_second_reset_reuses_workers_and_matches_a_fresh_runner():
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
        runner.reset(["count-5-2"], 5)
        runner.step(["add 1"] * 5)
        reused = play(runner, policy_seed=3)
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
        fresh = play(runner, policy_seed=3)
    assert reused == fresh


def test_killing_a_worker_mid_episode_loses_nothing():
    with GroupRunner(COUNTER_ENV_ID, num_workers=1) as runner:
        expected = play(runner)
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
        killed = play(runner, kill_after_step=1)
        assert runner.restarts == 1
    assert killed == expected


def test_killing_every_worker_mid_episode_and_before_a_reset_loses_nothing():
    with GroupRunner(COUNTER_ENV_ID, num_workers=1) as runner:
        expected = [play(runner, policy_seed=seed) for seed in (0, 1)]
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
        runner.reset(TASKS, GROUP_SIZE)
        runner.step(["add 1"] * runner.num_slots)
        for pid in runner.worker_pids:
            os.kill(pid, signal.SIGKILL)
        first = play(runner, policy_seed=0)  # its reset meets two dead workers
        for pid in runner.worker_pids:
            os.kill(pid, signal.SIGKILL)
        runner.step([None] * runner.num_slots)  # nothing is playing: no worker is asked, none is restarted
        assert runner.restarts == 2
        second = play(runner, policy_seed=1)
        assert runner.restarts == 4
    assert [first, second] == expected


def test_a_replay_that_does_not_reproduce_the_episode_is_a_clear_error():
    with GroupRunner(COUNTER_ENV_ID, {"show_pid": True}, num_workers=1) as runner:
        runner.reset(["count-6-3"], 1)
        runner.step(["add 1"])
        os.kill(runner.worker_pids[0], signal.SIGKILL)
        with pytest.raises(RuntimeError, match=r"replaying task 'count-6-3'.*not deterministic"):
            runner.step(["add 1"])


def test_a_worker_dying_inside_a_request_is_restarted_and_its_episodes_replayed(tmp_path):
    crash_file = tmp_path / "crash-once"
    env_kwargs = {"crash_file": str(crash_file)}
    with GroupRunner(COUNTER_ENV_ID, env_kwargs, num_workers=2) as runner:
        expected = play(runner, crash_at_step=1)
    crash_file.touch()
    with GroupRunner(COUNTER_ENV_ID, env_kwargs, num_workers=2) as runner:
        crashed = play(runner, crash_at_step=1)
        assert runner.restarts == 1
    assert not crash_file.exists()
    assert crashed == expected


def test_an_engine_exception_names_the_env_and_task_and_keeps_the_worker_traceback():
    with GroupRunner(COUNTER_ENV_ID, {"with_broken_task": True}, num_workers=2) as runner:
        with pytest.raises(EnvWorkerError, match=r"craft_test/Counter-v0 failed on task 'count-boom'") as error:
            runner.reset(["count-3-0", "count-boom"], 2)
        assert "the engine exploded" in str(error.value) and "Traceback" in str(error.value)
        with pytest.raises(RuntimeError, match="call reset"):
            runner.step(["add 1"] * 4)
        runner.reset(["count-3-0"], 2)  # the runner stays usable after an environment error
        assert runner.step(["add 3", "add 1"])[0].reward == 1.0


def test_an_info_that_cannot_be_sent_back_is_an_error_naming_the_task_not_a_crash_loop():
    with GroupRunner(COUNTER_ENV_ID, {"with_broken_task": True}, num_workers=1) as runner:
        with pytest.raises(EnvWorkerError, match=r"task 'count-3-lambda'.*(pickle|Pickl)"):
            runner.reset(["count-3-lambda"], 1)
        assert runner.restarts == 0


def test_an_unknown_task_is_a_clear_error():
    with GroupRunner(COUNTER_ENV_ID, num_workers=1) as runner:
        with pytest.raises(EnvWorkerError, match=r"task 'no-such-task'.*is not in split"):
            runner.reset(["no-such-task"], 1)


def test_bad_arguments_are_rejected():
    with pytest.raises(gym_error()):
        GroupRunner("craft_test/NoSuchEnv-v0", num_workers=1)
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        GroupRunner(COUNTER_ENV_ID, num_workers=-1)
    with GroupRunner(COUNTER_ENV_ID, num_workers=1) as runner:
        with pytest.raises(RuntimeError, match="call reset"):
            runner.step([])
        with pytest.raises(ValueError, match="group_size"):
            runner.reset(TASKS, 0)
        with pytest.raises(TypeError, match="single str"):
            runner.reset("count-3-0", 2)


def gym_error() -> type[Exception]:
    import gymnasium

    return gymnasium.error.Error


def test_a_worker_that_always_dies_on_a_request_is_a_clear_error_after_a_few_restarts():
    with GroupRunner(COUNTER_ENV_ID, {"always_crash": True}, num_workers=2) as runner:
        runner.reset(["count-3-0"], 2)
        with pytest.raises(WorkerCrashError, match=r"worker 1 died 3 times .*exit code 17.*count-3-0"):
            runner.step(["add 1", "crash"])
        with pytest.raises(RuntimeError, match="call reset"):
            runner.step(["add 1", "add 1"])
        runner.reset(["count-3-0"], 2)
        assert runner.step(["add 3", "add 3"])[1].reward == 1.0


def test_the_env_benchmark_prints_runner_rows_for_any_registered_env(capsys):
    from craft_bench.bench.envs import main

    main(["--envs", COUNTER_ENV_ID, "--steps", "40", "--workers", "2", "--repeats", "1", "--group-size", "2"])
    output = capsys.readouterr().out
    for row in ("group runner in process", "group runner x1", "group runner x2"):
        assert f"{COUNTER_ENV_ID}  {row}" in output
    assert "WARNING" not in output
    breakdown = output.split("Where the runner's step time goes")[1]
    for row in ("group runner x1", "group runner x2"):
        assert f"{COUNTER_ENV_ID}  {row}" in breakdown


def test_the_env_benchmark_breaks_the_runners_step_time_down():
    from craft_bench.bench.envs import RunnerTiming, time_breakdown

    # 100 steps in 50 round trips: 1.0 s wall, 0.2 s main CPU, 0.6 s CPU on the busiest workers' path, 1.0 s of CPU
    # over 2 workers (an even share of 0.5 s).
    timing = RunnerTiming(steps=100, step_seconds=1.0, step_cpu_seconds=0.8, main_cpu_seconds=0.2,
                          worker_cpu_seconds=1.0, round_trips=50, workers=2)
    parts = time_breakdown(timing)
    expected = {"wall": 10.0, "main": 2.0, "busiest worker": 6.0, "even share": 5.0, "imbalance": 1.0, "waiting": 2.0,
                "steps per round trip": 2.0}
    assert parts == pytest.approx(expected)
    in_process = time_breakdown(RunnerTiming(steps=10, step_seconds=0.1, step_cpu_seconds=0.09, main_cpu_seconds=0.09))
    assert (in_process["busiest worker"], in_process["imbalance"]) == (0.0, 0.0)
    assert in_process["waiting"] == pytest.approx(1.0)


def test_the_env_benchmark_summary_reads_family_rows_and_computes_the_ratios():
    from craft_bench.bench.envs import FAMILIES, IN_PROCESS, BenchRow, as_row, summary_rows

    textworld = FAMILIES["textworld"]
    env_id = textworld.env_ids[0]
    family_rows = [
        {"env": env_id, "setting": textworld.raw_engine, "steps": 100, "seconds": 1.0, "steps_per_s": 110.0,
         "cpu_steps_per_s": 220.0},
        {"env": env_id, "setting": textworld.one_env, "steps": 100, "seconds": 1.0, "steps_per_s": 100.0,
         "cpu_steps_per_s": 200.0},
    ]
    rows = [as_row(row) for row in family_rows] + [
        BenchRow(env_id, IN_PROCESS, 100.0, idle_steps_per_s=100.0),
        BenchRow(env_id, "group runner x1", 80.0, idle_steps_per_s=90.0),
        BenchRow(env_id, "group runner x2", 120.0, idle_steps_per_s=171.0),
    ]
    assert rows[0].note == "100 steps in 1.00 s" and rows[0].idle_steps_per_s == 220.0
    (summary,) = summary_rows([env_id], rows, num_workers=2)
    assert summary == [
        env_id, "110", "100", "100", "80", "120", "+10.0% ok", "+10.0% ok", "+25.0%", "1.50x MISSED", "1.90x ok"
    ]


def test_bad_pool_and_timeout_arguments_are_errors_naming_them():
    with pytest.raises(ValueError, match="timeout_s must be a number of seconds > 0"):
        GroupRunner(COUNTER_ENV_ID, num_workers=1, timeout_s=0)
    with pytest.raises(ValueError, match=r"on_timeout must be one of \('error', 'truncate'\)"):
        GroupRunner(COUNTER_ENV_ID, num_workers=1, on_timeout="skip")
    with pytest.raises(ValueError, match="unknown pool 'dask'"):
        GroupRunner(COUNTER_ENV_ID, num_workers=1, pool="dask")
    with pytest.raises(TypeError, match="num_workers must be an int or None, got str"):
        GroupRunner(COUNTER_ENV_ID, num_workers="2")
    with pytest.raises(ValueError, match="pool='inprocess' runs one env host"):
        GroupRunner(COUNTER_ENV_ID, num_workers=3, pool="inprocess")


def test_env_calls_of_a_request_name_the_slot_that_a_hung_worker_was_on():
    from craft_bench.envs.group_runner import request_calls

    assert request_calls(("step", [(4, "add 1"), (6, "add 2")])) == [4, 6]
    assert request_calls(("reset", [(1, "count-3-0", 9)])) == [1]
    # A replay is one reset and one step per recorded action.
    assert request_calls(("replay", [(0, "t", 9, ["a", "b"]), (2, "t", 9, [])])) == [0, 0, 0, 2]


def test_the_env_benchmark_runs_opt_in_family_rows_only_when_named(capsys, monkeypatch):
    from craft_bench.bench import envs

    with pytest.raises(SystemExit):
        envs.main(["--family-rows", "nope"])
    assert "unknown --family-rows ['nope']; valid: ['searchqa', 'webshop']" in capsys.readouterr().err
    called = []
    monkeypatch.setattr(envs, "family_rows", lambda family, *args: (called.append(family), ([], ""))[1])
    monkeypatch.setattr(envs, "machine_scaling", lambda workers: 1.0)
    monkeypatch.setattr(envs, "benchmark_tasks", lambda *args: (_ for _ in ()).throw(RuntimeError("no runner rows")))
    envs.main(["--envs", "craft/WebShopGen-v0,craft/SearchQAGen-v0"])
    envs.main(["--envs", "craft/WebShopGen-v0,craft/SearchQAGen-v0", "--family-rows", "webshop"])
    assert called == ["webshop"]


def test_a_block_of_groups_resets_as_those_groups_of_the_whole_batch():
    """What a data-parallel rank relies on: groups k.. played alone (`first_group=k`) start exactly as groups k.. of
    the whole batch, with the same group ids."""
    with GroupRunner(COUNTER_ENV_ID, num_workers=0) as runner:
        whole, _ = runner.reset(TASKS, GROUP_SIZE, seed=7)
        block, infos = runner.reset(TASKS[1:], GROUP_SIZE, seed=7, first_group=1)
        assert runner.group_ids == [1, 1, 1, 2, 2, 2]
        assert block == whole[GROUP_SIZE:]
        with pytest.raises(ValueError, match="first_group"):
            runner.reset(TASKS, GROUP_SIZE, seed=7, first_group=-1)
