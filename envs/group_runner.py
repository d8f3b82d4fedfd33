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

import ctypes
import multiprocessing as mp
import os
import select
import signal
import sys
import threading
import time
import traceback
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import gymnasium as gym
import numpy as np

#: A worker that dies this many times in a row on the same request is considered broken, not unlucky.
MAX_CONSECUTIVE_RESTARTS = 3
#: Seconds one env call (reset, step, or one action of a replay) may take before its worker counts as hung. The
#: slowest legitimate call measured here (2 shared cores, load average 3.5-7): ALFWorldGen's first reset in a fresh
#: process, which starts the engine and generates its game, 8.3 s; later resets that generate a game up to 1.5 s;
#: steps up to 0.39 s (a two-object task's replan); TextWorld's first reset of a game compiles it (0.5-3 s). 60 s is
#: a 7x margin over the worst of them, and still ends a hang within about two minutes (two tries).
DEFAULT_TIMEOUT_S = 60.0
#: A worker that is starting (imports) or constructing an env (which may load a data set or an index: WebShop's,
#: Search-QA's) for longer than this, or `timeout_s` if larger, counts as hung. Neither is an env call, and both can
#: take minutes for large data, so they get their own, longer limit.
STARTUP_TIMEOUT_S = 600.0
#: How often a worker's watchdog thread wakes (it is woken at once by a hang-up of the main process's pipe).
PARENT_POLL_S = 1.0
#: What the runner does with an episode whose call timed out a second time: raise, or end it as truncated.
ON_TIMEOUT_CHOICES = ("error", "truncate")


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


@dataclass(frozen=True)
class WorkerLost:
    """Why a worker gave no reply to a request: it died, or it missed the timeout and was killed. Either way the pool
    has already replaced it by a fresh worker holding no environments."""

    cause: str
    timed_out: bool = False
    #: Env calls of the request that had finished when the worker was lost, which names the call that hung
    #: (None when unknown).
    calls_done: int | None = None


# ---------------------------------------------------------------------------------------------- worker protocol
# A request is (kind, commands); the reply is (results, cpu_seconds): one (ok, payload) per command, in order, and
# the worker's CPU time spent on the request (for `RunnerStats`).
#   kind "reset":  commands = [(slot, task_id, seed)]; the worker first releases every slot it held.
#   kind "replay": commands = [(slot, task_id, seed, actions)]; reset then replay; payload = the last observation.
#   kind "step":   commands = [(slot, action)]; payload = (obs, reward, terminated, truncated, info).
# Env calls: a reset or step command is one call, a replay command 1 + len(actions); a worker counts the calls it
# finished (`_EnvHost.on_call`), which is how the runner tells a slow request from a stuck call.
Request = tuple[str, list[tuple]]
Reply = tuple[list[tuple[bool, Any]], float]


def request_calls(request: Request) -> list[int]:
    """The slot of every env call of `request`, in the order the worker makes them."""
    kind, commands = request
    if kind == "replay":
        return [command[0] for command in commands for _ in range(1 + len(command[3]))]
    return [command[0] for command in commands]


class _EnvHost:
    """The envs of one worker, pooled and handed to slots at reset. All of them share (id, kwargs) and `reset`
    re-initialises an env fully, so any free env can play any slot; a free env that last played the slot's task
    is preferred, because engines such as TextWorld's reload their game file when the task changes."""

    def __init__(
        self,
        spec: gym.envs.registration.EnvSpec,
        env_kwargs: dict[str, Any],
        on_call: Callable[[], None] = lambda: None,
        on_construct: Callable[[bool], None] = lambda constructing: None,
    ):
        self._spec = spec
        self._env_kwargs = env_kwargs
        self._on_call = on_call  # told after every env call, finished or failed (see `request_calls`)
        self._on_construct = on_construct  # told when an env construction starts (True) and ends (False)
        self._free: list[tuple[str, gym.Env]] = []
        self._slots: dict[int, tuple[str, gym.Env]] = {}

    def release_all(self) -> None:
        self._free.extend(self._slots.values())
        self._slots.clear()

    def reset(self, slot: int, task_id: str, seed: int) -> tuple[str, dict[str, Any]]:
        if slot in self._slots:
            self._free.append(self._slots.pop(slot))
        same_task = [index for index, (last_task, _) in enumerate(self._free) if last_task == task_id]
        if same_task:
            env = self._free.pop(same_task[-1])[1]
        elif self._free:
            env = self._free.pop()[1]
        else:
            self._on_construct(True)
            try:
                env = gym.make(self._spec, disable_env_checker=True, **self._env_kwargs)
            finally:
                self._on_construct(False)
        self._slots[slot] = (task_id, env)
        try:
            return env.reset(seed=seed, options={"task_id": task_id})
        finally:
            self._on_call()

    def step(self, slot: int, action: str) -> tuple[str, float, bool, bool, dict[str, Any]]:
        try:
            if slot not in self._slots:
                raise RuntimeError(f"slot {slot} was never reset in this worker")
            obs, reward, terminated, truncated, info = self._slots[slot][1].step(action)
            return obs, float(reward), bool(terminated), bool(truncated), info
        finally:
            self._on_call()

    def replay(self, slot: int, task_id: str, seed: int, actions: Sequence[str]) -> str:
        """Rebuild an episode; returns its last observation, which the runner checks against the one it kept."""
        obs, _ = self.reset(slot, task_id, seed)
        for action in actions:
            obs = self.step(slot, action)[0]
        return obs

    def serve(self, request: Request) -> list[tuple[bool, Any]]:
        """Run a request's commands in order; an exception becomes (False, its traceback) for the main process to
        raise naming the task."""
        kind, commands = request
        handlers = {"reset": self.reset, "step": self.step, "replay": self.replay}
        if kind == "reset":
            self.release_all()
        results: list[tuple[bool, Any]] = []
        for command in commands:
            try:
                results.append((True, handlers[kind](*command)))
            except Exception:
                results.append((False, traceback.format_exc()))
        return results

    def close(self) -> None:
        self.release_all()
        for _, env in self._free:
            env.close()
        self._free.clear()


