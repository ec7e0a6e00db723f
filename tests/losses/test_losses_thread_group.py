"""The distributed paths of the losses in one process: ranks are threads and the collectives of
``torch.distributed`` that ``jointssl_monai.utils.dist`` calls meet at a barrier (sum, max, gather), so every
rank sees what a real process group would give it. The multi-process tests check the same with gloo; these
are fast enough to run with every test selection, and also check ``distributed=False`` inside a group."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import DeepClusterV2Loss, JointSSLLoss, SwAVLoss, sinkhorn_knopp, spherical_kmeans
from jointssl_monai.losses import kmeans as kmeans_module
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput
from jointssl_monai.utils import dist as dist_module


class ThreadGroup:
    """What ``jointssl_monai.utils.dist`` uses of ``torch.distributed``, for ranks running as threads."""

    class ReduceOp:
        SUM = "sum"
        MAX = "max"

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=20)
        self.local = threading.local()
        self.slots: list[Any] = [None] * size
        self.collectives: list[tuple[int, str]] = []

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def get_world_size(self) -> int:
        return self.size

    def get_rank(self) -> int:
        return self.local.rank

    def _exchange(self, tensor: torch.Tensor, kind: str) -> list[torch.Tensor]:
        self.collectives.append((self.local.rank, kind))
        self.slots[self.local.rank] = tensor.detach().clone()
        self.barrier.wait()
        everyone = list(self.slots)
        self.barrier.wait()
        return everyone

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> None:
        stacked = torch.stack(self._exchange(tensor, op))
        tensor.copy_(stacked.sum(dim=0) if op == self.ReduceOp.SUM else stacked.max(dim=0).values)

    def all_gather(self, outputs: list[torch.Tensor], tensor: torch.Tensor) -> None:
        for out, value in zip(outputs, self._exchange(tensor, "gather"), strict=True):
            out.copy_(value)

    def run(self, work: Callable[[int], Any]) -> list[Any]:
        """``work(rank)`` on every rank at once; the results in rank order (any rank's failure is raised)."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = work(rank)
            except BaseException as err:  # re-raised below, in the test's thread
                errors.append(err)
                self.barrier.abort()  # the other ranks stop waiting for this one

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture
def group(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], ThreadGroup]:
    def make(size: int) -> ThreadGroup:
        made = ThreadGroup(size)
        monkeypatch.setattr(dist_module, "dist", made)
        return made

    torch.set_num_threads(1)
    return make


