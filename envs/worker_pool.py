"""Worker pools behind the group runner: env hosts in worker processes (or in this process), one request per
worker per lockstep step, timeouts, restarts, and workers that never outlive the main process.
The lockstep, masking and replay logic that uses them is `GroupRunner` (envs/group_runner.py); a Ray pool is
envs/ray_pool.py. Design notes 2, 4, 6 and 7 of envs/group_runner.py describe what happens here."""

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
