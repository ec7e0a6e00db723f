"""Sinkhorn codes, spherical k-means and the collapse diagnostics (single process)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import (
    cluster_diagnostics,
    clusters_used,
    largest_cluster_share,
    mean_assignment_entropy,
    sinkhorn_knopp,
    spherical_kmeans,
)


def adjusted_rand_index(a: torch.Tensor, b: torch.Tensor) -> float:
    """Hubert & Arabie's ARI from the contingency table."""
    table = torch.zeros(int(a.max()) + 1, int(b.max()) + 1, dtype=torch.float64)
    table.index_put_((a, b), torch.ones(a.numel(), dtype=torch.float64), accumulate=True)

    def pairs(t: torch.Tensor) -> torch.Tensor:
        return (t * (t - 1) / 2).sum()

    index, rows, cols, total = (
        pairs(table),
        pairs(table.sum(1)),
        pairs(table.sum(0)),
        a.numel() * (a.numel() - 1) / 2,
    )
    expected = rows * cols / total
    return float((index - expected) / ((rows + cols) / 2 - expected))


def planted(n: int, dim: int, k: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    labels = torch.randint(k, (n,), generator=g)
    return F.normalize(centres[labels] + noise * torch.randn(n, dim, generator=g), dim=1), labels


def test_ari_helper_is_sane() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    assert adjusted_rand_index(labels, (labels + 1) % 3) == pytest.approx(1.0)
    assert adjusted_rand_index(labels, torch.tensor([0, 1, 0, 1, 0, 1])) < 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sinkhorn_marginals(dtype: torch.dtype) -> None:
    scores = F.normalize(torch.randn(64, 16, dtype=dtype, generator=torch.Generator().manual_seed(0)), dim=1)
    codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=200)
    assert codes.dtype == dtype and codes.shape == (64, 16)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64, dtype=dtype))  # each sample sums to 1
    # each prototype gets 1/K of the total mass B
    torch.testing.assert_close(
        codes.sum(dim=0) / 64, torch.full((16,), 1 / 16, dtype=dtype), atol=1e-5, rtol=0
    )
    # three iterations: rows exact, columns closer to uniform than the softmax's
    few = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    torch.testing.assert_close(few.sum(dim=1), torch.ones(64, dtype=dtype))
    softmax_spread = (F.softmax(scores / 0.05, dim=1).sum(0) / 64 - 1 / 16).abs().max()
    assert (few.sum(dim=0) / 64 - 1 / 16).abs().max() < softmax_spread


def test_sinkhorn_is_shift_invariant_and_safe_for_large_scores() -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(32, 10, dtype=torch.float64, generator=g)
    shifted = scores + 7.0 * torch.randn(
        1, 10, dtype=torch.float64, generator=g
    )  # per-prototype shift: same solution
    torch.testing.assert_close(sinkhorn_knopp(scores), sinkhorn_knopp(shifted))
    huge = sinkhorn_knopp(scores.float() * 1e4)  # exp(2e5) would overflow without the max shift
    assert torch.isfinite(huge).all()
    # a sample that is some prototype's best match keeps its mass; one far below every prototype's best
    # (here by 1e4 * gap / epsilon) underflows to an all-zero code, as documented, never to NaN
    best = torch.zeros(32, dtype=torch.bool)
    best[scores.argmax(dim=0)] = True
    row_sums = huge.sum(dim=1)
    torch.testing.assert_close(row_sums[best], torch.ones(int(best.sum())))
    assert bool((((row_sums - 1).abs() < 1e-5) | (row_sums == 0)).all())


def test_sinkhorn_zero_mass_prototype_and_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(16, 6, generator=g)
    scores[:, 2] = -1e6  # a prototype nobody is near: exp underflows everywhere
    codes = sinkhorn_knopp(scores)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = (torch.randn(16, 6, generator=g) * 1e3).to(torch.bfloat16)
        codes = sinkhorn_knopp(low)
    assert codes.dtype == torch.float32 and torch.isfinite(codes).all()


def test_sinkhorn_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="scores must be"):
        sinkhorn_knopp(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(3, 4), epsilon=0.0)


def test_kmeans_recovers_planted_clusters() -> None:
    x, labels = planted(600, 16, 6, noise=0.2, seed=0)
    result = spherical_kmeans(x, 6, iterations=10, seed=1)
    assert adjusted_rand_index(labels, result.assignments) > 0.95
    assert torch.allclose(result.centroids.norm(dim=1), torch.ones(6))
    assert torch.equal(result.counts, torch.bincount(result.assignments, minlength=6))
    # deterministic for a seed
    again = spherical_kmeans(x, 6, iterations=10, seed=1)
    assert torch.equal(again.assignments, result.assignments)


def test_kmeans_reseeds_empty_clusters() -> None:
    x, labels = planted(400, 8, 4, noise=0.1, seed=3)
    # two centroids start in one blob and two far from every point: without re-seeding two clusters stay
    # empty and the other blobs share centroids
    far = -F.normalize(x.mean(dim=0, keepdim=True), dim=1)
    other_far = F.normalize(
        far + 0.3 * F.normalize(torch.randn(1, 8, generator=torch.Generator().manual_seed(0))), dim=1
    )
    blob0 = x[labels == 0][:2]
    init = torch.cat([blob0, x[labels == 1][:1], far, other_far])
    plain = spherical_kmeans(x, 5, iterations=0, init=init)
    assert int((plain.counts == 0).sum()) >= 2
    result = spherical_kmeans(x, 5, iterations=10, init=init)
    assert int((result.counts == 0).sum()) == 0
    # five clusters over four blobs: every cluster holds one blob only
    for cluster in range(5):
        assert labels[result.assignments == cluster].unique().numel() == 1


def test_kmeans_more_clusters_than_rows_and_bad_input() -> None:
    x, _ = planted(5, 4, 2, noise=0.3, seed=0)
    result = spherical_kmeans(x, 8, iterations=3)
    assert torch.isfinite(result.centroids).all() and int(result.counts.sum()) == 5
    with pytest.raises(ValueError, match="x must be"):
        spherical_kmeans(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="init must be"):
        spherical_kmeans(x, 2, init=torch.zeros(3, 4))


def test_collapse_diagnostics() -> None:
    k = 8
    uniform = torch.eye(k).repeat(4, 1)  # every cluster used equally
    collapsed = torch.zeros(32, k)
    collapsed[:, 3] = 1.0
    assert float(mean_assignment_entropy(uniform)) == pytest.approx(math.log(k))
    assert float(mean_assignment_entropy(uniform, normalized=True)) == pytest.approx(1.0)
    assert float(mean_assignment_entropy(collapsed)) == pytest.approx(0.0, abs=1e-9)
    assert clusters_used(uniform) == k and clusters_used(collapsed) == 1
    assert largest_cluster_share(uniform) == pytest.approx(1 / k)
    assert largest_cluster_share(collapsed) == pytest.approx(1.0)
    stats = cluster_diagnostics(
        torch.softmax(torch.randn(32, k, generator=torch.Generator().manual_seed(3)), dim=1)
    )
    assert set(stats) == {"entropy", "normalized_entropy", "clusters_used", "largest_share"}
    assert 0.0 < stats["normalized_entropy"] <= 1.0
