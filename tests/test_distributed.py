"""Data-parallel pieces: group sharding, clear errors for launches that cannot play the batch, and reductions over
two real gloo processes."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

from craft_bench.agents.distributed import DataParallel, LaunchError


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
