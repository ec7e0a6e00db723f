"""Collapse diagnostics of cluster assignments.

A clustering objective collapses when (almost) every sample goes to the same few prototypes; the loss then
sits near ``log K`` and says nothing. These statistics make it visible: the entropy of the mean assignment
(``log K`` when the batch is spread evenly, 0 when collapsed), the number of clusters that win at least one
sample, and the share of the largest cluster.
"""

from __future__ import annotations

import math

import torch

from jointssl_monai.utils.dist import all_reduce_sum

__all__ = ["cluster_diagnostics", "clusters_used", "largest_cluster_share", "mean_assignment_entropy"]


def _check(codes: torch.Tensor) -> None:
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"cluster diagnostics: codes must be (N, K), got shape {tuple(codes.shape)}.")


@torch.no_grad()
def _counts(codes: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Global number of samples whose argmax is each cluster, ``(K,)`` float64."""
    counts = torch.bincount(codes.argmax(dim=1), minlength=codes.shape[1]) if codes.shape[0] else None
    counts = counts.double() if counts is not None else codes.new_zeros(codes.shape[1], dtype=torch.float64)
    return all_reduce_sum(counts, distributed)


@torch.no_grad()
def mean_assignment_entropy(
    codes: torch.Tensor, normalized: bool = False, distributed: bool = False
) -> torch.Tensor:
    """Entropy of the batch-mean assignment distribution.

    Args:
        codes: ``(N, K)`` non-negative per-sample assignment distributions (Sinkhorn codes or softmax).
        normalized: divide by ``log K`` (1 = uniform use of all clusters, 0 = collapse).
        distributed: average the assignments over all processes.
    """
    _check(codes)
    stats = torch.cat([codes.double().sum(dim=0), codes.new_tensor([codes.shape[0]], dtype=torch.float64)])
    all_reduce_sum(stats, distributed)
    mean = stats[:-1] / stats[-1].clamp_min(1.0)
    mean = mean / mean.sum().clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(mean * torch.log(mean.clamp_min(1e-300))).sum()
    k = codes.shape[1]
    return (entropy / math.log(k) if k > 1 else entropy * 0.0) if normalized else entropy


@torch.no_grad()
def clusters_used(codes: torch.Tensor, distributed: bool = False) -> int:
    """Number of clusters that are the argmax of at least one sample."""
    _check(codes)
    return int((_counts(codes, distributed) > 0).sum())


@torch.no_grad()
def largest_cluster_share(codes: torch.Tensor, distributed: bool = False) -> float:
    """Fraction of samples whose argmax is the most popular cluster (1/K ideal, 1 = collapse)."""
    _check(codes)
    counts = _counts(codes, distributed)
    return float(counts.max() / counts.sum().clamp_min(1.0))


@torch.no_grad()
def cluster_diagnostics(codes: torch.Tensor, distributed: bool = False) -> dict[str, float]:
    """All collapse statistics at once (three small reductions), as plain floats for logging."""
    return {
        "entropy": float(mean_assignment_entropy(codes, distributed=distributed)),
        "normalized_entropy": float(mean_assignment_entropy(codes, normalized=True, distributed=distributed)),
        "clusters_used": clusters_used(codes, distributed),
        "largest_share": largest_cluster_share(codes, distributed),
    }