def planted(n: int, dim: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.randint(k, (n,), generator=g)
    return F.normalize(centres[labels] + 0.3 * torch.randn(n, dim, generator=g), dim=1)


# uneven contiguous blocks of 30 rows; the middle rank of three holds none
SPLITS = {2: [slice(0, 11), slice(11, 30)], 3: [slice(0, 9), slice(9, 9), slice(9, 30)]}


@pytest.mark.parametrize("world", [2, 3])
def test_kmeans_over_ranks_equals_one_process_on_all_rows(group, world: int) -> None:
    """Initial centroids are drawn from the rank-ordered concatenation, so every rank's rows count."""
    x = planted(30, 6, 4, seed=1)
    expected_init = kmeans_module._init_centroids(x, 7, torch.Generator().manual_seed(3), distributed=False)
    expected = spherical_kmeans(x, 7, iterations=3, seed=3, distributed=False)
    parts = SPLITS[world]
    g = group(world)
    inits = g.run(
        lambda r: kmeans_module._init_centroids(x[parts[r]], 7, torch.Generator().manual_seed(3), None)
    )
    results = g.run(lambda r: spherical_kmeans(x[parts[r]], 7, iterations=3, seed=3))
    for init, result in zip(inits, results, strict=True):
        torch.testing.assert_close(init, expected_init, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.centroids, expected.centroids, atol=1e-6, rtol=0)
        assert torch.equal(result.counts, expected.counts)
    assert torch.equal(torch.cat([r.assignments for r in results]), expected.assignments)


def test_kmeans_with_distributed_false_stays_on_the_rows_of_its_rank(group) -> None:
    x = planted(30, 6, 4, seed=2)
    parts = SPLITS[2]
    expected = [spherical_kmeans(x[p], 3, iterations=3, seed=4, distributed=False) for p in parts]
    alone = [kmeans_module._init_centroids(x[p], 3, torch.Generator().manual_seed(4), False) for p in parts]
    g = group(2)
    inits = g.run(
        lambda r: kmeans_module._init_centroids(x[parts[r]], 3, torch.Generator().manual_seed(4), False)
    )
    results = g.run(lambda r: spherical_kmeans(x[parts[r]], 3, iterations=3, seed=4, distributed=False))
    for r, (init, result) in enumerate(zip(inits, results, strict=True)):
        torch.testing.assert_close(init, alone[r], atol=0, rtol=0)
        torch.testing.assert_close(result.centroids, expected[r].centroids, atol=0, rtol=0)
        assert torch.equal(result.assignments, expected[r].assignments)
    assert g.collectives == []


def _swav_branch(rows: slice) -> tuple[ClusterBranch, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    protos = [F.normalize(torch.randn(5, 6, generator=g), dim=1)]
    emb = [planted(30, 6, 4, seed=6 + v) for v in range(2)]
    return ClusterBranch([e[rows] for e in emb], [[e[rows] @ protos[0].t()] for e in emb]), protos


def test_swav_codes_span_every_rank_unless_distributed_is_false(group) -> None:
    """Sinkhorn runs on the concatenated batch of all ranks; ``distributed=False`` keeps it local."""
    parts = SPLITS[2]
    whole, _ = _swav_branch(slice(0, 30))
    codes = [sinkhorn_knopp(s[0], 0.05, 3, distributed=False) for s in whole.scores]

    def reference(rows: slice, view_codes: list[torch.Tensor]) -> torch.Tensor:
        part, _ = _swav_branch(rows)
        terms = []
        for v, q in enumerate(view_codes):
            log_p = torch.log_softmax(part.scores[1 - v][0] / 0.1, dim=1)
            terms.append(-(q * log_p).sum(dim=1).mean())
        return torch.stack(terms).mean()

    alone = [
        [sinkhorn_knopp(s[0], 0.05, 3, distributed=False) for s in _swav_branch(p)[0].scores] for p in parts
    ]
    g = group(2)
    shared = g.run(lambda r: SwAVLoss()(_swav_branch(parts[r])[0]))
    local = g.run(lambda r: SwAVLoss(distributed=False)(_swav_branch(parts[r])[0]))
    for r, rows in enumerate(parts):
        torch.testing.assert_close(shared[r], reference(rows, [q[rows] for q in codes]), atol=1e-5, rtol=0)
        torch.testing.assert_close(local[r], reference(rows, alone[r]), atol=1e-5, rtol=0)


def test_deepcluster_bank_and_clustering_over_ranks(group) -> None:
    """Every rank stores the rows of all ranks and clusters them as one process would; with
    ``distributed=False`` a rank keeps its own rows only."""
    x = [planted(30, 6, 3, seed=7 + v) for v in range(2)]
    keys = torch.randperm(50, generator=torch.Generator().manual_seed(8))[:30]
    kwargs = {"num_samples": 50, "dim": 6, "num_prototypes": (3, 4), "kmeans_iterations": 3}
    single = DeepClusterV2Loss(**kwargs, distributed=False)
    single.update_memory(x, keys)
    expected = single.cluster()
    parts = SPLITS[3]

    def shared(r: int) -> DeepClusterV2Loss:
        loss = DeepClusterV2Loss(**kwargs)
        loss.update_memory([v[parts[r]] for v in x], keys[parts[r]])
        loss.cluster()
        return loss

    for loss in group(3).run(shared):
        assert torch.equal(loss.written, single.written) and torch.equal(loss.assignments, single.assignments)
        for got, want in zip(loss.centroids, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)

    def local(r: int) -> DeepClusterV2Loss:
        loss = DeepClusterV2Loss(**kwargs, distributed=False)
        loss.update_memory([v[parts[r]] for v in x], keys[parts[r]])
        return loss

    g = group(2)
    parts = SPLITS[2]
    for r, loss in enumerate(g.run(local)):
        assert loss.rows_in_bank() == parts[r].stop - parts[r].start
        assert bool(loss.written[keys[parts[r]]].all())
    assert g.collectives == []


def test_joint_loss_levels_only_some_ranks_have(group) -> None:
    """A rank with 2D images only joins the volume level's Sinkhorn with zero rows; the other rank's loss is
    then the loss of its own batch (the codes span one rank's rows only)."""
    g = torch.Generator().manual_seed(9)
    inter_protos = [F.normalize(torch.randn(3, 6, generator=g), dim=1)]
    intra, intra_protos = _swav_branch(slice(0, 30))
    inter_emb = [planted(5, 6, 2, seed=20 + v) for v in range(2)]
    inter = ClusterBranch(inter_emb, [[e @ inter_protos[0].t()] for e in inter_emb])

    def work(r: int) -> dict:
        loss = JointSSLLoss(intra_prototypes=5, inter_prototypes=3, diagnostics=False)
        output = JointSSLOutput(intra=intra, inter=inter if r == 0 else None)
        return loss(output, intra_prototypes=intra_protos, inter_prototypes=inter_protos)

    alone = SwAVLoss()(inter)
    gr = group(2)
    results = gr.run(work)
    torch.testing.assert_close(results[0]["inter"], alone, atol=1e-5, rtol=0)
    assert "inter" not in results[1]
    # rank 1 told rank 0 which levels it has, then took part in every Sinkhorn of both levels
    assert [kind for rank, kind in gr.collectives if rank == 1] == [
        kind for rank, kind in gr.collectives if rank == 0
    ]
