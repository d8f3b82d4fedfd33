"""`python -m craft_bench.agents.tiny --env ENV_ID [--budget test|smoke|default]`: the tiny model of an environment
(shipped with craft-bench, else built or found in the cache) and print its path; `--eval N` then measures it with and without the privileged block."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence

import torch

from craft_bench.agents.tiny.budget import BUDGETS
from craft_bench.agents.tiny.build import DEFAULT_ENV_ID, load_metadata, tiny_model_path
from craft_bench.agents.tiny.evaluate import evaluate_success

SUMMARY_KEYS = ("env_id", "env_kwargs", "parameters", "vocab_size", "examples", "prompt_tokens", "collection",
                "epoch_losses", "seconds", "cpu_seconds")


def main(argv: Sequence[str] | None = None) -> None:
    """The first line on stdout is the model's directory (`path=$(python -m craft_bench.agents.tiny ...)`); the
    build summary goes to stderr, evaluation results (JSON, one line each) to stdout after the path."""
    parser = argparse.ArgumentParser(prog="python -m craft_bench.agents.tiny", description=__doc__)
    parser.add_argument("--env", default=DEFAULT_ENV_ID, help=f"a registered env id (default {DEFAULT_ENV_ID})")
    parser.add_argument("--env-kwargs", default="{}", help='JSON dict of env constructor kwargs, e.g. \'{"level": 3}\'')
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", default="default", choices=sorted(BUDGETS))
    parser.add_argument("--eval", type=int, default=0, metavar="N", help="evaluate on N tasks of --split, both prompts")
    parser.add_argument("--split", default="valid", help="held-out split of --eval")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="episode cap of --eval (default: the environment's own)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--workers", type=int, default=None,
                        help="environment processes (default: one per core, at most 4; 0: in this process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--rebuild", action="store_true",
                        help="build the model with this machine's code into the cache even where craft-bench ships "
                             "one (a different model: compare its weights hash before comparing results)")
    args = parser.parse_args(argv)
    try:
        env_kwargs = json.loads(args.env_kwargs)
    except json.JSONDecodeError as error:
        parser.error(f"--env-kwargs is not valid JSON ({error}): {args.env_kwargs!r}")
    if not isinstance(env_kwargs, dict):
        parser.error(f"--env-kwargs must be a JSON object, got {args.env_kwargs!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    path = tiny_model_path(args.env, args.seed, args.budget, progress=not args.quiet, workers=args.workers,
                           env_kwargs=env_kwargs, shipped=not args.rebuild)
    metadata = load_metadata(path)
    print(json.dumps({k: metadata[k] for k in SUMMARY_KEYS if k in metadata}, indent=2), file=sys.stderr)
    print(path, flush=True)
    for with_privileged in (False, True) if args.eval else ():
        result = evaluate_success(path, args.env, args.split, args.eval, with_privileged, args.max_steps,
                                  workers=args.workers, progress=not args.quiet, env_kwargs=env_kwargs)
        print(json.dumps(dataclasses.asdict(result)), flush=True)


if __name__ == "__main__":
    main()
