"""Data parallel: group sharding, global mini-batches, clear errors for launches that cannot play the batch, reductions
over two real gloo processes, and two training steps under torchrun with 2 processes against 1 process on the same
global batch (one update per step, and two mini-batch updates per step)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from craft_bench.agents.distributed import DataParallel, LaunchError, mini_batch_parts, sharding_from_environment


def test_single_process_needs_no_process_group():
    dp = DataParallel()
    assert dp.is_main and dp.loss_scale == 1.0
    assert dp.sum([1, 2.5]) == [1.0, 2.5]
    assert dp.gather("x") == ["x"]
    assert dp.group_block(4) == range(0, 4)


def test_groups_are_split_in_contiguous_whole_blocks():
    blocks = [DataParallel(rank, 4).group_block(8) for rank in range(4)]
    assert blocks == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


@pytest.mark.parametrize("groups, world", [(3, 2), (6, 4), (2, 3)])
def test_a_world_size_that_does_not_divide_the_groups_is_refused(groups, world):
    with pytest.raises(LaunchError, match=f"{world} processes|multiple of {world}"):
        DataParallel(0, world).group_block(groups)


def test_more_ranks_than_groups_is_refused_with_the_fix():
    with pytest.raises(LaunchError, match="at least one group"):
        DataParallel(0, 8).check_groups(4)


@pytest.mark.parametrize("rank_rows, mini", [([24, 24], 30), ([24, 24], 20), ([5, 9, 3], 4), ([7, 7], None), ([3, 4], 100)])
def test_global_mini_batches_cut_the_concatenated_rows_as_one_process_does(rank_rows, mini):
    """Every rank gets the same number of parts; mapped back to global row numbers, part k of all ranks together is
    exactly rows [k*M, (k+1)*M) of one process (M = mini, or all rows when None)."""
    total = sum(rank_rows)
    width = mini or total
    expected = [list(range(start, min(start + width, total))) for start in range(0, total, width)]
    per_rank = [mini_batch_parts(rank_rows, rank, mini) for rank in range(len(rank_rows))]
    assert {len(parts) for parts in per_rank} == {len(expected)}
    offsets = [sum(rank_rows[:rank]) for rank in range(len(rank_rows))]
    for k, rows in enumerate(expected):
        glued = [offsets[rank] + i for rank, parts in enumerate(per_rank) for i in parts[k]]
        assert glued == rows


def test_a_rank_outside_a_global_mini_batch_gets_an_empty_part():
    # 48 rows, 24 per rank, M = 20: [0, 20) is rank 0's alone, [20, 40) spans both, [40, 48) is rank 1's alone.
    assert mini_batch_parts([24, 24], 0, 20) == [range(20), range(20, 24), range(0)]
    assert mini_batch_parts([24, 24], 1, 20) == [range(0), range(16), range(16, 24)]


def test_bad_mini_batch_arguments_are_refused():
    with pytest.raises(ValueError, match="rank 2 is outside"):
        mini_batch_parts([3, 3], 2, 2)
    with pytest.raises(ValueError, match="mini_batch_rows must be >= 1"):
        mini_batch_parts([3, 3], 0, -1)


def test_the_accelerate_config_selects_the_sharding():
    assert sharding_from_environment({}) == "ddp"
    assert sharding_from_environment({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    with pytest.raises(LaunchError, match="FSDP version 1 is not supported: set fsdp_version: 2"):
        sharding_from_environment({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    with pytest.raises(LaunchError, match="DeepSpeed configs are not supported"):
        sharding_from_environment({"ACCELERATE_USE_DEEPSPEED": "true"})


def test_resuming_under_fsdp2_is_refused_by_name(tmp_path):
    DataParallel(0, 2, sharding="ddp").check_resumable(tmp_path)  # DDP runs resume
    with pytest.raises(ValueError, match="resuming a run under FSDP2 is not supported"):
        DataParallel(0, 2, sharding="fsdp2").check_resumable(tmp_path)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _reduce_worker(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        dp = DataParallel(rank, world)
        total = dp.sum([rank + 1, 10 * (rank + 1)])
        largest = dp.max(rank * 3.5)
        items = dp.gather({"rank": rank})
        results[rank] = (total, largest, items)
    finally:
        dist.destroy_process_group()


def test_reductions_over_two_gloo_processes():
    torch.set_num_threads(1)
    manager = tmp.Manager()
    results = manager.dict()
    tmp.spawn(_reduce_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in range(2):
        total, largest, items = results[rank]
        assert total == [3.0, 30.0]
        assert largest == 3.5
        assert items == [{"rank": 0}, {"rank": 1}]


SCRIPT = Path(__file__).parent / "ddp_train.py"


ACCELERATE_CONFIGS = Path(__file__).parent.parent / "configs" / "accelerate"


def _launch(method: str, out: Path, processes: int, *extra: str, accelerate_config: str | None = None) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    runs = out.parent / f"runs-{processes}"
    if accelerate_config is not None:  # accelerate's launcher, as a user types it, with the shipped config file
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ACCELERATE_CONFIGS / accelerate_config), "--num_processes", str(processes),
                   "--main_process_port", str(_free_port()), str(SCRIPT), method, str(out), str(runs), *extra]
    elif processes == 1:
        command = [sys.executable, str(SCRIPT), method, str(out), str(runs), *extra]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(SCRIPT), method, str(out), str(runs),
                   *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("method", ["grpo", "craft"])
def test_two_gloo_processes_equal_one_process_on_the_same_global_batch(tmp_path, method):
    """Each rank plays 2 of the step's 4 groups; the summed token count and gate counts make the ranks' losses add up
    to the one-process loss. Differences left: float rounding of batched forward passes over other row sets."""
    one = _launch(method, tmp_path / "one.pt", 1)
    two = _launch(method, tmp_path / "two.pt", 2)
    for step in range(2):
        a, b = one["rows"][step], two["rows"][step]
        for key in ("env/success", "env/return_mean", "env/invalid_rate", "rollout/rows", "rollout/tokens"):
            assert a[key] == b[key], key  # the same episodes, token for token
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-6, abs=1e-9)
        if method == "craft":
            assert b["sdar/gate_activity"] == a["sdar/gate_activity"]  # Pillar 2's input, from summed counts
            assert b["ctrl/lambda"] == pytest.approx(a["ctrl/lambda"], rel=1e-12)
        _assert_same_weights(one["weights"][step], two["weights"][step], WEIGHT_TOLERANCE[method], step)


# AdamW's first steps move each weight by about lr (1e-3 here) whatever its gradient's size: a weight whose gradient
# is tiny moves by lr * g / (|g| + eps), where the rounding of g from another batching (other rows share a forward
# pass, length-grouped micro-batches) shows. Measured after step 1: craft 1.3e-6 (one o_proj weight), grpo (with an
# entropy bonus, so that its gradient is not zero on this env where every episode fails alike) 4.5e-6 in one weight of
# 14400. The tolerance is 1% of one AdamW step.
WEIGHT_TOLERANCE = {"craft": 1e-5, "grpo": 1e-5}


def _assert_same_weights(one: dict, two: dict, atol: float, step: int) -> None:
    for name, weight in one.items():
        assert torch.allclose(two[name], weight, rtol=0, atol=atol), (step, name, (two[name] - weight).abs().max())


def test_global_mini_batches_on_two_processes_equal_one_process(tmp_path):
    """grpo with mini_batch_rows=30 of the step's 48 rows: two optimizer updates per step on both layouts. The first
    mini-batch spans rank 0's 24 rows and 6 of rank 1's; the second lies in rank 1's block, so rank 0 joins that
    update's gradient all-reduce with a zero loss. Each update's token mean divides by its global token count."""
    one = _launch("grpo", tmp_path / "one.pt", 1, "30")
    two = _launch("grpo", tmp_path / "two.pt", 2, "30")
    for step in range(2):
        a, b = one["rows"][step], two["rows"][step]
        assert a["rollout/rows"] == b["rollout/rows"] == 48.0  # the split above (the test model fails all episodes)
        assert a["optim/updates"] == b["optim/updates"] == 2.0
        for key in ("env/success", "env/return_mean", "rollout/tokens"):
            assert a[key] == b[key], key
        # The second update starts from weights the first moved by lr; its ratios and KL amplify float rounding.
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5)
        assert b["optim/grad_norm"] == pytest.approx(a["optim/grad_norm"], rel=1e-5)
        _assert_same_weights(one["weights"][step], two["weights"][step], WEIGHT_TOLERANCE["grpo"], step)


def test_fsdp2_on_two_gloo_processes_shards_the_model_and_equals_one_process(tmp_path):
    """configs/accelerate/fsdp2_cpu.yaml through `accelerate launch`: each rank holds half of the trained parameters
    (fully_shard per decoder layer and root), and grpo with two mini-batch updates per step (one rank idle in the
    second, micro-batch counts evened out with zero-loss stand-ins, since every FSDP forward is a collective) gives
    the one-process loss and weights within the DDP tolerance; the whole model every rank samples with is refreshed
    from the shards after each update (rank 0's whole model is what is compared)."""
    one = _launch("grpo", tmp_path / "one.pt", 1, "30")
    two = _launch("grpo", tmp_path / "two.pt", 2, "30", accelerate_config="fsdp2_cpu.yaml")
    assert two["sharding"] == "fsdp2"
    assert two["local_params"] < two["whole_params"]  # sharded: 30360 of 60720 for this model
    for step in range(2):
        a, b = one["rows"][step], two["rows"][step]
        assert a["optim/updates"] == b["optim/updates"] == 2.0
        for key in ("env/success", "env/return_mean", "rollout/rows", "rollout/tokens"):
            assert a[key] == b[key], key  # step 2's episodes were sampled by the whole model after step 1's update
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=1e-5)
        _assert_same_weights(one["weights"][step], two["weights"][step], WEIGHT_TOLERANCE["grpo"], step)


