"""Data-parallel training over accelerate's process group: which task groups each rank plays, and the step-wide
sums the loss needs (token count, gate activity, episode summaries), reduced over ranks so N processes equal one.

How N processes reproduce one process on the same global batch:

1. Every rank draws the step's B tasks from (seed, step) exactly as one process would, then plays the contiguous
   block of B / N groups that is its share (`group_block`); a group is never split, so Pillar 1's sibling credit
   needs nothing from other ranks. Slots, groups and seeds keep their global numbering.
2. The token-mean denominator and every per-step statistic a method needs are sums over the global batch
   (`sum`): each rank's loss is its share of the one-process loss, so the ranks' losses add up to it.
3. DDP averages gradients over ranks, so each rank's loss is scaled by N before backward (`loss_scale`); the
   micro-batches of a rank accumulate locally (`accelerator.no_sync`) and the last one synchronises.
4. Mini-batches (`mini_batch_rows`, several updates per rollout) are global, as verl's ppo_mini_batch_size: the
   step's rows in global order (rank 0's block, then rank 1's, ...) are cut into mini-batches of M rows exactly as
   one process cuts them, and each rank takes its rows of each one (`mini_batch_parts`), possibly none. Every rank
   so takes part in the same number of updates; a rank with no rows in one backpropagates a zero loss on a
   stand-in row, so that it still joins that update's gradient all-reduce.

Sharded training (FSDP2): an accelerate config with `distributed_type: FSDP` and `fsdp_version: 2`
(configs/accelerate/fsdp2_*.yaml) makes the trained copy of the model `fully_shard`ed over the ranks (each decoder
layer a unit, the root the rest), with torch's FSDP2 directly: accelerate 1.15 does not turn FSDP on for a CPU
(gloo) process group, and the same code then runs on GPUs. Gradients, AdamW state and the trained parameters are
sharded; every rank also keeps the whole model (`Trainer.model`), refreshed from the shards after each update
(`copy_full_weights`), for what plays and scores without gradients: sampling, θ_old / teacher / reference scores,
evaluation, the saved model, the vLLM sync, as verl's rollout engine holds the full weights beside FSDP.
Under FSDP every forward pass is a collective, so every rank runs the same number of micro-batches per update
(stand-ins with a zero loss fill in, `Trainer._train_step`). Not supported under FSDP: resuming from a checkpoint
(the optimizer state is sharded; refused with a clear error), FSDP1 (refused).

Launch lines (CPU): `accelerate launch --multi_gpu --num_processes N -m craft_bench.run ...` or
`torchrun --nproc_per_node N -m craft_bench.run ...`. `accelerate launch --cpu` always starts ONE process.
FSDP2 on CPU: `accelerate launch --config_file configs/accelerate/fsdp2_cpu.yaml -m craft_bench.run ...`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch


class LaunchError(ValueError):
    """The process layout cannot play the configured batch (a world size that does not divide the groups)."""


@dataclass
class DataParallel:
    """This process's place in the data-parallel group; the single-process default does no communication."""

    rank: int = 0
    world_size: int = 1
    accelerator: Any | None = None
    """accelerate's `Accelerator` when world_size > 1, else None (a single process never imports accelerate)."""
    sharding: str = "ddp"
    """"ddp" (every rank holds and trains the whole model) or "fsdp2" (the trained copy is sharded)."""
    reshard_after_forward: bool = True
    """FSDP2: free the gathered parameters after each forward (ZeRO-3) or keep them until backward (ZeRO-2)."""

    @classmethod
    def from_environment(cls, device: str = "cpu") -> DataParallel:
        """Join the process group a launcher set up (`WORLD_SIZE` > 1), or stay single-process; the sharding comes
        from accelerate's config (`accelerate launch --config_file`, which exports ACCELERATE_USE_FSDP and FSDP_*)."""
        sharding = sharding_from_environment(os.environ)
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()  # one process: nothing to shard over
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=torch.device(device).type == "cpu")
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower() not in ("false", "no_shard", "shard_grad_op")
        return cls(accelerator.process_index, accelerator.num_processes, accelerator, sharding, reshard)

    def close(self) -> None:
        """Leave the process group (several processes): every rank waits at a barrier, then tears the group down, so
        that no rank exits while the collective backend's threads still run (gloo then aborts the process)."""
        if self.world_size > 1 and torch.distributed.is_initialized():
            self.barrier()
            torch.distributed.destroy_process_group()

    @property
    def sharded(self) -> bool:
        """True when the trained model is FSDP2-sharded over several ranks."""
        return self.sharding == "fsdp2" and self.world_size > 1

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that the differentiable forward and the optimizer use: `model` itself (one process), its DDP
        wrapper, or under FSDP2 a sharded deep copy (`model` stays whole for sampling and no-grad scores)."""
        if self.world_size == 1:
            return model
        if not self.sharded:
            return self.accelerator.prepare_model(model)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        trained = copy.deepcopy(model)
        trained.train()
        device = next(model.parameters()).device
        mesh = init_device_mesh(device.type, (self.world_size,))
        layer_classes = set(getattr(model, "_no_split_modules", None) or ())
        layers = [m for m in trained.modules() if type(m).__name__ in layer_classes]
        if not layers:
            raise LaunchError(
                f"FSDP2: {type(model).__name__} names no decoder-layer class (_no_split_modules) to shard by; use DDP "
                "(configs/accelerate/ddp_*.yaml) for this model"
            )
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(trained, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        return trained

    def copy_full_weights(self, trained: torch.nn.Module, whole: torch.nn.Module) -> None:
        """Under FSDP2, gather every sharded parameter of `trained` (a collective: all ranks call it) into the
        same-named parameter of the whole model; a no-op otherwise (they are the same parameters)."""
        if not self.sharded:
            return
        targets = dict(whole.named_parameters())
        with torch.no_grad():
            for name, parameter in trained.named_parameters():
                full = parameter.full_tensor() if hasattr(parameter, "full_tensor") else parameter
                targets[name].copy_(full)

    def gradient_view(self, trained: torch.nn.Module) -> Any:
        """What the non-finite check reads gradients from: under FSDP2 this rank's local gradient shards (the
        ranks' verdicts are summed afterwards), else the model itself."""
        if not self.sharded:
            return trained
        named = [
            (name, SimpleNamespace(grad=None if p.grad is None else p.grad.to_local()))
            for name, p in trained.named_parameters()
        ]
        return SimpleNamespace(parameters=lambda: [p for _, p in named], named_parameters=lambda: iter(named))

    def check_resumable(self, run_dir: Any) -> None:
        """Resuming under FSDP2 is not supported: the checkpoint holds no optimizer state (it is sharded)."""
        if self.sharded:
            raise ValueError(
                f"{run_dir}: resuming a run under FSDP2 is not supported (the AdamW state is sharded over the ranks "
                "and the checkpoint does not hold it); start a new run directory, or train with DDP "
                "(configs/accelerate/ddp_*.yaml), whose runs resume"
            )

    @property
    def is_main(self) -> bool:
        """Rank 0 writes logs, checkpoints and results."""
        return self.rank == 0

    @property
    def loss_scale(self) -> float:
        """DDP averages gradients over ranks; scaling each rank's share by N makes the result their sum."""
        return float(self.world_size)

    def check_groups(self, n_groups: int) -> None:
        """Every rank must play the same whole number of groups (>= 1)."""
        if n_groups < self.world_size:
            raise LaunchError(
                f"{self.world_size} processes but only {n_groups} task groups per step: every process needs at least "
                f"one group; set tasks_per_step to a multiple of {self.world_size} or launch fewer processes"
            )
        if n_groups % self.world_size:
            raise LaunchError(
                f"tasks_per_step={n_groups} does not split evenly over {self.world_size} processes (groups are never "
                f"split across processes); use a multiple of {self.world_size}"
            )

    def group_block(self, n_groups: int) -> range:
        """The global indices of the groups this rank plays: a contiguous block of n_groups / N."""
        self.check_groups(n_groups)
        share = n_groups // self.world_size
        return range(self.rank * share, (self.rank + 1) * share)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (token counts stay exact integers)."""
        if self.world_size == 1:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(tensor)
        return tensor.cpu().tolist()

    def max(self, value: float) -> float:
        """The largest value over ranks."""
        if self.world_size == 1:
            return float(value)
        tensor = torch.tensor([float(value)], dtype=torch.float64, device=self._comm_device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())

    def gather(self, item: Any) -> list[Any]:
        """Every rank's `item` (picklable), in rank order."""
        if self.world_size == 1:
            return [item]
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, item)
        return gathered

    def mini_batch_parts(self, rows: int, mini_batch_rows: int | None) -> list[range]:
        """This rank's local rows of each global mini-batch of the step (see `mini_batch_parts`); gathers row counts."""
        return mini_batch_parts(self.gather(int(rows)), self.rank, mini_batch_rows)

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    @property
    def _comm_device(self) -> torch.device:
        # gloo reduces CPU tensors, NCCL CUDA ones: use the backend's device.
        backend = torch.distributed.get_backend()
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def mini_batch_parts(rank_rows: Sequence[int], rank: int, mini_batch_rows: int | None) -> list[range]:
    """Local row ranges of `rank` in each global mini-batch: the ranks' rows, concatenated in rank order, are cut into
    mini-batches of `mini_batch_rows` rows (None: one mini-batch of all rows), as one process holding them all would
    cut them; a rank's part of a mini-batch is the intersection with its own block, empty when they do not meet.
    Every rank gets the same number of parts, ceil(total rows / mini_batch_rows)."""
    if not 0 <= rank < len(rank_rows):
        raise ValueError(f"rank {rank} is outside the {len(rank_rows)} ranks")
    if any(n < 0 for n in rank_rows):
        raise ValueError(f"row counts must be >= 0, got {list(rank_rows)}")
    total = sum(rank_rows)
    mini = mini_batch_rows or max(total, 1)
    if mini < 1:
        raise ValueError(f"mini_batch_rows must be >= 1 or None, got {mini_batch_rows}")
    first = sum(rank_rows[:rank])
    last = first + rank_rows[rank]
    parts = []
    for start in range(0, total, mini):
        lo, hi = max(start, first), min(start + mini, last)
        parts.append(range(lo - first, hi - first) if lo < hi else range(0))
    return parts


def sharding_from_environment(environ: Any) -> str:
    """"fsdp2" when accelerate's launcher exported an FSDP config of version 2, "ddp" without one; FSDP1 and
    DeepSpeed configs are refused by name (this trainer implements neither)."""
    if str(environ.get("ACCELERATE_USE_DEEPSPEED", "false")).lower() == "true":
        raise LaunchError("DeepSpeed configs are not supported by craft-bench's trainer; use DDP or FSDP2 (configs/accelerate/)")
    if str(environ.get("ACCELERATE_USE_FSDP", "false")).lower() != "true":
        return "ddp"
    version = str(environ.get("FSDP_VERSION", "1"))
    if version != "2":
        raise LaunchError(
            f"FSDP version {version} is not supported: set fsdp_version: 2 in the accelerate config "
            "(configs/accelerate/fsdp2_cpu.yaml shows one)"
        )
    return "fsdp2"
