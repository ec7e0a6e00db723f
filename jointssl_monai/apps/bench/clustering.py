"""The clustering steps of the losses: spherical k-means (DeepCluster-v2) against faiss-cpu on the same data,
interleaved, and Sinkhorn-Knopp (SwAV)."""

from __future__ import annotations

import statistics
from typing import Any

import torch
import torch.nn.functional as F

from jointssl_monai.apps.bench.timing import interleaved_times, paired_ratio, time_call
from jointssl_monai.losses import sinkhorn_knopp, spherical_kmeans

__all__ = ["bench_kmeans", "bench_sinkhorn"]


def bench_kmeans(
    n: int = 100_000, dim: int = 128, k: int = 3000, iterations: int = 10, rounds: int = 3
) -> dict:
    """Ours and ``faiss.Kmeans(spherical=True)`` on the same ``n x dim`` unit rows, interleaved.

    Ours also computes the final assignments (one more E-step) that DeepCluster-v2 needs; faiss's ``train``
    returns centroids only. ``faiss`` is reported as missing when faiss-cpu is not installed (``pip install
    jointssl-monai[bench]``).
    """
    x = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1).contiguous()
    cases: dict[str, Any] = {"ours": lambda: spherical_kmeans(x, k, iterations, seed=0)}
    result: dict[str, Any] = {"n": n, "dim": dim, "k": k, "iterations": iterations, "rounds": rounds}
    try:
        import faiss
    except ImportError:
        result["faiss"] = "faiss-cpu not installed"
    else:
        x_np = x.numpy()

        def faiss_kmeans() -> None:
            # max_points_per_centroid raised so that faiss never subsamples the rows
            km = faiss.Kmeans(dim, k, niter=iterations, spherical=True, seed=0, max_points_per_centroid=10**6)
            km.train(x_np)

        cases["faiss"] = faiss_kmeans
        result["faiss_version"] = faiss.__version__
    times = interleaved_times(cases, rounds, warmup=1)
    result["seconds"] = times
    if "faiss" in times:
        result["faiss_over_ours"] = paired_ratio(times["faiss"], times["ours"])
    final = spherical_kmeans(x, k, iterations, seed=0)  # quality on the same data: mean cosine to centroid
    result["ours_mean_cosine"] = float((x * final.centroids[final.assignments]).sum(1).mean())
    return result


def bench_sinkhorn(rows: int = 256, k: int = 3000, repeats: int = 50) -> dict:
    """Sinkhorn-Knopp (3 iterations, epsilon 0.05) on a ``rows x k`` cosine score matrix: median time."""
    generator = torch.Generator().manual_seed(0)
    a = F.normalize(torch.randn(rows, 128, generator=generator), dim=1)
    scores = a @ F.normalize(torch.randn(k, 128, generator=generator), dim=1).t()
    for _ in range(5):
        sinkhorn_knopp(scores)
    times = [time_call(lambda: sinkhorn_knopp(scores)) for _ in range(repeats)]
    median_ms = 1e3 * statistics.median(times)
    return {"rows": rows, "k": k, "iterations": 3, "repeats": repeats, "median_ms": median_ms}
