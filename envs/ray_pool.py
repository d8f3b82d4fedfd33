"""Environment workers as Ray actors: `RayPool` runs the group runner's requests on one actor per worker, on this
machine or a Ray cluster, behind the same `WorkerPool` interface as local processes (`pip install 'craft-bench[ray]'`).

The runner's lockstep, masking and replay logic is unchanged: an actor that dies or misses the timeout is killed and
replaced by a fresh actor, which holds no env state (Ray's own `max_restarts` would not restore it either), so the
runner replays its episodes exactly as for a dead local process. Results equal the local pool's for the same tasks
and seeds, because an episode depends only on (task, seed, actions).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import gymnasium as gym

from craft_bench.envs.worker_pool import (
    DEFAULT_TIMEOUT_S,
    STARTUP_TIMEOUT_S,
    Reply,
    Request,
    WorkerLost,
    WorkerPool,
    _EnvHost,
)

RAY_MISSING = (
    "pool='ray' needs Ray, an optional dependency: pip install 'craft-bench[ray]' (or pip install 'ray>=2.9'); "
    "pool='local' runs the same workers as local processes"
)
#: Seconds to wait for an actor's count of finished calls when its request is late (a stopped actor never answers).
PROGRESS_QUERY_S = 5.0


def import_ray() -> Any:
    """The `ray` module, or a ModuleNotFoundError that says how to install it."""
    try:
        import ray
    except ModuleNotFoundError as error:
        if error.name != "ray":
            raise
        raise ModuleNotFoundError(RAY_MISSING, name="ray") from error
    return ray


class EnvActor:
    """The body of one env actor: an `_EnvHost`, and the count of env calls finished in the current request, which
    `calls` reads while `serve` runs (the actor is threaded, two calls at a time, for this)."""

    def __init__(self, spec: gym.envs.registration.EnvSpec, env_kwargs: dict[str, Any], sys_path: list[str]):
        # As multiprocessing does for its children: the driver's import path, so that entry points of ids registered
        # by the driver's own modules (tests, scripts) import here; only the entries that exist on this machine.
        for entry in sys_path:
            if entry not in sys.path and os.path.isdir(entry):
                sys.path.append(entry)

        self._calls = 0
        self._constructing = False
        self._host = _EnvHost(spec, env_kwargs, on_call=self._count_call, on_construct=self._set_constructing)

    def _count_call(self) -> None:
        self._calls += 1

    def _set_constructing(self, flag: bool) -> None:
        self._constructing = flag

    def pid(self) -> int:
        return os.getpid()

    def serve(self, request: Request) -> Reply:
        self._calls = 0
        cpu_start = time.process_time()
        results = self._host.serve(request)
        return results, time.process_time() - cpu_start

    def progress(self) -> tuple[bool, int]:
        """(constructing an env now, env calls finished in the current request)."""
        return self._constructing, self._calls

    def close(self) -> None:
        self._host.close()


class RayPool(WorkerPool):
    """One Ray actor per worker.

    Args:
        spec, env_kwargs: what every actor makes.
        num_workers: actors; None for as many as the cluster's CPUs allow at `cpus_per_worker` each.
        address: used only when Ray is not initialised yet: None starts a local Ray (or joins one named by
            $RAY_ADDRESS), "auto" joins a running cluster, "ray://host:10001" connects a Ray client.
        cpus_per_worker: CPUs each actor reserves (fractions allowed); the pool refuses more than the cluster has.
        timeout_s: seconds one env call may take, as for local workers (None: no limit). A late actor is asked for
            its count of finished calls; one that finished none for `timeout_s`, or cannot answer (stopped), is killed.
        init_kwargs: extra `ray.init` arguments when the pool starts Ray (e.g. `num_cpus`).

    Ray stays initialised after `close` (other pools may share it): `ray.shutdown()` ends it, as does the driver's
    exit for a local Ray.
    """

    def __init__(
        self,
        spec: gym.envs.registration.EnvSpec,
        env_kwargs: dict[str, Any],
        num_workers: int | None = None,
        *,
        address: str | None = None,
        cpus_per_worker: float = 1.0,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        init_kwargs: dict[str, Any] | None = None,
    ):
        ray = import_ray()
        if isinstance(cpus_per_worker, bool) or not isinstance(cpus_per_worker, (int, float)) or cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker must be a number > 0, got {cpus_per_worker!r}")
        if not ray.is_initialized():
            options = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
            try:
                ray.init(address=address, **options)
            except Exception as error:  # Ray raises a bare Exception here
                if "timed out during startup" not in str(error):
                    raise
                raise RuntimeError(
                    "Ray's local node did not start. On a loaded machine its dashboard agent can miss the raylet's "
                    "fixed start-up wait (ray-project/ray#65983, see /tmp/ray/session_latest/logs/raylet.err): "
                    "retry, or start Ray once with `ray start --head --num-cpus N` and pass ray_address='auto'"
                ) from error
        cluster_cpus = float(ray.cluster_resources().get("CPU", 0.0))
        if num_workers is None:
            num_workers = max(int(cluster_cpus // cpus_per_worker), 1)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers must be an int >= 1 (or None), got {num_workers!r}")
        if num_workers * cpus_per_worker > cluster_cpus + 1e-9:
            raise ValueError(
                f"{num_workers} Ray env actors x {cpus_per_worker:g} CPUs need {num_workers * cpus_per_worker:g} CPUs, "
                f"but the Ray cluster has {cluster_cpus:g}: lower num_workers or ray_cpus_per_worker (fractions are "
                "allowed), or add nodes"
            )
        self._ray = ray
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.cpus_per_worker = float(cpus_per_worker)
        self._spec = spec
        self._env_kwargs = env_kwargs
        self._actor_class = ray.remote(max_concurrency=2)(EnvActor)
        self._actors: list[Any] = [None] * num_workers
        self._pids: list[int] = [0] * num_workers
        for worker in range(num_workers):
            self._actors[worker] = self._create()
        self._await_start(range(num_workers))

    @property
    def pids(self) -> list[int]:
        """Process id of every actor (meaningful on the machine that runs it: tests signal them)."""
        return list(self._pids)

    @property
    def actors(self) -> list[Any]:
        """The actor handles (tests `ray.kill` them to check that no episode is lost)."""
        return list(self._actors)

    def _create(self) -> Any:
        return self._actor_class.options(num_cpus=self.cpus_per_worker, max_restarts=0).remote(
            self._spec, self._env_kwargs, list(sys.path)
        )

    def _await_start(self, workers: Any) -> None:
        ray = self._ray
        workers = list(workers)
        limit = max(self.timeout_s or 0.0, STARTUP_TIMEOUT_S)
        try:
            pids = ray.get([self._actors[worker].pid.remote() for worker in workers], timeout=limit)
        except ray.exceptions.GetTimeoutError as error:
            raise RuntimeError(
                f"{self._spec.id}: Ray env actors did not start within {limit:g} s (the cluster may lack free CPUs "
                f"for {self.cpus_per_worker:g} CPUs per actor; see `ray status`)"
            ) from error
        except ray.exceptions.RayActorError as error:
            raise RuntimeError(f"{self._spec.id}: a Ray env actor failed to start: {error}") from error
        for worker, pid in zip(workers, pids):
            self._pids[worker] = pid

    def _restart(self, worker: int) -> None:
        self._ray.kill(self._actors[worker], no_restart=True)
        self._actors[worker] = self._create()
        self._await_start([worker])

    def call(self, requests: dict[int, Request]) -> dict[int, Reply | WorkerLost]:
        ray = self._ray
        replies: dict[int, Reply | WorkerLost] = {}
        refs: dict[Any, int] = {}
        # worker -> ((constructing, calls finished), when that last changed)
        progress: dict[int, tuple[tuple[bool, int], float]] = {}
        for worker, request in requests.items():
            refs[self._actors[worker].serve.remote(request)] = worker
            progress[worker] = ((False, 0), time.monotonic())
        while refs:
            timeout = None
            if self.timeout_s is not None:
                deadline = min(progress[worker][1] + self.timeout_s for worker in refs.values())
                timeout = max(deadline - time.monotonic(), 0.0) + 0.01
            ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
            for ref in ready:
                worker = refs.pop(ref)
                try:
                    replies[worker] = ray.get(ref)
                except ray.exceptions.RayActorError as error:
                    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                    replies[worker] = WorkerLost(f"Ray actor died ({first_line:.200})")
            if self.timeout_s is not None:
                for ref, worker in list(refs.items()):
                    lost = self._check_late(worker, progress)
                    if lost is not None:
                        replies[worker] = lost
                        del refs[ref]
        for worker, reply in replies.items():
            if isinstance(reply, WorkerLost):
                self._restart(worker)
        return replies

    def _check_late(self, worker: int, progress: dict[int, tuple[tuple[bool, int], float]]) -> WorkerLost | None:
        """A WorkerLost (after killing the actor) if `worker` finished no call for `timeout_s` (an env construction:
        for `STARTUP_TIMEOUT_S`); else None."""
        ray = self._ray
        assert self.timeout_s is not None
        (constructing, calls), since = progress[worker]
        now = time.monotonic()
        limit = max(self.timeout_s, STARTUP_TIMEOUT_S) if constructing else self.timeout_s
        if now - since < self.timeout_s:
            return None
        try:
            current = ray.get(self._actors[worker].progress.remote(), timeout=min(PROGRESS_QUERY_S, self.timeout_s))
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            current = None  # stopped or dead: no count, so the call that hung is unknown
        if current is not None and tuple(current) != (constructing, calls):
            progress[worker] = (tuple(current), now)
            return None
        if now - since < limit:
            return None
        ray.kill(self._actors[worker], no_restart=True)
        return WorkerLost(
            f"missed the {limit:g} s timeout (stopped, or stuck in a call) and was killed",
            timed_out=True, calls_done=None if current is None else current[1],
        )

    def close(self) -> None:
        ray = self._ray
        closing = [actor.close.remote() for actor in self._actors if actor is not None]
        try:
            ray.wait(closing, num_returns=len(closing), timeout=5)
        except Exception:  # noqa: BLE001  (a dead actor has nothing to close; it is killed below anyway)
            pass
        for actor in self._actors:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        self._actors = [None] * self.num_workers
