"""Several real processes (gloo on CPU) must give the single-process result on the concatenated data."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from jointssl_monai.losses import DeepClusterV2Loss, JointSSLLoss, SwAVLoss, sinkhorn_knopp, spherical_kmeans
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput

pytestmark = pytest.mark.multiprocess
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(n: int, world: int) -> list[slice]:
    """Uneven contiguous blocks; with 3 processes the middle one gets no rows at all."""
    cuts = {2: [0, n // 3, n], 3: [0, n // 3, n // 3, n]}[world]
    return [slice(cuts[r], cuts[r + 1]) for r in range(world)]


def _planted(n: int, dim: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.randint(k, (n,), generator=g)
    return F.normalize(centres[labels] + 0.15 * torch.randn(n, dim, generator=g), dim=1), labels


def _branch(emb: list[torch.Tensor], protos: list[torch.Tensor]) -> ClusterBranch:
    return ClusterBranch(embeddings=emb, scores=[[e @ p.t() for p in protos] for e in emb])


def _check_sinkhorn(part: slice) -> None:
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        scores = (3 * torch.randn(23, 7, generator=g)).to(dtype)
        expected = sinkhorn_knopp(scores, 0.05, 5, distributed=False)
        got = sinkhorn_knopp(scores[part], 0.05, 5)
        torch.testing.assert_close(got, expected[part], atol=ATOL, rtol=0)


def _check_kmeans(part: slice) -> None:
    x, _ = _planted(90, 8, 5, seed=1)
    expected = spherical_kmeans(x, 5, iterations=6, seed=3, distributed=False)
    got = spherical_kmeans(x[part], 5, iterations=6, seed=3)
    torch.testing.assert_close(got.centroids, expected.centroids, atol=ATOL, rtol=0)
    assert torch.equal(got.assignments, expected.assignments[part])
    assert torch.equal(got.counts, expected.counts)
    # duplicated initial centroids leave one cluster empty: re-seeding must be identical everywhere
    init = torch.cat([x[:4], x[:1]])
    expected = spherical_kmeans(x, 5, iterations=6, seed=3, init=init, distributed=False)
    got = spherical_kmeans(x[part], 5, iterations=6, seed=3, init=init)
    torch.testing.assert_close(got.centroids, expected.centroids, atol=ATOL, rtol=0)
    assert torch.equal(got.assignments, expected.assignments[part])
    assert int((expected.counts == 0).sum()) == 0


def _check_deepcluster(part: slice, rank: int) -> None:
    x0, _ = _planted(40, 6, 4, seed=2)
    x1 = F.normalize(x0 + 0.05 * torch.randn(40, 6, generator=torch.Generator().manual_seed(5)), dim=1)
    keys = torch.randperm(100, generator=torch.Generator().manual_seed(4))[:40]
    kwargs = {"num_samples": 100, "dim": 6, "num_prototypes": (4, 3, 5), "kmeans_iterations": 4}
    single = DeepClusterV2Loss(**kwargs, distributed=False)
    single.update_memory([x0, x1], keys)
    expected = single.cluster()
    multi = DeepClusterV2Loss(**kwargs)
    multi.update_memory([x0[part], x1[part]], keys[part])
    got = multi.cluster()
    for c_got, c_exp in zip(got, expected, strict=True):
        torch.testing.assert_close(c_got, c_exp, atol=ATOL, rtol=0)
    state, ref = multi.state_dict(), single.state_dict()
    assert torch.equal(state["assignments"], ref["assignments"]) and torch.equal(
        state["written"], ref["written"]
    )
    torch.testing.assert_close(state["bank"], ref["bank"], atol=ATOL, rtol=0)
    # a checkpoint written by any rank resumes a single process: same losses afterwards
    resumed = DeepClusterV2Loss(**kwargs, distributed=False)
    resumed.load_state_dict(multi.state_dict())
    protos = [c.clone() for c in got]
    branch = _branch([x0, x1], protos)
    torch.testing.assert_close(resumed.eval()(branch, keys), single.eval()(branch, keys), atol=ATOL, rtol=0)


def _check_joint_mixed_presence(part: slice, rank: int, world: int) -> None:
    """Processes without volumes must join the inter collectives; the global loss equals one process's."""
    g = torch.Generator().manual_seed(7)
    protos = [F.normalize(torch.randn(6, 5, generator=g), dim=1)]
    emb = [F.normalize(torch.randn(20, 5, generator=g), dim=1) for _ in range(2)]
    rows = list(range(20))[part]
    loss = JointSSLLoss(None, "swav", inter_prototypes=6, diagnostics=False)
    branch = _branch([e[part] for e in emb], protos) if rows else None
    out = loss(JointSSLOutput(inter=branch), inter_prototypes=protos)
    weighted = torch.tensor([float(out["inter"]) * len(rows) if rows else 0.0])
    dist.all_reduce(weighted)
    expected = SwAVLoss(distributed=False)(_branch(emb, protos))
    assert ("inter" in out) == bool(rows)
    torch.testing.assert_close(weighted[0] / 20, expected, atol=ATOL, rtol=0)


def _worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        _check_sinkhorn(_split(23, world)[rank])
        _check_kmeans(_split(90, world)[rank])
        _check_deepcluster(_split(40, world)[rank], rank)
        _check_joint_mixed_presence(_split(20, world)[rank], rank, world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_equals_single_process(world: int) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(world, _free_port()), nprocs=world, join=True)
