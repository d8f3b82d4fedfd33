"""Two training steps on the Counter env, run by the data-parallel test once alone and once under torchrun with two
gloo processes: rank 0 writes each step's metrics and the weights after each step to the output file.
Arguments: method, output file, run directory, and optionally mini_batch_rows (several updates per step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import fake_envs  # noqa: E402,F401  (registers craft_test/*)

from craft_bench.agents.distributed import DataParallel  # noqa: E402
from craft_bench.agents.trainer import TrainConfig, Trainer  # noqa: E402

MODEL = Path(__file__).parent / "data" / "h1_tiny_test_model"


def main(method: str, out: str, run_dir: str, mini_batch_rows: str = "") -> None:
    torch.set_num_threads(1)
    options = {"alpha": 0.01, "h": 0.01} if method == "grpo" else {"alpha": 0.01, "kappa": 2.0}
    config = TrainConfig(
        method=method, method_options=options, env_id=fake_envs.COUNTER_ENV_ID, env_kwargs={"num_tasks": 8},
        model=str(MODEL), steps=2, tasks_per_step=4, group_size=3, max_turns=4, temperature=1.0,
        max_new_tokens=6, lr=1e-3, num_workers=0, micro_batch_rows=5, eval_split="train",
        mini_batch_rows=int(mini_batch_rows) if mini_batch_rows else None,
    )
    dp = DataParallel.from_environment("cpu")
    trainer = Trainer(config, Path(run_dir) / f"rank{dp.rank}", progress=False, data_parallel=dp)
    records = []
    try:
        for step in range(config.steps):
            row = trainer.train_step(step)
            weights = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
            records.append((row, weights))
    finally:
        trainer.close()
    # How much of the trained model this rank holds: all of it, or its shard under FSDP2.
    local = sum(getattr(p, "_local_tensor", p).numel() for p in trainer.train_model.parameters())
    whole = sum(p.numel() for p in trainer.model.parameters())
    if dp.is_main:
        torch.save({"rows": [r for r, _ in records], "weights": [w for _, w in records], "sharding": dp.sharding,
                    "local_params": local, "whole_params": whole}, out)
    dp.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
