"""`python -m craft_bench.bench envs`: environment steps per second for the raw engines, one craft-bench env, and the
group runner with 1 and N workers; prints the measurements and a summary with the wrapper overhead and runner scaling.

Every env is driven by the same seeded random policy (a uniformly chosen admissible action) over the same tasks, so
the runner does identical work with 1 and N workers. Step time excludes resets, which are timed and counted apart
(they are dominated by loading game files, a different cost from stepping). Family-specific rows (raw engine, plan
caching, ...) come from `craft_bench.bench._textworld` and `craft_bench.bench._alfworld`, imported lazily; a family
whose module or env is not ready is skipped with the reason printed. The Search-QA and WebShop rows (index builds over
100k documents, minutes) run only when asked: `--family-rows searchqa,webshop`. `--pool ray` adds the runner on Ray
actors (`group runner on ray xN`, the same episodes, checked) beside the local rows, and its speed relative to them.

On a shared machine wall time measures other processes' load as much as ours, so every row also gets an idle-core
estimate from CPU time (for the runner: main process + the busiest worker of every round trip, which keeps the cost
of unequal worker loads in), and the header reports how much faster N independent CPU-bound processes run than one
at that moment: a wall-clock scaling can only be judged against it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

import craft_bench
from craft_bench.envs.group_runner import GroupRunner

#: The `what` of the runner row without worker processes (`num_workers=0`): the same episodes as "group runner x1",
#: so the two differ only by what worker processes cost (pickling, round trips).
IN_PROCESS = "group runner in process"
#: Env kwargs for the runner rows unless --env-kwargs is given: a mix of game families at a level where a random
#: policy plays most episodes to truncation, so that stepping, not resetting, dominates the measurement.
DEFAULT_ENV_KWARGS: dict[str, dict[str, Any]] = {
    "craft/TextWorld-v0": {"family": ["coin_collector", "treasure_hunter", "cooking"], "level": 3, "n_games": 2},
}
WRAPPER_OVERHEAD_TARGET = 0.10
#: The columns of the step-time breakdown table, keys of `time_breakdown`.
BREAKDOWN_COLUMNS = ("wall", "main", "busiest worker", "even share", "imbalance", "waiting")
RUNNER_SCALING_TARGET = 1.7


@dataclass(frozen=True)
class BenchRow:
    """One measurement: `what` was measured on `env_id`, at `steps_per_s` environment steps per second."""

    env_id: str
    what: str
    steps_per_s: float
    note: str = ""
    #: Steps per CPU second on the critical path (`RunnerTiming.idle_steps_per_s`, or a family row's
    #: `cpu_steps_per_s`): what idle cores would give, steadier than wall time on a shared machine.
    idle_steps_per_s: float | None = None


@dataclass(frozen=True)
class FamilyBench:
    """Where a family's own rows come from: `module.function(n_steps[, num_workers])` returns rows for `env_ids`;
    the rows named `raw_engine` and `one_env` give the wrapper overhead."""

    env_ids: tuple[str, ...]
    module: str
    function: str
    takes_workers: bool
    raw_engine: str = "raw engine"
    one_env: str = "one env"
    #: Rows that cost minutes (index builds over 100k documents) run only when named in --family-rows.
    opt_in: bool = False


FAMILIES = {
    "textworld": FamilyBench(
        ("craft/TextWorld-v0",),
        "craft_bench.bench._textworld",
        "textworld_rows",
        takes_workers=False,
        raw_engine="raw textworld.start, same infos as wrapper",
        one_env="craft-bench TextWorldEnv",
    ),
    "alfworld": FamilyBench(
        ("craft/ALFWorld-v0", "craft/ALFWorldGen-v0"), "craft_bench.bench._alfworld", "alfworld_rows", True
    ),
    "searchqa": FamilyBench(
        ("craft/SearchQAGen-v0",), "craft_bench.bench._searchqa", "searchqa_rows", True, opt_in=True
    ),
    "webshop": FamilyBench(
        ("craft/WebShopGen-v0",), "craft_bench.bench._webshop", "webshop_rows", False, opt_in=True
    ),
}
#: The `what` prefix of the runner rows on Ray actors (`--pool ray`), beside the local "group runner xN" rows.
RAY_RUNNER = "group runner on ray"


@dataclass
class RunnerTiming:
    """What one policy run measured: steps and their time, resets and theirs, and a fingerprint of the results."""

    steps: int = 0
    step_seconds: float = 0.0
    #: CPU seconds on the critical path of the steps: the main process's plus, per round trip, the busiest worker's.
    step_cpu_seconds: float = 0.0
    resets: int = 0
    reset_seconds: float = 0.0
    fingerprint: int = 0
    #: Where the step time goes (`time_breakdown`): the main process's CPU seconds, all workers' CPU seconds, the
    #: round trips, and the number of worker processes (0: envs in the main process).
    main_cpu_seconds: float = 0.0
    worker_cpu_seconds: float = 0.0
    round_trips: int = 0
    workers: int = 0

    @property
    def steps_per_s(self) -> float:
        return self.steps / self.step_seconds if self.step_seconds > 0 else float("nan")

    @property
    def idle_steps_per_s(self) -> float:
        """Steps per second on idle cores (estimate): contention from other processes stretches wall time, not the
        CPU time on the critical path."""
        return self.steps / self.step_cpu_seconds if self.step_cpu_seconds > 0 else float("nan")


def time_breakdown(timing: RunnerTiming) -> dict[str, float]:
    """Where a runner's step time goes, in milliseconds per env step: `wall`; `main`, the main process's CPU
    (choosing actions, sending requests, unpickling replies); `busiest worker`, the CPU of the busiest worker of each
    round trip, which the main process waits for; of it, `imbalance`, what it exceeds an even share of all workers'
    CPU by (time the other workers sit idle); and `waiting`, the wall time neither accounts for (pipe latency,
    process wake-ups, other processes' load). With N workers on N idle cores, wall ~ main + busiest worker + waiting,
    and the even share is the part that more workers divide."""
    steps = max(timing.steps, 1)
    per_step = 1000.0 / steps
    busiest = (timing.step_cpu_seconds - timing.main_cpu_seconds) if timing.workers else 0.0
    even_share = timing.worker_cpu_seconds / timing.workers if timing.workers else 0.0
    return {
        "wall": timing.step_seconds * per_step,
        "main": timing.main_cpu_seconds * per_step,
        "busiest worker": busiest * per_step,
        "even share": even_share * per_step,
        "imbalance": (busiest - even_share) * per_step,
        "waiting": (timing.step_seconds - timing.main_cpu_seconds - busiest) * per_step,
        "steps per round trip": timing.steps / timing.round_trips if timing.round_trips else float("nan"),
    }


def as_row(row: Any) -> BenchRow:
    """Accept a BenchRow, a mapping with env (or env_id), setting (or what), steps_per_s and optional
    cpu_steps_per_s (steps per CPU second, the contention-free estimate), steps and seconds or note, or a tuple
    (env_id, what, steps_per_s[, note])."""
    if isinstance(row, BenchRow):
        return row
    if isinstance(row, Mapping):
        note = str(row.get("note", ""))
        if not note and "steps" in row and "seconds" in row:
            note = f"{row['steps']} steps in {float(row['seconds']):.2f} s"
        cpu_rate = row.get("cpu_steps_per_s")
        return BenchRow(
            str(row.get("env_id", row.get("env"))),
            str(row.get("what", row.get("setting"))),
            float(row["steps_per_s"]),
            note,
            None if cpu_rate is None else float(cpu_rate),
        )
    if isinstance(row, Sequence) and 3 <= len(row) <= 4:
        return BenchRow(str(row[0]), str(row[1]), float(row[2]), str(row[3]) if len(row) == 4 else "")
    raise TypeError(f"a benchmark row must be a BenchRow, a mapping or a 3- or 4-tuple, got {row!r:.200}")


def random_admissible_action(info: dict[str, Any], rng: np.random.Generator) -> str:
    admissible = info.get("admissible_actions") or []
    # An empty list still gets a (then invalid) action: it counts as a step, as the env contract says.
    return str(admissible[int(rng.integers(len(admissible)))]) if admissible else "look"


def benchmark_tasks(env_id: str, env_kwargs: dict[str, Any], count: int) -> list[str]:
    env = gym.make(env_id, disable_env_checker=True, **env_kwargs)
    try:
        tasks = list(env.unwrapped.task_ids)
    finally:
        env.close()
    if not tasks:
        raise RuntimeError(f"{env_id} has no tasks with {env_kwargs}")
    return [tasks[index % len(tasks)] for index in range(count)]


def play_group_runner(
    runner: GroupRunner, tasks: Sequence[str], group_size: int, n_steps: int, seed: int
) -> RunnerTiming:
    """The policy on B = len(tasks) groups of `group_size` siblings, lockstep steps until `n_steps` are played."""
    rng = np.random.default_rng(seed)
    timing = RunnerTiming()
    fingerprint: list[Any] = []
    round_index = 0
    while timing.steps < n_steps:
        start = time.perf_counter()
        _, infos = runner.reset(tasks, group_size, seed=seed + round_index)
        timing.reset_seconds += time.perf_counter() - start
        timing.resets += runner.num_slots
        while any(runner.active) and timing.steps < n_steps:
            actions = [
                random_admissible_action(infos[slot], rng) if active else None
                for slot, active in enumerate(runner.active)
            ]
            stats = runner.stats
            start, cpu_start = time.perf_counter(), time.process_time()
            critical_start, worker_start, trips_start = stats.critical_cpu_s, stats.worker_cpu_s, stats.round_trips
            steps = runner.step(actions)
            timing.step_seconds += time.perf_counter() - start
            main_cpu = time.process_time() - cpu_start
            timing.step_cpu_seconds += main_cpu
            timing.main_cpu_seconds += main_cpu
            if runner.worker_pids:  # in process, the envs' CPU time is already this process's
                timing.step_cpu_seconds += stats.critical_cpu_s - critical_start
                timing.worker_cpu_seconds += stats.worker_cpu_s - worker_start
                timing.round_trips += stats.round_trips - trips_start
                timing.workers = len(runner.worker_pids)
            for slot, result in enumerate(steps):
                if result is not None:
                    infos[slot] = result.info
                    timing.steps += 1
                    fingerprint.append((slot, result.obs, result.reward, result.terminated, result.truncated))
        round_index += 1
    timing.fingerprint = hash(tuple(fingerprint))
    return timing


def measure_env(
    env_id: str, env_kwargs: dict[str, Any], tasks: Sequence[str], group_size: int, worker_counts: Sequence[int],
    n_steps: int, repeats: int, seed: int, ray_options: dict[str, Any] | None = None,
) -> dict[str, RunnerTiming]:
    """Best of `repeats` runs of each setting (the runner in process, then with each worker count, then on Ray
    actors with each worker count when `ray_options` holds GroupRunner's `ray_*` arguments), interleaved so that a
    burst of load from other processes on this shared machine hits every setting alike; the first reset of every
    task (engine start-up, game loading, in every worker) is untimed."""
    runners: dict[str, GroupRunner] = {}
    try:
        for workers in [0, *worker_counts]:
            name = IN_PROCESS if workers == 0 else f"group runner x{workers}"
            runners[name] = GroupRunner(env_id, env_kwargs, num_workers=workers)
        if ray_options is not None:
            for workers in worker_counts:
                runners[f"{RAY_RUNNER} x{workers}"] = GroupRunner(
                    env_id, env_kwargs, num_workers=workers, pool="ray", **ray_options
                )
        for runner in runners.values():
            runner.reset(tasks, group_size, seed=seed)
        settings: dict[str, Callable[[], RunnerTiming]] = {
            name: (lambda runner=runner: play_group_runner(runner, tasks, group_size, n_steps, seed))
            for name, runner in runners.items()
        }
        best: dict[str, RunnerTiming] = {}
        for _ in range(repeats):
            for name, play in settings.items():
                timing = play()
                if name not in best or timing.steps_per_s > best[name].steps_per_s:
                    best[name] = timing
        return best
    finally:
        for runner in runners.values():
            runner.close()


def _spin(iterations: int) -> int:
    total = 0
    for index in range(iterations):
        total += index * index
    return total


def machine_scaling(num_workers: int, iterations: int = 2_000_000) -> float:
    """How much faster `num_workers` processes finish `num_workers` equal CPU-bound jobs than one process does: the
    scaling this machine offers right now (num_workers when idle; near 1 when other processes fill the cores)."""
    context = mp.get_context("forkserver")
    seconds = []
    for processes in (1, num_workers):
        with context.Pool(processes) as pool:
            pool.map(_spin, [1] * processes)  # start-up and imports, untimed
            start = time.perf_counter()
            pool.map(_spin, [iterations] * num_workers, chunksize=1)
            seconds.append(time.perf_counter() - start)
    return seconds[0] / seconds[1]


def family_rows(family: str, n_steps: int, num_workers: int, env_ids: Sequence[str]) -> tuple[list[BenchRow], str]:
    """The family module's rows, or no rows and the reason they are missing."""
    bench = FAMILIES[family]
    try:
        module = importlib.import_module(bench.module)
    except ModuleNotFoundError as error:
        if error.name != bench.module:
            raise
        return [], f"{family}: skipped family rows ({bench.module} does not exist yet)"
    function: Callable[..., Any] = getattr(module, bench.function)
    try:
        rows = function(n_steps, num_workers) if bench.takes_workers else function(n_steps)
    except Exception as error:  # a family whose env is not ready must not hide the others' numbers
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return [], f"{family}: skipped family rows ({type(error).__name__}: {first_line})"
    selected = [as_row(row) for row in rows]
    return [row for row in selected if row.env_id in env_ids or row.env_id == family], ""


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], right_aligned: Sequence[int] = ()) -> str:
    """Plain text with aligned columns; the columns numbered in `right_aligned` (numbers) are aligned right."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if index in right_aligned else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * width for width in widths), *[line(row) for row in rows]])


def family_of(env_id: str) -> FamilyBench | None:
    return next((bench for bench in FAMILIES.values() if env_id in bench.env_ids), None)


def summary_rows(env_ids: Sequence[str], rows: Sequence[BenchRow], num_workers: int) -> list[list[str]]:
    """Per env: the compared rows, the wrapper overhead (time per step of one env over the raw engine's, minus one),
    the runner's cost over the in-process env with 1 worker, and its scaling from 1 to N workers."""

    def rate(value: float | None) -> str:
        return f"{value:.0f}" if value else "n/a"

    def overhead(raw: float | None, wrapped: float | None) -> str:
        if not (raw and wrapped):
            return "n/a"
        # Judged at the printed precision, so that a printed "+10.0%" never reads MISSED against a 10% target.
        ratio = round(raw / wrapped - 1, 3)
        return f"{ratio:+.1%} " + ("ok" if ratio <= WRAPPER_OVERHEAD_TARGET else "MISSED")

    def scaling(fast: float | None, slow: float | None) -> str:
        if not (fast and slow) or num_workers == 1:
            return "n/a"
        ratio = round(fast / slow, 2)
        return f"{ratio:.2f}x " + ("ok" if ratio >= RUNNER_SCALING_TARGET else "MISSED")

    table = []
    for env_id in env_ids:
        by_what = {row.what: row.steps_per_s for row in rows if row.env_id == env_id}
        idle = {row.what: row.idle_steps_per_s for row in rows if row.env_id == env_id}
        if not by_what:
            continue
        family = family_of(env_id)
        raw = by_what.get(family.raw_engine) if family else None
        one_env = by_what.get(family.one_env) if family else None
        in_process = by_what.get(IN_PROCESS)
        runner_1, runner_n = by_what.get("group runner x1"), by_what.get(f"group runner x{num_workers}")
        runner_cost = f"{in_process / runner_1 - 1:+.1%}" if in_process and runner_1 else "n/a"
        table.append([
            env_id, rate(raw), rate(one_env), rate(in_process), rate(runner_1), rate(runner_n),
            overhead(raw, one_env),
            overhead(idle.get(family.raw_engine) if family else None, idle.get(family.one_env) if family else None),
            runner_cost,
            scaling(runner_n, runner_1),
            scaling(idle.get(f"group runner x{num_workers}"), idle.get("group runner x1")),
        ])
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench envs", description=__doc__)
    parser.add_argument("--envs", default=",".join(craft_bench.ENV_IDS), help="comma-separated env ids")
    parser.add_argument("--steps", type=int, default=1000, help="environment steps per measurement")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N, the runner's larger worker count")
    # A GRPO-sized batch by default: with few slots, episodes of unequal length leave workers unevenly loaded.
    parser.add_argument("--tasks", type=int, default=6, help="B, tasks per runner batch")
    parser.add_argument("--group-size", type=int, default=8, help="G, siblings per task")
    parser.add_argument("--repeats", type=int, default=3, help="runs per setting, interleaved; the fastest is kept")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random policy and of the resets")
    parser.add_argument(
        "--env-kwargs", type=json.loads, default=None,
        help=f"JSON dict of kwargs for every env's runner rows (default: {json.dumps(DEFAULT_ENV_KWARGS)} by id)",
    )
    parser.add_argument("--pool", choices=["local", "ray"], default="local",
                        help="ray: also measure the runner on Ray actors (the same episodes), beside the local rows")
    parser.add_argument("--ray-address", default=None,
                        help="with --pool ray: None starts a local Ray, 'auto' joins a cluster, 'ray://host:port'")
    parser.add_argument("--ray-cpus-per-worker", type=float, default=None,
                        help="with --pool ray: CPUs each env actor reserves (default: min(1, cores / (1 + workers)), "
                             "so that the x1 and xN runners' actors fit on this machine together)")
    opt_in = sorted(name for name, bench in FAMILIES.items() if bench.opt_in)
    parser.add_argument("--family-rows", default="",
                        help=f"comma-separated opt-in family rows to add ({', '.join(opt_in)}): slow, they build "
                             "indexes over 100k documents")
    args = parser.parse_args(argv)
    wanted_opt_in = {name.strip() for name in args.family_rows.split(",") if name.strip()}
    if wanted_opt_in - set(opt_in):
        parser.error(f"unknown --family-rows {sorted(wanted_opt_in - set(opt_in))}; valid: {opt_in}")
    if min(args.steps, args.workers, args.tasks, args.group_size, args.repeats) < 1:
        parser.error("--steps, --workers, --tasks, --group-size and --repeats must all be >= 1")
    env_ids = [env_id.strip() for env_id in args.envs.split(",") if env_id.strip()]
    unknown = [env_id for env_id in env_ids if env_id not in gym.registry]
    if unknown:
        parser.error(f"unknown env id(s) {unknown}; registered craft ids: {sorted(craft_bench.ENV_IDS)}")

    rows: list[BenchRow] = []
    notes: list[str] = []
    for family, bench in FAMILIES.items():
        if bench.opt_in and family not in wanted_opt_in:
            continue
        if any(env_id in bench.env_ids for env_id in env_ids):
            family_result, note = family_rows(family, args.steps, args.workers, env_ids)
            rows.extend(family_result)
            if note:
                notes.append(note)

    worker_counts = sorted({1, args.workers})
    ray_options = None
    if args.pool == "ray":
        cpus = args.ray_cpus_per_worker
        if cpus is None:
            cpus = min(1.0, (os.cpu_count() or 1) / (1 + args.workers))
        ray_options = {"ray_address": args.ray_address, "ray_cpus_per_worker": cpus}
    breakdown: list[list[str]] = []
    for env_id in env_ids:
        env_kwargs = DEFAULT_ENV_KWARGS.get(env_id, {}) if args.env_kwargs is None else args.env_kwargs
        try:
            tasks = benchmark_tasks(env_id, env_kwargs, args.tasks)
        except Exception as error:  # an env that is not ready (no data, no module) is reported, not fatal
            first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
            notes.append(f"{env_id}: skipped runner rows ({type(error).__name__}: {first_line})")
            continue
        timings = measure_env(
            env_id, env_kwargs, tasks, args.group_size, worker_counts, args.steps, args.repeats, args.seed,
            ray_options,
        )
        for name, timing in timings.items():
            shape = f"B={args.tasks} G={args.group_size}, "
            resets = f", {timing.resets / timing.reset_seconds:.0f} resets/s" if timing.reset_seconds > 0 else ""
            note = f"{shape}{timing.steps} steps{resets}"
            rows.append(BenchRow(env_id, name, timing.steps_per_s, note, timing.idle_steps_per_s))
            parts = time_breakdown(timing)
            breakdown.append([env_id, name] + [f"{parts[key]:.3f}" for key in BREAKDOWN_COLUMNS]
                             + [f"{parts['steps per round trip']:.1f}"])
        if len({timing.fingerprint for timing in timings.values()}) != 1:
            notes.append(
                f"{env_id}: WARNING the runner's results differed between its settings {sorted(timings)}"
            )
        for workers in worker_counts if ray_options is not None else ():
            ray_rate = timings[f"{RAY_RUNNER} x{workers}"].steps_per_s
            local_rate = timings[f"group runner x{workers}"].steps_per_s
            notes.append(f"{env_id}: Ray actors x{workers} run at {ray_rate / local_rate:.2f}x the local workers' "
                         "steps/s on the same episodes")

    print(
        f"Environment steps per second ({args.steps} steps per measurement, best of {args.repeats}, "
        f"cpu count {os.cpu_count()}, load average {os.getloadavg()[0]:.1f} at the end; machine check: "
        f"{args.workers} independent CPU-bound processes run {machine_scaling(args.workers):.2f}x as fast as 1, "
        f"{args.workers}x when the cores are free)"
    )
    print(format_table(
        ["env", "measured", "steps/s", "idle-core est. (CPU)", "note"],
        [
            [
                row.env_id, row.what, f"{row.steps_per_s:.0f}",
                f"{row.idle_steps_per_s:.0f}" if row.idle_steps_per_s else "", row.note,
            ]
            for row in rows
        ],
        right_aligned=[2, 3],
    ))
    print()
    print(
        f"Summary: wrapper overhead = raw engine steps/s / one env steps/s - 1, from the family's rows, in wall and "
        f"CPU time (target <= {WRAPPER_OVERHEAD_TARGET:.0%}); "
        "runner x1 cost = in-process runner steps/s / runner x1 steps/s - 1 (same episodes); "
        f"scaling = runner x{args.workers} / runner x1 (target >= {RUNNER_SCALING_TARGET}x), measured and estimated "
        "for idle cores (steps / CPU seconds on the critical path: main process + busiest worker per round trip)"
    )
    print(format_table(
        [
            "env", "raw engine", "one env", "in process", "runner x1", f"runner x{args.workers}",
            "wrapper overhead", "wrapper overhead, CPU", "runner x1 cost", "scaling", "scaling, idle est.",
        ],
        summary_rows(env_ids, rows, args.workers),
        right_aligned=range(1, 11),
    ))
    if breakdown:
        print()
        print("Where the runner's step time goes (ms per env step; `time_breakdown`): busiest worker = the CPU of "
              "each round trip's busiest worker, which the main process waits for; even share = all workers' CPU / "
              "N, the part more workers divide; imbalance = busiest worker - even share; waiting = wall - main - "
              "busiest worker (pipe latency, wake-ups, load)")
        print(format_table(["env", "runner", *BREAKDOWN_COLUMNS, "steps per round trip"], breakdown,
                           right_aligned=range(2, 3 + len(BREAKDOWN_COLUMNS))))
    for note in notes:
        print(f"note: {note}")
