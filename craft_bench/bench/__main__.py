"""Entry point of `python -m craft_bench.bench {envs,rollout,losses,train}`: each prints a table of measurements.
Each benchmark lives in its own module with a `main(argv)` function."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {
    "envs": "environment steps per second: raw engines, one craft-bench env, the group runner",
    "rollout": "tokens and environment steps per second during rollouts, teacher-scoring share; --engine hf,vllm "
               "compares rollout engines' tokens/s on the same prompts",
    "losses": "time and peak memory of every method's loss and backward; CRAFT's cost over SDAR",
    "train": "one training step phase by phase against the plain forward/backward limit; TRL GRPOTrainer side by side",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m craft_bench.bench", description=__doc__)
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS), help="; ".join(f"{k}: {v}" for k, v in BENCHMARKS.items()))
    # Everything after the name belongs to that benchmark (so `envs --help` shows the envs benchmark's options).
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options of the benchmark (see NAME --help)")
    args = parser.parse_args(argv)
    importlib.import_module(f"craft_bench.bench.{args.benchmark}").main(args.options)


if __name__ == "__main__":
    main()