def test_a_refused_start_stops_every_rank_instead_of_leaving_them_waiting(tmp_path):
    """Rank 0 checks the run directory; when it refuses (here: a run is already there), the other ranks get its
    verdict and exit with the same error, instead of blocking on a collective until the process group times out."""
    from craft_bench import run

    args = ["--method", "grpo", "--model", str(Path(__file__).parent / "data" / "h1_tiny_test_model"),
            "--steps", "1", "--set", "tasks_per_step=2", "--set", "group_size=2", "--out", str(tmp_path)]
    run_dir = tmp_path / run.run_name(run.build_configs(run.parse_args(args))[0])
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), "-m", "craft_bench.run", *args, "--no-progress"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("already holds a run") == 2, done.stderr[-2000:]  # both ranks, one message each


@pytest.mark.distributed
def test_bench_train_processes_reports_the_ddp_step_time_and_its_ratio(capsys):
    """`bench train --processes 2` launches the same two-step run with 1 process and with 2 torchrun ranks and prints
    both timed steps (read from each run's metrics.csv) and their ratio, the 1-process row at 1.00x."""
    from craft_bench.bench.train import main as bench_train

    bench_train(["--processes", "2", "--model", str(Path(__file__).parent / "data" / "h1_tiny_test_model"),
                 "--method", "grpo", "--tasks", "2", "--group-size", "2", "--max-turns", "3", "--max-new-tokens", "6",
                 "--threads", "1", "--workers", "0"])
    lines = capsys.readouterr().out.splitlines()
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)
            if cells[0] in ("1", "2")}
    assert rows["1"][1] == "1.00x"
    one, two = float(rows["1"][0]), float(rows["2"][0])
    assert one > 0 and two > 0
    assert float(rows["2"][1].rstrip("x")) == pytest.approx(two / one, abs=0.01)  # from the unrounded seconds


def test_closing_a_single_process_is_a_no_op():
    # One process never joined a group: close() must not try to leave one (run.main calls it unconditionally).
    DataParallel().close()
    assert not torch.distributed.is_initialized()