def die_with_main_process(conn: Connection) -> None:
    """Make this worker exit when the main process dies, even by SIGKILL, even while stopped or stuck.

    Three links, because each covers a case the others miss:
    1. A watchdog thread polls the worker's pipe for a hang-up, which happens when the main process, the pipe's
       only other holder, is gone; it then exits. It cannot run while the worker is stopped or holds the GIL in C.
    2. On Linux the kernel sends SIGKILL when the worker's parent exits (PR_SET_PDEATHSIG), which ends even a
       stopped or stuck process. A forkserver worker's parent is the forkserver, hence:
    3. The worker closes its copy of the forkserver's "alive" pipe, which multiprocessing hands to every child: the
       forkserver exits when all holders are gone, so without this it would wait for its workers while they wait
       for it.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if alive_fd is not None:  # this worker's copy only: it never starts processes of its own
        try:
            os.close(alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        try:
            pr_set_pdeathsig = 1
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no prctl (an unusual libc): the watchdog still works
            pass
        if os.getppid() != parent:  # the parent died before the death signal was armed
            os._exit(1)

    hang_up = select.POLLHUP | getattr(select, "POLLRDHUP", 0)

    def watch() -> None:
        poller = select.poll()
        poller.register(conn.fileno(), hang_up)
        while True:
            for _, events in poller.poll(PARENT_POLL_S * 1000):
                if events & hang_up:
                    os._exit(1)

    threading.Thread(target=watch, name="craft-bench-main-process-watchdog", daemon=True).start()


def _worker_main(
    conn: Connection, spec: gym.envs.registration.EnvSpec, env_kwargs: dict[str, Any], counters: Any
) -> None:
    """Serve requests until the pipe closes or a None request arrives. `counters` is shared memory: [ready (0 while
    starting or constructing an env, else 1), env calls finished in the current request], read by the main process
    to tell a hung worker from a busy one."""
    die_with_main_process(conn)
    import craft_bench  # noqa: F401  (registers the craft/* ids in this process)

    def count_call() -> None:
        counters[1] += 1

    def constructing(flag: bool) -> None:
        counters[0] = 0 if flag else 1

    host = _EnvHost(spec, env_kwargs, on_call=count_call, on_construct=constructing)
    counters[0] = 1
    while True:
        try:
            request = conn.recv()
        except (EOFError, KeyboardInterrupt):
            break
        if request is None:
            break
        cpu_start = time.process_time()
        results = host.serve(request)
        try:
            conn.send((results, time.process_time() - cpu_start))
        except Exception:  # an unpicklable observation or info: report it rather than die and be replayed in vain
            error = traceback.format_exc()
            conn.send(([(False, error)] * len(results), time.process_time() - cpu_start))
    host.close()


# ---------------------------------------------------------------------------------------------- worker pools
class WorkerPool(ABC):
    """Runs batches of env commands on `num_workers` workers. Backend-specific: local processes, Ray actors.

    `timeout_s` (None: no limit) bounds every env call of a request; a pool that cannot see single calls may bound a
    request by `timeout_s` times its number of calls instead (documented by the pool).
    """

    num_workers: int
    timeout_s: float | None = None

    @abstractmethod
    def call(self, requests: dict[int, Request]) -> dict[int, Reply | WorkerLost]:
        """Send each worker its request and gather every reply; a worker that died or missed the timeout answers a
        `WorkerLost` and has already been replaced by a fresh worker holding no environments."""

    @abstractmethod
    def close(self) -> None:
        """Stop every worker."""


class InProcessPool(WorkerPool):
    """One "worker" that is the calling process itself: no processes, no pickling. For debugging (breakpoints reach
    the env), and as the baseline that shows what worker processes cost. It has no timeout: nothing can interrupt a
    call of this very process."""

    num_workers = 1

    def __init__(self, spec: gym.envs.registration.EnvSpec, env_kwargs: dict[str, Any]):
        self._host = _EnvHost(spec, env_kwargs)

    def call(self, requests: dict[int, Request]) -> dict[int, Reply | WorkerLost]:
        replies: dict[int, Reply | WorkerLost] = {}
        for worker, request in requests.items():
            cpu_start = time.process_time()
            replies[worker] = (self._host.serve(request), time.process_time() - cpu_start)
        return replies

    def close(self) -> None:
        self._host.close()


#: Local pools open in this process; closing the last one stops the forkserver (see `_stop_forkserver`).
_OPEN_LOCAL_POOLS: weakref.WeakSet[LocalProcessPool] = weakref.WeakSet()


def _kill_processes(processes: list[mp.process.BaseProcess | None]) -> None:
    """SIGKILL and reap: the only signal a stopped (SIGSTOP) or stuck process obeys at once."""
    for process in processes:
        if process is not None and process.pid is not None:
            if process.exitcode is None:
                try:
                    os.kill(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.join(timeout=5)


def _stop_forkserver() -> None:
    """Stop this process's forkserver (it is restarted on demand by the next forkserver process start)."""
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    stop = getattr(server, "_stop", None)
    if stop is not None and getattr(server, "_forkserver_pid", None) is not None:
        stop()


