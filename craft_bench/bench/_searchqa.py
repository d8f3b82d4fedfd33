"""Search-QA rows of `python -m craft_bench.bench envs`: generating a ~100k-passage corpus, building its bm25s index,
searches per second, env steps per second and a worker's memory (run directly for just these rows).

Each measurement runs in a fresh spawned process, so build time, peak memory and a worker's resident memory are
those of that job alone and not of whatever this process imported or cached before. `$CRAFT_BENCH_HOME` decides
where the corpus and index are cached; a second run reuses them (its rows then say `cached`).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

ENV_ID = "craft/SearchQAGen-v0"
#: Questions per family (the env defaults) and a world scale that make a corpus of about 100k passages.
DEFAULT_PASSAGES = 100_000
_PASSAGES_PER_UNIT_SCALE = 3_835  # the corpus size of SearchQAGen-v0's defaults (world_scale=1)


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _build_job(world_scale: float) -> dict[str, Any]:
    """Generate the data set and build the index, in this (fresh) process."""
    from craft_bench.envs import searchqa_gen
    from craft_bench.envs.retrieval import BM25Retriever, Corpus

    config = searchqa_gen.GenConfig(world_scale=world_scale)
    start, cpu = time.perf_counter(), _cpu()
    root = searchqa_gen.cached_dataset(config)
    gen_s, gen_cpu = time.perf_counter() - start, _cpu() - cpu
    start, cpu = time.perf_counter(), _cpu()
    corpus = Corpus(root / "corpus.jsonl")
    retriever = BM25Retriever(corpus)
    build_s, build_cpu = time.perf_counter() - start, _cpu() - cpu
    index_bytes = sum(p.stat().st_size for p in retriever.index_dir.iterdir())
    return {"passages": len(corpus), "gen_s": gen_s, "gen_cpu": gen_cpu, "build_s": build_s,
            "build_cpu": build_cpu, "index_built": retriever.built, "peak_rss_mib": _peak_rss_mib(),
            "index_mib": index_bytes / 2**20}


def _serve_job(world_scale: float, n_steps: int, seed: int) -> dict[str, Any]:
    """Load the cached index memory-mapped (as a worker does), then time raw searches and env steps."""
    import gymnasium as gym
    import numpy as np

    import craft_bench  # noqa: F401  (registers the ids)

    rss_start = _rss_mib()
    start = time.perf_counter()
    env = gym.make(ENV_ID, split="train", world_scale=world_scale, disable_env_checker=True).unwrapped
    load_s = time.perf_counter() - start
    rss_loaded = _rss_mib()
    rng = np.random.default_rng(seed)
    task_ids = env.task_ids
    queries = [hop["query"] for task in rng.choice(task_ids, size=n_steps) for hop in
               env._items[task].metadata["hops"]][:n_steps]
    start, cpu = time.perf_counter(), _cpu()
    for query in queries:
        env.retriever.search([query], env.topk)
    search_s, search_cpu = time.perf_counter() - start, _cpu() - cpu

    # Env steps under the expert with one in four actions replaced by a random search (a wasted turn), so episodes
    # mix searches and answers as a learning agent's do. Reset time is measured apart from step time.
    steps = resets = 0
    step_s = step_cpu = reset_s = 0.0
    while steps < n_steps:
        start = time.perf_counter()
        _, info = env.reset(options={"task_id": str(task_ids[int(rng.integers(len(task_ids)))])})
        reset_s += time.perf_counter() - start
        resets += 1
        done = False
        while not done and steps < n_steps:
            action = info["privileged"]["expert_plan"][0]
            if rng.random() < 0.25:
                action = f"search[{queries[int(rng.integers(len(queries)))]}]"
            start, cpu = time.perf_counter(), _cpu()
            _, _, terminated, truncated, info = env.step(action)
            step_s += time.perf_counter() - start
            step_cpu += _cpu() - cpu
            steps += 1
            done = terminated or truncated
    return {"load_s": load_s, "rss_start_mib": rss_start, "rss_loaded_mib": rss_loaded, "rss_end_mib": _rss_mib(),
            "searches": len(queries), "search_s": search_s, "search_cpu": search_cpu, "steps": steps,
            "step_s": step_s, "step_cpu": step_cpu, "resets": resets, "reset_s": reset_s}


def _in_fresh_process(function: Any, *args: Any) -> dict[str, Any]:
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("nan")


def searchqa_rows(n_steps: int, num_workers: int, passages: int = DEFAULT_PASSAGES) -> list[dict[str, Any]]:
    """The Search-QA rows for `craft/SearchQAGen-v0` on a corpus of about `passages` passages.

    `num_workers` is accepted for the harness's signature (group-runner rows are generic, measured by
    `craft_bench.bench.envs`). Rows: `generate data set` and `index build` (rates in passages/s, times and peak RSS
    in the note), `raw engine` (bm25s searches/s, one query per call as the env issues them) and `one env` (env
    steps/s, memory of a worker that loaded the index memory-mapped).
    """
    del num_workers
    scale = passages / _PASSAGES_PER_UNIT_SCALE
    built = _in_fresh_process(_build_job, scale)
    served = _in_fresh_process(_serve_job, scale, n_steps, 0)
    n = built["passages"]
    cached = "" if built["index_built"] else " (cached: nothing was rebuilt)"
    rows = [
        {"env": ENV_ID, "setting": "generate data set", "steps_per_s": _rate(n, built["gen_s"]),
         "cpu_steps_per_s": _rate(n, built["gen_cpu"]),
         "note": f"passages/s: {n} passages + 3 splits of questions in {built['gen_s']:.2f} s{cached}"},
        {"env": ENV_ID, "setting": "index build", "steps_per_s": _rate(n, built["build_s"]),
         "cpu_steps_per_s": _rate(n, built["build_cpu"]),
         "note": f"passages/s: bm25s index of {n} passages in {built['build_s']:.2f} s, {built['index_mib']:.1f} MiB "
                 f"on disk, build process peak RSS {built['peak_rss_mib']:.0f} MiB{cached}"},
        {"env": ENV_ID, "setting": "raw engine", "steps_per_s": _rate(served["searches"], served["search_s"]),
         "cpu_steps_per_s": _rate(served["searches"], served["search_cpu"]),
         "note": f"searches/s: {served['searches']} bm25s top-3 searches over {n} passages in "
                 f"{served['search_s']:.2f} s"},
        {"env": ENV_ID, "setting": "one env", "steps_per_s": _rate(served["steps"], served["step_s"]),
         "cpu_steps_per_s": _rate(served["steps"], served["step_cpu"]),
         "note": f"{served['steps']} steps in {served['step_s']:.2f} s (expert, 1 in 4 actions a random search); "
                 f"reset {1000 * served['reset_s'] / served['resets']:.2f} ms; worker RSS "
                 f"{served['rss_start_mib']:.0f} MiB at start, {served['rss_loaded_mib']:.0f} MiB after loading "
                 f"the mmap index in {served['load_s']:.2f} s, {served['rss_end_mib']:.0f} MiB after the run"},
    ]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench._searchqa", description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="searches and env steps per measurement")
    parser.add_argument("--passages", type=int, default=DEFAULT_PASSAGES, help="approximate corpus size")
    args = parser.parse_args(argv)
    rows = searchqa_rows(args.steps, 1, args.passages)
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting'.ljust(width)}  per s     CPU est.  note")
    for r in rows:
        print(f"{r['setting'].ljust(width)}  {r['steps_per_s']:8.1f}  {r['cpu_steps_per_s']:8.1f}  {r['note']}")


if __name__ == "__main__":
    main()
