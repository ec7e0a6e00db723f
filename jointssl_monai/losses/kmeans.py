"""Spherical k-means with a distributed M-step (the clustering step of DeepCluster-v2, Caron et al. 2020, §B).

Each process holds its own rows. The E-step (nearest centroid by cosine) runs on the local rows only; the
M-step all-reduces the per-cluster sums and counts, so every process holds the same centroids, equal to those
one process would compute on the rows of all processes concatenated in rank order. Initialisation and the
re-seeding of empty clusters depend only on a seeded CPU generator and on global quantities, so they are
identical on every process as well.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from jointssl_monai.utils.dist import all_reduce_sum, rank, world_size

__all__ = ["KMeansResult", "spherical_kmeans"]

# Elements of the largest (chunk, K) score block held at once: big enough for an efficient GEMM, small
# enough to stay within a few tens of MB whatever N is.
_BLOCK_ELEMENTS = 1 << 24


class KMeansResult(NamedTuple):
    """Result of :func:`spherical_kmeans`.

    Attributes:
        centroids: ``(K, D)`` L2-normalised centroids, identical on every process.
        assignments: ``(N_local,)`` long, nearest centroid of each local row (under the returned centroids).
        counts: ``(K,)`` long, global number of rows per cluster under ``assignments``.
    """

    centroids: torch.Tensor
    assignments: torch.Tensor
    counts: torch.Tensor


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the most similar centroid of each row, by chunked GEMM + max (no (N, K) temporary)."""
    n, k = x.shape[0], centroids.shape[0]
    assignments = torch.empty(n, dtype=torch.long, device=x.device)
    if n == 0:
        return assignments
    chunk = max(1, min(n, _BLOCK_ELEMENTS // max(k, 1)))
    block = x.new_empty((chunk, k))
    best = x.new_empty(chunk)
    centroids_t = centroids.t().contiguous()
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = stop - start
        torch.mm(x[start:stop], centroids_t, out=block[:rows])
        torch.max(block[:rows], dim=1, out=(best[:rows], assignments[start:stop]))
    return assignments


def _init_centroids(
    x: torch.Tensor, k: int, generator: torch.Generator, distributed: bool | None
) -> torch.Tensor:
    """Pick ``k`` rows of the global (rank-ordered) concatenation at random, identically on every process."""
    sizes = torch.zeros(world_size(), dtype=torch.long, device=x.device)
    sizes[rank()] = x.shape[0]
    all_reduce_sum(sizes, distributed)
    total = int(sizes.sum())
    if total == 0:
        raise ValueError("spherical_kmeans: x has no rows on any process.")
    offset = int(sizes[: rank()].sum())  # 0 when the sizes were not reduced: only this rank's is set
    chosen = torch.randperm(total, generator=generator)[:k]
    if k > total:  # fewer rows than clusters: repeat rows; the duplicates are re-seeded as empty clusters
        chosen = torch.cat([chosen, torch.randint(total, (k - total,), generator=generator)])
    chosen = chosen.to(x.device)
    centroids = x.new_zeros((k, x.shape[1]))
    local = (chosen >= offset) & (chosen < offset + x.shape[0])
    centroids[local] = x[chosen[local] - offset]
    all_reduce_sum(centroids, distributed)
    return F.normalize(centroids, dim=1)


def _reseed_empty(
    centroids: torch.Tensor, counts: torch.Tensor, generator: torch.Generator, perturbation: float
) -> None:
    """Give each empty cluster half of the currently largest cluster (in place), as faiss does.

    The largest centroid ``c`` is replaced by ``normalize(c - delta)`` and the empty one by
    ``normalize(c + delta)`` with a small random ``delta``, so the next E-step splits that cluster. Only
    global counts and the seeded generator are used, so every process re-seeds identically without
    communication.
    """
    empty = torch.nonzero(counts == 0).flatten().tolist()
    for j in empty:
        largest = int(torch.argmax(counts))
        if counts[largest] <= 1:
            break  # nothing left to split
        delta = perturbation * torch.randn(centroids.shape[1], generator=generator).to(centroids)
        base = centroids[largest].clone()
        centroids[j] = F.normalize(base + delta, dim=0)
        centroids[largest] = F.normalize(base - delta, dim=0)
        counts[j] = counts[largest] // 2
        counts[largest] -= counts[j]


@torch.no_grad()
def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    iterations: int = 10,
    seed: int = 0,
    generator: torch.Generator | None = None,
    init: torch.Tensor | None = None,
    distributed: bool | None = None,
    perturbation: float = 1e-3,
) -> KMeansResult:
    """Spherical k-means (cosine similarity) of L2-normalised rows, optionally across processes.

    ``iterations`` rounds of E-step (assign each row to its most similar centroid) and M-step (centroid = L2-
    normalised sum of its rows; empty clusters re-seeded by splitting the largest), then a final E-step so
    that the returned assignments belong to the returned centroids (as DeepCluster-v2 does).

    Args:
        x: ``(N_local, D)`` rows of this process, expected L2-normalised (the E-step ranks by dot product; the
            M-step weights rows by their norm). ``N_local`` may be 0 on some processes.
        k: number of clusters.
        iterations: E/M rounds (DeepCluster-v2: 10).
        seed: seeds the CPU generator used for initialisation and re-seeding when ``generator`` is None.
        generator: a CPU ``torch.Generator``; must be in the same state on every process.
        init: optional ``(k, D)`` initial centroids (identical on every process); default: ``k`` random
        rows of
            the global concatenation.
        distributed: ``None`` reduces across processes whenever a process group is initialised.
        perturbation: size of the random split applied when re-seeding an empty cluster.

    Returns:
        :class:`KMeansResult` with centroids, local assignments and global counts.
    """
    if x.ndim != 2:
        raise ValueError(f"spherical_kmeans: x must be (N, D), got shape {tuple(x.shape)}.")
    if k < 1 or iterations < 0:
        raise ValueError(
            f"spherical_kmeans: need k >= 1 and iterations >= 0, got k={k}, iterations={iterations}."
        )
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    x = x.float()
    if init is not None:
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"spherical_kmeans: init must be ({k}, {x.shape[1]}), got {tuple(init.shape)}.")
        centroids = F.normalize(init.to(x).clone(), dim=1)
    else:
        centroids = _init_centroids(x, k, generator, distributed)
    for _ in range(iterations):
        assignments = _assign(x, centroids)
        sums = x.new_zeros(centroids.shape).index_add_(0, assignments, x)
        counts = torch.bincount(assignments, minlength=k)
        all_reduce_sum(sums, distributed)
        all_reduce_sum(counts, distributed)
        centroids = F.normalize(sums, dim=1)  # empty clusters get a zero row here, re-seeded just below
        _reseed_empty(centroids, counts, generator, perturbation)
    assignments = _assign(x, centroids)
    counts = all_reduce_sum(torch.bincount(assignments, minlength=k), distributed)
    return KMeansResult(centroids, assignments, counts)