class LocalProcessPool(WorkerPool):
    """Worker processes on this machine, one pipe each. The default start method is forkserver: safe when the
    main process runs torch threads, and a restart forks from a small clean server instead of a fresh interpreter.
    As with spawn, a script that makes a runner must guard its entry with `if __name__ == "__main__":`.

    `timeout_s` bounds every single env call (workers count finished calls in shared memory); None waits forever.
    """

    def __init__(
        self,
        spec: gym.envs.registration.EnvSpec,
        env_kwargs: dict[str, Any],
        num_workers: int,
        start_method: str = "forkserver",
        timeout_s: float | None = DEFAULT_TIMEOUT_S,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self._spec = spec
        self._env_kwargs = env_kwargs
        self._start_method = start_method
        self._context = mp.get_context(start_method)
        self._processes: list[mp.process.BaseProcess | None] = [None] * num_workers
        self._conns: list[Connection | None] = [None] * num_workers
        self._counters: list[Any] = [None] * num_workers
        self._causes: dict[int, str] = {}
        # Kills the workers if the pool is garbage collected or the interpreter exits unclosed: multiprocessing's
        # own exit handler only sends SIGTERM to daemon workers, which a stopped worker never acts on, and then
        # waits for it forever.
        self._finalizer = weakref.finalize(self, _kill_processes, self._processes)
        _OPEN_LOCAL_POOLS.add(self)
        for worker in range(num_workers):
            self._start(worker)

    @property
    def pids(self) -> list[int]:
        """Process id of every worker (tests kill them to check that no episode is lost)."""
        return [process.pid for process in self._processes if process is not None]

    def _start(self, worker: int) -> None:
        parent_conn, child_conn = self._context.Pipe(duplex=True)
        counters = self._context.RawArray("q", 2)
        process = self._context.Process(
            target=_worker_main,
            args=(child_conn, self._spec, self._env_kwargs, counters),
            name=f"craft-bench-env-worker-{worker}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        self._processes[worker] = process
        self._conns[worker] = parent_conn
        self._counters[worker] = counters

    def _restart(self, worker: int) -> None:
        process, conn = self._processes[worker], self._conns[worker]
        if conn is not None:
            conn.close()
        if process is not None:
            if process.is_alive():
                process.kill()
            process.join()
        self._start(worker)

    @staticmethod
    def _describe_exit(process: mp.process.BaseProcess) -> str:
        process.join(timeout=5)
        code = process.exitcode
        if code is None:
            return "pipe closed, process still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def call(self, requests: dict[int, Request]) -> dict[int, Reply | WorkerLost]:
        replies: dict[int, Reply | WorkerLost] = {}
        waiting: dict[Any, int] = {}
        # worker -> (ready, calls done, when either last changed): a worker is hung when neither moves for the
        # timeout (or, while it starts or constructs an env, for the start-up limit).
        progress: dict[int, tuple[int, int, float]] = {}
        for worker, request in requests.items():
            conn, counters = self._conns[worker], self._counters[worker]
            assert conn is not None and counters is not None
            counters[1] = 0
            try:
                conn.send(request)
            except (BrokenPipeError, ConnectionResetError, EOFError, OSError):
                replies[worker] = WorkerLost(self._describe_exit(self._processes[worker]), calls_done=0)
                continue
            waiting[conn] = worker
            waiting[self._processes[worker].sentinel] = worker
            progress[worker] = (counters[0], 0, time.monotonic())
        while waiting:
            for ready in wait(list(waiting), self._wait_seconds(progress, set(waiting.values()))):
                worker = waiting.get(ready)
                if worker is None or worker in replies:
                    continue
                conn = self._conns[worker]
                if ready is conn or conn.poll():
                    try:
                        replies[worker] = conn.recv()
                    except (EOFError, ConnectionResetError, OSError):
                        replies[worker] = WorkerLost(
                            self._describe_exit(self._processes[worker]), calls_done=self._counters[worker][1]
                        )
                else:  # the process exited without a reply pending in the pipe
                    replies[worker] = WorkerLost(
                        self._describe_exit(self._processes[worker]), calls_done=self._counters[worker][1]
                    )
                waiting.pop(conn, None)
                waiting.pop(self._processes[worker].sentinel, None)
            for worker in self._hung(progress, set(waiting.values())):
                replies[worker] = self._kill_hung(worker)
                waiting.pop(self._conns[worker], None)
                waiting.pop(self._processes[worker].sentinel, None)
        for worker, reply in replies.items():
            if isinstance(reply, WorkerLost):
                self._restart(worker)
        return replies

    def _limit(self, started: int) -> float:
        assert self.timeout_s is not None
        return self.timeout_s if started else max(self.timeout_s, STARTUP_TIMEOUT_S)

    def _wait_seconds(self, progress: dict[int, tuple[int, int, float]], workers: set[int]) -> float | None:
        """How long `wait` may block: until the earliest deadline among the workers still owing a reply, and no
        longer than `timeout_s` (a worker still starting has a longer limit, but the start ends its grace)."""
        if self.timeout_s is None or not workers:
            return None
        deadline = min(progress[worker][2] + self.timeout_s for worker in workers)
        return max(deadline - time.monotonic(), 0.0) + 0.01

    def _hung(self, progress: dict[int, tuple[int, int, float]], workers: set[int]) -> list[int]:
        """Workers that finished no call (and did not start) for longer than the limit; refreshes the others."""
        if self.timeout_s is None:
            return []
        now, hung = time.monotonic(), []
        for worker in sorted(workers):
            counters = self._counters[worker]
            started, calls, since = progress[worker]
            if (counters[0], counters[1]) != (started, calls):
                progress[worker] = (counters[0], counters[1], now)
            elif now - since > self._limit(started) and not self._conns[worker].poll():
                hung.append(worker)
        return hung

    def _kill_hung(self, worker: int) -> WorkerLost:
        process, counters = self._processes[worker], self._counters[worker]
        started, calls = counters[0], counters[1]
        process.kill()
        process.join()
        what = f"missed the {self.timeout_s:g} s timeout" if started else (
            f"did not start or construct its env within {self._limit(0):g} s"
        )
        return WorkerLost(f"{what} (stopped, or stuck in a call) and was killed", timed_out=True,
                          calls_done=calls if started else None)

    def close(self) -> None:
        for conn in self._conns:
            if conn is not None:
                try:
                    conn.send(None)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    pass
        deadline = time.monotonic() + 5
        for process in self._processes:
            if process is not None:
                # An idle worker exits at once; a stopped or stuck one never reads the None and is killed.
                process.join(timeout=max(deadline - time.monotonic(), 0.0))
        _kill_processes(self._processes)
        for worker, conn in enumerate(self._conns):
            if conn is not None:
                conn.close()
            self._processes[worker] = None
            self._conns[worker] = None
        _OPEN_LOCAL_POOLS.discard(self)
        if self._start_method == "forkserver" and not _OPEN_LOCAL_POOLS:
            _stop_forkserver()


# ---------------------------------------------------------------------------------------------- the runner
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
        import craft_bench  # noqa: F401  (registers the craft/* ids before the spec lookup)

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
        self._worker_of = [slot % self.num_workers for slot in range(self.num_slots)]
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
        playing = [slot for slot in range(self.num_slots) if self.active[slot]]
        requests = {
            worker: ("step", [(slot, actions[slot]) for slot in slots])
            for worker, slots in self._slots_by_worker(playing).items()
        }
        results = self._call(requests)
        self.stats.env_steps += len(playing)
        steps: list[SlotStep | None] = [None] * self.num_slots
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
