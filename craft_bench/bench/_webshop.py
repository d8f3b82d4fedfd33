"""WebShop rows of `python -m craft_bench.bench envs`: on a 100k-product generated catalogue, the cost of parsing it
and building its BM25 index (once per machine) and of loading both from the caches (every later process), search
latency, and env steps/s under a random and an expert policy (run directly for just these rows:
`python -m craft_bench.bench._webshop`).

The catalogue is `craft/WebShopGen-v0` with 100,000 products (generated once and cached under $CRAFT_BENCH_HOME;
generation itself is not timed). Searches use distinct instruction queries, each searched once with the query memo
cleared, so every search scores the whole index. Steps exclude resets, which are timed apart.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

ENV_ID = "craft/WebShopGen-v0"
N_PRODUCTS = 100_000
#: Enough goals for WebShop's test split (500) and more; the benchmark plays test tasks.
N_GOALS = 1_000


def _env(n_products: int) -> Any:
    from craft_bench.envs.webshop_gen import WebShopGenEnv

    return WebShopGenEnv(split="test", n_products=n_products, n_goals=min(N_GOALS, n_products))


def load_and_index(n_products: int) -> dict[str, float]:
    """CPU seconds of the once-per-machine work (parse WebShop's JSON files, build the BM25 index) and of what every
    later process does instead (unpickle the parsed catalogue, memory-map the saved index)."""
    from craft_bench.envs import webshop

    env = _env(n_products)
    env.catalogue.search  # noqa: B018  (generation and the on-disk caches, untimed)
    start = time.process_time()
    products, _ = webshop._parse_files(env.data_dir, "all")
    parsed = time.process_time()
    webshop.ProductSearch([webshop.product_document(p) for p in products])
    indexed = time.process_time()
    webshop._CATALOGUES.clear()
    catalogue = webshop.load_catalogue(env.data_dir, "all")
    loaded = time.process_time()
    catalogue.search  # noqa: B018
    mapped = time.process_time()
    return {"parse_s": parsed - start, "index_s": indexed - parsed, "cached_load_s": loaded - indexed,
            "cached_index_s": mapped - loaded, "products": float(len(products))}


def search_latency(n_products: int, n_queries: int) -> dict[str, float]:
    """Wall and CPU milliseconds per uncached search over the whole catalogue, for distinct instruction queries."""
    from craft_bench.envs.webshop import instruction_query

    env = _env(n_products)
    search = env.catalogue.search
    queries = list(dict.fromkeys(instruction_query(goal["instruction"]) for goal in env.catalogue.goals))[:n_queries]
    wall, cpu = [], 0.0
    for query in queries:
        search._memo.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        search.search(query)
        wall.append(time.perf_counter() - start)
        cpu += time.process_time() - cpu_start
    ms = 1000 * np.asarray(wall)
    return {"searches": float(len(ms)), "seconds": float(ms.sum() / 1000), "cpu_seconds": cpu,
            "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)), "mean_ms": float(ms.mean())}


def env_steps(n_products: int, n_steps: int, policy: str, seed: int = 0) -> dict[str, float]:
    """Steps of one env under `policy`: `random` (a uniformly drawn admissible action, the suggested query on the
    search page) or `expert` (the privileged plan's next action); steps, their wall and CPU seconds, resets."""
    env = _env(n_products)
    tasks = env.task_ids
    rng = np.random.default_rng(seed)
    out = dict.fromkeys(["steps", "seconds", "cpu_seconds", "resets", "reset_seconds", "searches"], 0.0)
    episode = 0
    while out["steps"] < n_steps:
        start = time.perf_counter()
        _, info = env.reset(seed=seed + episode, options={"task_id": tasks[episode % len(tasks)]})
        out["reset_seconds"] += time.perf_counter() - start
        out["resets"] += 1
        done = False
        while not done and out["steps"] < n_steps:
            admissible = info["admissible_actions"]
            if policy == "expert" and info["privileged"]["expert_plan"]:
                action = info["privileged"]["expert_plan"][0]
            elif policy in ("random", "expert"):
                action = admissible[int(rng.integers(len(admissible)))]
            else:
                raise ValueError(f"unknown policy {policy!r}; valid: 'random', 'expert'")
            out["searches"] += action.startswith("search[")
            start, cpu_start = time.perf_counter(), time.process_time()
            _, _, terminated, truncated, info = env.step(action)
            out["seconds"] += time.perf_counter() - start
            out["cpu_seconds"] += time.process_time() - cpu_start
            out["steps"] += 1
            done = terminated or truncated
        episode += 1
    return out


def _row(setting: str, count: float, seconds: float, cpu_seconds: float, note: str) -> dict[str, Any]:
    return {
        "env": ENV_ID, "setting": setting, "steps": int(count), "seconds": round(seconds, 3),
        "steps_per_s": count / seconds if seconds > 0 else float("nan"),
        "cpu_steps_per_s": count / cpu_seconds if cpu_seconds > 0 else float("nan"),
        "note": note,
    }


def webshop_rows(n_steps: int, n_products: int = N_PRODUCTS, n_queries: int = 200) -> list[dict[str, Any]]:
    """The WebShop rows: load + index (steps_per_s = products indexed per second), searches per second with their
    latency, and env steps per second under the random and the expert policy."""
    built = load_and_index(n_products)
    first = built["parse_s"] + built["index_s"]
    cached = built["cached_load_s"] + built["cached_index_s"]
    rows = [
        _row("catalogue parse + BM25 index build", built["products"], first, first,
             f"{built['products']:.0f} products, once per machine: parse {built['parse_s']:.1f} s, index "
             f"{built['index_s']:.1f} s CPU (steps/s columns = products per second)"),
        _row("catalogue load, cached", built["products"], cached, cached,
             f"every later process: unpickle {built['cached_load_s']:.1f} s, memory-map index "
             f"{built['cached_index_s']:.2f} s CPU (steps/s columns = products per second)"),
    ]
    latency = search_latency(n_products, n_queries)
    row = _row("search, uncached", latency["searches"], latency["seconds"], latency["cpu_seconds"],
               f"{latency['searches']:.0f} distinct queries: p50 {latency['p50_ms']:.1f} ms, p95 "
               f"{latency['p95_ms']:.1f} ms (steps/s column = searches per second)")
    row.update(search_ms_p50=latency["p50_ms"], search_ms_p95=latency["p95_ms"])
    rows.append(row)
    for policy in ("random", "expert"):
        m = env_steps(n_products, n_steps, policy)
        rows.append(_row(
            "one env" if policy == "random" else "one env, expert policy", m["steps"], m["seconds"], m["cpu_seconds"],
            f"{policy} policy, {m['steps']:.0f} steps ({m['searches']:.0f} searches, memoised per query), "
            f"reset {1000 * m['reset_seconds'] / max(m['resets'], 1):.1f} ms",
        ))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench._webshop", description=__doc__)
    parser.add_argument("--steps", type=int, default=1000, help="environment steps per policy")
    parser.add_argument("--products", type=int, default=N_PRODUCTS, help="catalogue size")
    parser.add_argument("--queries", type=int, default=200, help="distinct queries for the search latency")
    args = parser.parse_args(argv)
    rows = webshop_rows(args.steps, args.products, args.queries)
    width = max(len(r["setting"]) for r in rows)
    print(f"{'setting'.ljust(width)}  steps/s  CPU est.  note")
    for r in rows:
        print(f"{r['setting'].ljust(width)}  {r['steps_per_s']:7.1f}  {r['cpu_steps_per_s']:8.1f}  {r['note']}")


if __name__ == "__main__":
    main()
