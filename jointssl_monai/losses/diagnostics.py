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

__all__ = [
    "cluster_diagnostics",
    "clusters_used",
    "largest_cluster_share",
    "mean_assignment_entropy",
    "occupancy_diagnostics",
    "token_spread",
]


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


@torch.no_grad()
def occupancy_diagnostics(counts: torch.Tensor) -> dict[str, float]:
    """The statistics of :func:`cluster_diagnostics` from hard cluster sizes ``(K,)`` (e.g. k-means labels):
    entropy of the occupancy distribution, clusters holding at least one item, largest cluster's share."""
    if counts.ndim != 1 or counts.shape[0] < 1:
        raise ValueError(f"occupancy_diagnostics: counts must be (K,), got shape {tuple(counts.shape)}.")
    counts = counts.double()
    share = counts / counts.sum().clamp_min(1.0)
    entropy = float(-(share * torch.log(share.clamp_min(1e-300))).sum())
    k = counts.shape[0]
    return {
        "entropy": entropy,
        "normalized_entropy": entropy / math.log(k) if k > 1 else 0.0,
        "clusters_used": int((counts > 0).sum()),
        "largest_share": float(share.max()),
    }


@torch.no_grad()
def token_spread(tokens: torch.Tensor, valid: torch.Tensor) -> float:
    """Share of the slice tokens' energy that varies from slice to slice, averaged over volumes.

    ``sum_d Var_s(x[s, d]) / mean_s ||x[s]||^2`` over the valid slices of each volume: 0 when every slice of a
    volume has the same token (the slice encoder no longer tells slices apart, and masked modelling has
    nothing left to predict), 1 for zero-mean tokens. Volumes with one valid slice are left out.

    Args:
        tokens: ``(B, S, D)`` slice tokens.
        valid: ``(B, S)`` bool, valid slices.
    """
    if tokens.ndim != 3 or valid.shape != tokens.shape[:2]:
        raise ValueError(
            f"token_spread: need tokens (B, S, D) and valid (B, S), got {tuple(tokens.shape)}, "
            f"{tuple(valid.shape)}."
        )
    x = tokens.detach().double()
    weight = valid[..., None].double()
    count = weight.sum(dim=1)  # (B, 1)
    keep = count[:, 0] > 1
    if not bool(keep.any()):
        return float("nan")
    mean = (x * weight).sum(dim=1) / count.clamp_min(1.0)
    variance = ((x - mean[:, None]).pow(2) * weight).sum(dim=(1, 2)) / count[:, 0].clamp_min(1.0)
    energy = (x.pow(2) * weight).sum(dim=(1, 2)) / count[:, 0].clamp_min(1.0)
    spread = variance / energy.clamp_min(torch.finfo(torch.float64).tiny)
    return float(spread[keep].mean())
