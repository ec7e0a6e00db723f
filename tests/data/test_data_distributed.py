"""The batch sampler under a real torch.distributed (gloo) world: ranks get disjoint shares."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from jointssl_monai.data import MixedBatchSampler

DIMS = [3] * 8 + [2] * 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        sampler = MixedBatchSampler(
            DIMS, volumes_per_batch=1, images_per_batch=2, seed=3
        )  # rank from the world
        sampler.set_epoch(2)
        out[rank] = (sampler.rank, sampler.num_replicas, list(sampler))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiprocess
def test_ranks_pick_disjoint_shares_from_the_process_group():
    world = 2
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    assert [out[r][:2] for r in range(world)] == [(0, 2), (1, 2)]
    shares = [{i for b in out[r][2] for i in b} for r in range(world)]
    assert len(out[0][2]) == len(out[1][2])  # same number of steps on every rank
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(len(DIMS)))
    # the same shares as a single process computes for each rank explicitly
    for r in range(world):
        expected = MixedBatchSampler(DIMS, 1, 2, seed=3, num_replicas=world, rank=r)
        expected.set_epoch(2)
        assert out[r][2] == list(expected)
