"""The group runner: plays B tasks x G sibling episodes in lockstep over worker processes, for GRPO-style groups.
Finished episodes are masked (never auto-reset); a worker that dies is restarted and its episodes replayed.

Design notes.

1. Slot s = b * G + g plays task_ids[b]. Every sibling is reset with `options={"task_id": ...}` and the same seed,
   derived from (reset seed, b): siblings start from the same state, as a GRPO group needs, and differ only by the
   policy's actions. An episode depends only on its task, its seed and its actions: never on how many workers
   there are or which one holds it.
2. One round trip per worker per lockstep step: the runner sends each worker the batch of its slots' commands,
   then gathers replies with `multiprocessing.connection.wait` as they arrive (no sleeping, no polling).
3. Slots are assigned to workers round-robin at `reset` (slot s -> worker s mod W), which gives every worker an
   equal share of every group when W divides G, so that costly tasks (slow engine, long episodes) never pile up on
   one worker. Slots are re-balanced only at `reset`: an episode's state lives inside its worker's engine, and
   moving it mid-episode would cost a replay of its whole history on the new worker (plus a game load for engines
   such as TextWorld's). The price: as episodes end at different steps, workers' active counts drift apart and a
   lockstep step waits for the busiest worker; with B x G a few times W the drift stays small
   (`python -m craft_bench.bench envs` reports the scaling, and an estimate of it on idle cores).
4. A dead worker (pipe EOF or process exit) is restarted, its active slots are replayed from their action
   histories (reset with the same task and seed, then the recorded actions), and the interrupted request is sent
   again. Engines are deterministic given (task, seed, actions), so the result equals an uninterrupted run.
5. The transport lives behind `WorkerPool`, so a Ray pool (`craft_bench.envs.ray_pool.RayPool`) can replace
   `LocalProcessPool` without touching the lockstep, masking and replay logic of `GroupRunner`.
6. Hangs. Every env call (a reset, a step, or one action of a replay) must finish within `timeout_s`
   (`DEFAULT_TIMEOUT_S`; a worker's start-up and env constructions get `STARTUP_TIMEOUT_S`); workers count their finished calls in shared memory, so a long request of many quick
   calls never times out while one stuck call does, and the runner knows which call hung. A worker that misses the
   timeout (stopped by SIGSTOP, or an engine stuck in a loop) is killed, restarted and replayed like a dead one;
   the call it hung on gets one more try, and a second timeout of the same call raises `EnvTimeoutError` naming the
   task, or with `on_timeout="truncate"` ends that episode as truncated (`info["timed_out"] = True`). Nothing is
   retried forever.
7. Lifetime. Workers exit when the runner closes, when it is garbage collected or the interpreter exits, and when
   the main process dies, even by SIGKILL and even while stopped or stuck (`die_with_main_process`). Closing the
   last local pool of a process stops the forkserver too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from craft_bench.envs.worker_pool import (  # noqa: F401  (re-exported: the runner's public names)
    DEFAULT_TIMEOUT_S,
    MAX_CONSECUTIVE_RESTARTS,
    ON_TIMEOUT_CHOICES,
    STARTUP_TIMEOUT_S,
    InProcessPool,
    LocalProcessPool,
    Reply,
    Request,
    WorkerLost,
    WorkerPool,
    request_calls,
)


@dataclass(frozen=True)
class SlotStep:
    """One slot's result of a lockstep step (the Gymnasium 5-tuple, named)."""

    obs: str
    reward: float
    terminated: bool
    truncated: bool
    info: dict[str, Any]

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated


@dataclass
class RunnerStats:
    """Cumulative work counters of a runner. `critical_cpu_s` sums, over every round trip, the largest CPU time
    any worker spent on it: the wall time those round trips would take on idle cores, which on a shared machine
    separates the runner's own scaling (balance, serial parts) from other processes' load."""

    env_steps: int = 0
    round_trips: int = 0
    worker_cpu_s: float = 0.0
    critical_cpu_s: float = 0.0


class EnvWorkerError(RuntimeError):
    """An environment raised inside a worker; the message names the env id, the task and the slot, and holds the
    worker's traceback text."""


class WorkerCrashError(RuntimeError):
    """A worker kept dying on the same request even after restarts."""


