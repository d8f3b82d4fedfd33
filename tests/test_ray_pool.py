"""Tests of the Ray worker pool: exactly the local runner's episodes, an actor killed or stopped mid-episode loses
nothing, and clear errors for a missing Ray or too few CPUs. One local Ray (2 CPUs) serves the whole module, whose
start-up dominates its time (about 90 s on a loaded 2-core machine): `pytest -m distributed tests/test_ray_pool.py`."""

from __future__ import annotations

import os
import signal
import sys

import numpy as np
import pytest
from fake_envs import COUNTER_ENV_ID

from craft_bench.envs.group_runner import GroupRunner

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.distributed

TASKS = ["count-3-0", "count-6-3", "count-4-1"]
GROUP_SIZE = 3


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    """A 2-CPU local Ray for the module (starting one takes about 10 s)."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def play(runner: GroupRunner, fault=None) -> list[tuple]:
    """One group of TASKS to the end with a seeded random policy; `fault(runner)` runs after the first step."""
    rng = np.random.default_rng(0)
    obs, infos = runner.reset(TASKS, GROUP_SIZE, seed=7)
    trace: list[tuple] = [("reset", obs, [info["task_id"] for info in infos])]
    while any(runner.active):
        actions = [f"add {int(rng.integers(1, 4))}" if active else None for active in runner.active]
        steps = runner.step(actions)
        trace.append([None if s is None else (s.obs, s.reward, s.terminated, s.truncated, s.info) for s in steps])
        if fault is not None and len(trace) == 2:
            fault(runner)
    trace.append(("histories", [list(h) for h in runner.histories], list(runner.last_obs)))
    return trace


@pytest.fixture(scope="module")
def local_trace() -> list[tuple]:
    with GroupRunner(COUNTER_ENV_ID, num_workers=2) as runner:
        return play(runner)


def test_ray_actors_give_exactly_the_local_runners_episodes(local_trace):
    with GroupRunner(COUNTER_ENV_ID, num_workers=2, pool="ray", ray_cpus_per_worker=0.5) as runner:
        assert runner.num_workers == 2 and runner.pool.cpus_per_worker == 0.5
        assert play(runner) == local_trace
        # A second round on the same actors is the same as on a fresh local runner's second round.
        assert play(runner) == local_trace


def test_ray_kill_of_an_actor_mid_episode_loses_nothing(local_trace):
    def kill(runner: GroupRunner) -> None:
        ray.kill(runner.pool.actors[1], no_restart=True)

    with GroupRunner(COUNTER_ENV_ID, num_workers=2, pool="ray", ray_cpus_per_worker=0.5) as runner:
        assert play(runner, kill) == local_trace
        assert runner.restarts == 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals a local actor process")
def test_a_stopped_actor_misses_the_timeout_and_is_replaced_losing_nothing(local_trace):
    def stop(runner: GroupRunner) -> None:
        os.kill(runner.worker_pids[0], signal.SIGSTOP)

    with GroupRunner(COUNTER_ENV_ID, num_workers=2, pool="ray", ray_cpus_per_worker=0.5, timeout_s=3) as runner:
        stopped = runner.worker_pids[0]
        assert play(runner, stop) == local_trace
        assert runner.restarts == runner.timeouts == 1
        os.kill(stopped, signal.SIGKILL)  # Ray's kill left it stopped (SIGTERM waits for SIGCONT)


def test_more_actors_than_the_cluster_has_cpus_is_a_clear_error():
    with pytest.raises(ValueError, match=r"3 Ray env actors x 1 CPUs need 3 CPUs, but the Ray cluster has 2"):
        GroupRunner(COUNTER_ENV_ID, num_workers=3, pool="ray")


def test_a_missing_ray_says_how_to_install_it(monkeypatch):
    from craft_bench.envs import ray_pool

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'craft-bench\[ray\]'"):
        ray_pool.import_ray()


def test_the_env_benchmark_prints_ray_rows_beside_the_local_rows_on_the_same_episodes(capsys):
    from craft_bench.bench.envs import RAY_RUNNER, main

    main(["--envs", COUNTER_ENV_ID, "--steps", "30", "--workers", "2", "--repeats", "1", "--group-size", "2",
          "--pool", "ray", "--ray-cpus-per-worker", "0.5"])
    output = capsys.readouterr().out
    for row in ("group runner x1", "group runner x2", f"{RAY_RUNNER} x1", f"{RAY_RUNNER} x2"):
        assert f"{COUNTER_ENV_ID}  {row}" in output
    assert "Ray actors x2 run at" in output and "WARNING" not in output
