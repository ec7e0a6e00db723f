"""Benchmark of the clustering steps: spherical k-means against faiss-cpu, and Sinkhorn-Knopp.

k-means: 100,000 L2-normalised embeddings of 128 dims into 3,000 clusters, 10 iterations, ours and
``faiss.Kmeans(d, k, niter=10, spherical=True)`` on the same data, interleaved (A B A B ...) so that load on a
shared machine hits both alike; the ratio of medians is the number to read. Ours also computes the final
assignments (one extra E-step) that DeepCluster-v2 needs; faiss's ``train`` returns centroids only.

Sinkhorn: a 256 x 3000 score matrix, 3 iterations, epsilon 0.05.

Usage:
    python scripts/bench_losses.py [--repeats 3] [--output bench_results/losses.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from jointssl_monai.losses import sinkhorn_knopp, spherical_kmeans


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench_kmeans(n: int, dim: int, k: int, iterations: int, repeats: int) -> dict:
    x = F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(0)), dim=1).contiguous()
    ours = lambda: spherical_kmeans(x, k, iterations, seed=0)  # noqa: E731
    result: dict = {"n": n, "dim": dim, "k": k, "iterations": iterations, "repeats": repeats}
    try:
        import faiss
    except ImportError:
        faiss = None
        result["faiss"] = "faiss-cpu not installed"
    if faiss is not None:
        x_np = x.numpy()

        def theirs() -> None:
            # max_points_per_centroid raised so that faiss never subsamples the rows
            km = faiss.Kmeans(dim, k, niter=iterations, spherical=True, seed=0, max_points_per_centroid=10**6)
            km.train(x_np)

    ours()  # warm-up
    if faiss is not None:
        theirs()
    times_ours, times_faiss = [], []
    for _ in range(repeats):
        times_ours.append(_time(ours))
        if faiss is not None:
            times_faiss.append(_time(theirs))
    result["ours_s"] = times_ours
    result["ours_median_s"] = statistics.median(times_ours)
    if times_faiss:
        result["faiss_s"] = times_faiss
        result["faiss_median_s"] = statistics.median(times_faiss)
        result["ratio_ours_over_faiss"] = result["ours_median_s"] / result["faiss_median_s"]
    # quality check on the same data: mean cosine of each row to its centroid
    final = spherical_kmeans(x, k, iterations, seed=0)
    result["ours_mean_cosine"] = float((x * final.centroids[final.assignments]).sum(1).mean())
    return result


def bench_sinkhorn(rows: int, k: int, repeats: int) -> dict:
    scores = F.normalize(torch.randn(rows, dim := 128), dim=1) @ F.normalize(torch.randn(k, dim), dim=1).t()
    for _ in range(5):
        sinkhorn_knopp(scores)
    times = [_time(lambda: sinkhorn_knopp(scores)) for _ in range(repeats)]
    return {
        "rows": rows,
        "k": k,
        "iterations": 3,
        "median_ms": 1e3 * statistics.median(times),
        "repeats": repeats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed k-means repetitions after a warm-up")
    parser.add_argument("--output", type=Path, default=Path("bench_results/losses.json"))
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=3000)
    args = parser.parse_args()
    results = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "malloc_env": {key: os.environ[key] for key in os.environ if key.startswith("MALLOC_")},
        },
        "sinkhorn": bench_sinkhorn(256, 3000, repeats=50),
        "kmeans": bench_kmeans(args.n, 128, args.k, 10, args.repeats),
    }
    print(json.dumps(results, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2))
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