class EnvTimeoutError(RuntimeError):
    """An env call missed the runner's timeout twice, on a fresh worker the second time; the message names the env,
    the task, the slot and the call."""


def group_seed(reset_seed: int, group: int) -> int:
    """The env reset seed of every sibling of group `group`: a function of (reset seed, group) only, so it does not
    depend on the worker count, and distinct groups of one task still get distinct seeds."""
    return int(np.random.SeedSequence([reset_seed, group]).generate_state(1)[0])


class GroupRunner:
    """B tasks x G siblings in lockstep over worker processes.

    runner = GroupRunner("craft/TextWorld-v0", {"split": "train"}, num_workers=2)
    obs, infos = runner.reset(task_ids, group_size=4)      # lists of length B*G; slot b*G+g plays task_ids[b]
    steps = runner.step(actions)                            # None for slots already finished (action must be None)

    Args:
        env_id, env_kwargs: what every worker makes (`gym.make(env_id, **env_kwargs)`).
        num_workers: workers; None for one per core (for Ray: one per `ray_cpus_per_worker` CPUs of the cluster).
            0 means `pool="inprocess"`.
        start_method: multiprocessing start method of the local pool.
        pool: `"local"` (worker processes on this machine, the default), `"inprocess"` (the envs run in this
            process: for debugging, and as a baseline), `"ray"` (one Ray actor per worker, see
            `craft_bench.envs.ray_pool`), or a `WorkerPool` instance.
        timeout_s: seconds one env call (reset, step, one replayed action) may take before its worker is killed,
            restarted and replayed (default `DEFAULT_TIMEOUT_S`); None waits forever. Not applied in process.
        on_timeout: when the same call times out a second time: `"error"` raises `EnvTimeoutError` naming the task;
            `"truncate"` ends that episode as truncated at its last observation, with `info["timed_out"] = True`
            (steps only: a reset or replay that hangs twice is always an error).
        ray_address: for `pool="ray"`: None starts (or joins the already started) local Ray, `"auto"` joins a running
            cluster, `"ray://host:10001"` connects a Ray client.
        ray_cpus_per_worker: for `pool="ray"`: CPUs reserved by each env actor (fractions allowed).
    """

    def __init__(
        self,
        env_id: str,
        env_kwargs: dict[str, Any] | None = None,
        num_workers: int | None = None,
        start_method: str = "forkserver",
        pool: WorkerPool | str | None = None,
        *,
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
        on_timeout: str = "error",
        ray_address: str | None = None,
        ray_cpus_per_worker: float = 1.0,
    ):

        if timeout_s is not None and (isinstance(timeout_s, bool) or not timeout_s > 0):
            raise ValueError(f"timeout_s must be a number of seconds > 0, or None for no limit; got {timeout_s!r}")
        if on_timeout not in ON_TIMEOUT_CHOICES:
            raise ValueError(f"on_timeout must be one of {ON_TIMEOUT_CHOICES}, got {on_timeout!r}")
        if num_workers is not None and (isinstance(num_workers, bool) or not isinstance(num_workers, int)):
            raise TypeError(f"num_workers must be an int or None, got {type(num_workers).__name__}: {num_workers!r}")
        # Resolving the spec here fails fast on an unknown id, and lets workers make ids registered only in this
        # process (e.g. by tests), provided the entry point is an importable string.
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self.on_timeout = on_timeout
        spec = gym.spec(env_id)
        if not isinstance(spec.entry_point, str):
            raise ValueError(
                f"{env_id}: its entry point must be an importable 'module:Class' string so that worker processes "
                f"can build it, got {spec.entry_point!r}"
            )
        if pool is None:
            pool = "inprocess" if num_workers == 0 else "local"
        if isinstance(pool, str):
            pool = self._make_pool(pool, spec, num_workers, start_method, ray_address, ray_cpus_per_worker)
        elif not isinstance(pool, WorkerPool):
            raise TypeError(f"pool must be 'local', 'inprocess', 'ray' or a WorkerPool, got {pool!r}")
        self._pool = pool
        self.num_workers = pool.num_workers
        self.group_size = 0
        self.num_slots = 0
        self.seed = 0
        self.resets = 0
        self.task_ids: list[str] = []
        self.group_ids: list[int] = []
        self.histories: list[list[str]] = []
        self.active: list[bool] = []
        #: Latest observation and info of every slot; a finished slot keeps its terminal ones.
        self.last_obs: list[str] = []
        self.last_infos: list[dict[str, Any]] = []
        self.restarts = 0
        #: Workers killed because a call missed the timeout (also counted in `restarts`).
        self.timeouts = 0
        self.stats = RunnerStats()
        self._worker_of: list[int] = []
        self._needs_reset = True
        # slot -> timeouts of its pending call (cleared when the slot's call succeeds): the second one is final.
        self._strikes: dict[int, int] = {}

    def _make_pool(
        self, kind: str, spec: gym.envs.registration.EnvSpec, num_workers: int | None, start_method: str,
        ray_address: str | None, ray_cpus_per_worker: float,
    ) -> WorkerPool:
        if kind == "inprocess":
            if num_workers not in (None, 0, 1):
                raise ValueError(f"pool='inprocess' runs one env host in this process; num_workers={num_workers}")
            return InProcessPool(spec, self.env_kwargs)
        if kind == "local":
            workers = (os.cpu_count() or 1) if num_workers is None else num_workers
            return LocalProcessPool(spec, self.env_kwargs, workers, start_method, timeout_s=self.timeout_s)
        if kind == "ray":
            from craft_bench.envs.ray_pool import RayPool

            return RayPool(spec, self.env_kwargs, num_workers, address=ray_address,
                           cpus_per_worker=ray_cpus_per_worker, timeout_s=self.timeout_s)
        raise ValueError(f"unknown pool {kind!r}; valid: 'local', 'inprocess', 'ray', or a WorkerPool instance")

    # ------------------------------------------------------------------ public API
    def reset(
        self, task_ids: Sequence[str], group_size: int, seed: int | None = None, *, first_group: int = 0
    ) -> tuple[list[str], list[dict[str, Any]]]:
        """Start B = len(task_ids) groups of `group_size` siblings; returns (obs, infos) per slot.

        `seed` drives the envs' own randomness (see `group_seed`); None means the number of earlier resets of this
        runner, so successive rounds differ and a re-run of the same calls gives the same episodes. `first_group`
        numbers the groups from there (`group_ids`, and so their seeds): a data-parallel rank that plays groups
        k..k+B-1 of a step resets them exactly as one process playing every group would.
        """
        if isinstance(task_ids, str):
            raise TypeError("task_ids must be a sequence of task id strings, got a single str")
        task_ids = [str(task) for task in task_ids]
        if not task_ids:
            raise ValueError("task_ids is empty: give at least one task")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        self.group_size = group_size
        self.num_slots = len(task_ids) * group_size
        self.seed = self.resets if seed is None else int(seed)
        self.resets += 1
        self.task_ids = [task for task in task_ids for _ in range(group_size)]
        if isinstance(first_group, bool) or not isinstance(first_group, int) or first_group < 0:
            raise ValueError(f"first_group must be an int >= 0, got {first_group!r}")
        self.group_ids = [first_group + b for b in range(len(task_ids)) for _ in range(group_size)]
        self.histories = [[] for _ in range(self.num_slots)]
        self.active = [True] * self.num_slots
        # Contiguous blocks of slots per worker: the siblings of a group share a worker, which then loads their game
        # once (envs memoise what a reload of the same game needs); any assignment gives the same episodes.
        self._worker_of = [slot * self.num_workers // self.num_slots for slot in range(self.num_slots)]
        self._needs_reset = True
        self._strikes.clear()

        requests = {
            worker: (
                "reset", [(slot, self.task_ids[slot], group_seed(self.seed, self.group_ids[slot])) for slot in slots]
            )
            for worker, slots in self._slots_by_worker(range(self.num_slots)).items()
        }
        # Workers without slots still get an empty reset, so they release envs they held for a previous group.
        for worker in range(self.num_workers):
            requests.setdefault(worker, ("reset", []))
        results = self._call(requests)
        self.last_obs = [results[slot][0] for slot in range(self.num_slots)]
        self.last_infos = [results[slot][1] for slot in range(self.num_slots)]
        self._needs_reset = False
        return list(self.last_obs), list(self.last_infos)

    def step(self, actions: Sequence[str | None]) -> list[SlotStep | None]:
        """Step every active slot with its action; finished slots must get None and return None."""
        if self._needs_reset:
            raise RuntimeError("call reset() first (never called, or the last call raised an environment error)")
        if len(actions) != self.num_slots:
            raise ValueError(f"expected {self.num_slots} actions (one per slot, None for finished), got {len(actions)}")
        for slot, action in enumerate(actions):
            if self.active[slot] and action is None:
                raise ValueError(f"slot {slot} (task {self.task_ids[slot]!r}) is still playing but its action is None")
            if not self.active[slot] and action is not None:
                raise ValueError(
                    f"slot {slot} (task {self.task_ids[slot]!r}) has finished; its action must be None, got {action!r}"
                )
            if action is not None and not isinstance(action, str):
                raise TypeError(f"slot {slot}: action must be a str, got {type(action).__name__}: {action!r:.80}")
        playing = {slot: actions[slot] for slot in range(self.num_slots) if self.active[slot]}
        results = self.step_slots(playing)  # type: ignore[arg-type]
        return [results.get(slot) for slot in range(self.num_slots)]

    def step_slots(self, actions: Mapping[int, str]) -> dict[int, SlotStep]:
        """Step only the given slots (each still playing) with their actions; the other slots wait. Returns their
        steps by slot. A caller can step waves of slots in turn, e.g. one wave while it samples the next's replies."""
        if self._needs_reset:
            raise RuntimeError("call reset() first (never called, or the last call raised an environment error)")
        for slot, action in actions.items():
            if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.num_slots:
                raise ValueError(f"slot {slot!r} is not one of this runner's {self.num_slots} slots")
            if not self.active[slot]:
                raise ValueError(f"slot {slot} (task {self.task_ids[slot]!r}) has finished; it cannot step again")
            if not isinstance(action, str):
                raise TypeError(f"slot {slot}: action must be a str, got {type(action).__name__}: {action!r:.80}")
        playing = sorted(actions)
        requests = {
            worker: ("step", [(slot, actions[slot]) for slot in slots])
            for worker, slots in self._slots_by_worker(playing).items()
        }
        results = self._call(requests)
        self.stats.env_steps += len(playing)
        steps: dict[int, SlotStep] = {}
        for slot in playing:
            obs, reward, terminated, truncated, info = results[slot]
            steps[slot] = SlotStep(obs, reward, terminated, truncated, info)
            self.histories[slot].append(actions[slot])
            self.last_obs[slot] = obs
            self.last_infos[slot] = info
            self.active[slot] = not (terminated or truncated)
        return steps

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the workers (empty in process; Ray actors' pids when they run on this machine)."""
        return list(getattr(self._pool, "pids", []))

    @property
    def pool(self) -> WorkerPool:
        """The worker pool (`LocalProcessPool`, `InProcessPool`, `RayPool`, or the one given)."""
        return self._pool

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> GroupRunner:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _slots_by_worker(self, slots: Sequence[int] | range) -> dict[int, list[int]]:
        by_worker: dict[int, list[int]] = {}
        for slot in slots:
            by_worker.setdefault(self._worker_of[slot], []).append(slot)
        return by_worker

    def _call(self, requests: dict[int, Request]) -> dict[int, Any]:
        """Run the requests, restarting and replaying lost workers; returns payload per slot, or raises the first
        environment error naming its task."""
        payloads: dict[int, Any] = {}
        pending = dict(requests)
        deaths = {worker: 0 for worker in requests}
        while pending:
            replies = self._pool.call(pending)
            cpu_seconds = [reply[1] for reply in replies.values() if not isinstance(reply, WorkerLost)]
            self.stats.round_trips += 1
            self.stats.worker_cpu_s += sum(cpu_seconds)
            self.stats.critical_cpu_s += max(cpu_seconds, default=0.0)
            lost = {worker: reply for worker, reply in replies.items() if isinstance(reply, WorkerLost)}
            for worker, reply in replies.items():
                if not isinstance(reply, WorkerLost):
                    done = self._unpack(pending[worker], reply[0])
                    payloads.update(done)
                    if pending[worker][0] != "replay":  # a replay succeeding says nothing of the call that hung
                        for slot in done:
                            self._strikes.pop(slot, None)
                    del pending[worker]
            for worker, loss in lost.items():
                self.restarts += 1
                self.timeouts += loss.timed_out
                request = pending[worker]
                culprit = self._culprit(request, loss)
                if culprit is None:
                    deaths[worker] += 1
                    if deaths[worker] >= MAX_CONSECUTIVE_RESTARTS:
                        self._needs_reset = True
                        tasks = sorted({self.task_ids[command[0]] for command in request[1]})
                        raise WorkerCrashError(
                            f"{self.env_id}: worker {worker} died {deaths[worker]} times in a row on the same "
                            f"request ({loss.cause}; tasks {tasks}): the engine crashes the process on one of these "
                            "tasks, or the worker cannot start (e.g. the env's entry point does not import)"
                        )
                else:
                    request = self._after_timeout(worker, request, culprit, payloads)
                if request[0] == "step":
                    self._replay(worker)
                if request[1] or request[0] == "reset":  # an empty reset still releases the fresh worker's envs
                    pending[worker] = request
                else:
                    del pending[worker]
        return payloads

    def _culprit(self, request: Request, loss: WorkerLost) -> int | None:
        """The slot whose call hung, for a timeout whose progress is known; None for a death or an unknown call."""
        if not loss.timed_out or loss.calls_done is None:
            return None
        calls = request_calls(request)
        return calls[loss.calls_done] if loss.calls_done < len(calls) else None

    def _after_timeout(self, worker: int, request: Request, slot: int, payloads: dict[int, Any]) -> Request:
        """Count a timeout of `slot`'s call; the first gets a retry on the fresh worker, the second raises or (for a
        step, with `on_timeout="truncate"`) ends the episode. Returns what is left of the request to resend."""
        kind, commands = request
        self._strikes[slot] = self._strikes.get(slot, 0) + 1
        if self._strikes[slot] < 2:
            return request
        call = {"reset": "reset", "replay": "replay of its history", "step": "step"}[kind]
        if kind == "step":
            action = next(command[1] for command in commands if command[0] == slot)
            call = f"step with action {action!r:.80}"
        if kind != "step" or self.on_timeout == "error":
            self._needs_reset = True
            advice = " or pass on_timeout='truncate' to end such episodes as truncated" if kind == "step" else ""
            raise EnvTimeoutError(
                f"{self.env_id}: task {self.task_ids[slot]!r} (slot {slot}) hung twice on its {call}: the call did "
                f"not finish within timeout_s={self.timeout_s:g} s, and again on a fresh worker after a replay. The "
                f"engine loops on it; raise timeout_s if the call is legitimately this slow{advice}"
            )
        self._strikes.pop(slot)
        info = dict(self.last_infos[slot], timed_out=True)
        payloads[slot] = (self.last_obs[slot], 0.0, False, True, info)
        self.active[slot] = False  # not replayed on the fresh worker; `step` records the result as usual
        return kind, [command for command in commands if command[0] != slot]

    def _replay(self, worker: int) -> None:
        """Rebuild a restarted worker's active episodes from their action histories."""
        commands = [
            (slot, self.task_ids[slot], group_seed(self.seed, self.group_ids[slot]), list(self.histories[slot]))
            for slot in range(self.num_slots)
            if self.active[slot] and self._worker_of[slot] == worker
        ]
        if not commands:
            return
        replayed = self._call({worker: ("replay", commands)})
        for slot, obs in replayed.items():
            if obs != self.last_obs[slot]:
                self._needs_reset = True
                raise RuntimeError(
                    f"{self.env_id}: replaying task {self.task_ids[slot]!r} (slot {slot}) after worker {worker} was "
                    f"lost did not reproduce the episode (last observation {self.last_obs[slot]!r:.80} became "
                    f"{obs!r:.80}): the engine is not deterministic given (task, seed, actions), so episodes cannot "
                    "be recovered"
                )

    def _unpack(self, request: Request, results: list[tuple[bool, Any]]) -> dict[int, Any]:
        kind, commands = request
        payloads = {}
        for command, (ok, payload) in zip(commands, results, strict=True):
            slot = command[0]
            if not ok:
                self._needs_reset = True
                last_line = payload.strip().splitlines()[-1] if payload.strip() else "unknown error"
                raise EnvWorkerError(
                    f"{self.env_id} failed on task {self.task_ids[slot]!r} (slot {slot}, {kind}): {last_line}\n"
                    f"worker traceback:\n{payload}"
                )
            payloads[slot] = payload
        return payloads
