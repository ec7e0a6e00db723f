"""The parts of spherical k-means, against what they must compute: the chunked assignment equals the
brute-force argmax whatever the chunk size, empty clusters take half of the largest one (faiss's rule), and
the initial centroids are distinct normalised rows of the data."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import kmeans


def test_chunked_assignment_equals_the_argmax_of_all_scores(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(103, 8, generator=g), dim=1)
    centroids = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    expected = (x @ centroids.t()).argmax(dim=1)
    for block in (1 << 24, 7 * 10, 7 * 3, 7, 1):  # one chunk; chunks of 10, 3, 1 rows (the last one short)
        monkeypatch.setattr(kmeans, "_BLOCK_ELEMENTS", block)
        with warnings.catch_warnings():
            warnings.simplefilter(
                "error"
            )  # every chunk is written into the preallocated buffers, never resized
            assert torch.equal(kmeans._assign(x, centroids), expected), block
    assert kmeans._assign(x[:0], centroids).shape == (0,)
    assert torch.equal(kmeans._assign(x[:1], centroids), expected[:1])  # a single row is assigned too


def test_an_empty_cluster_takes_half_of_the_largest_one():
    g = torch.Generator().manual_seed(1)
    centroids = F.normalize(torch.randn(4, 6, generator=g), dim=1)
    before = centroids.clone()
    counts = torch.tensor([9, 0, 3, 0])
    kmeans._reseed_empty(centroids, counts, torch.Generator().manual_seed(2), perturbation=1e-3)
    # cluster 1 splits 9 into 5 + 4; then cluster 3 splits the new largest (5) into 3 + 2
    assert counts.tolist() == [3, 4, 3, 2] and int(counts.sum()) == 12
    assert torch.allclose(centroids.norm(dim=1), torch.ones(4))
    assert torch.equal(centroids[2], before[2])  # a cluster that was not split keeps its centroid
    for j in (0, 1, 3):  # the split ones stay next to the old largest centroid, on either side of it
        assert float(centroids[j] @ before[0]) > 0.999 and not torch.equal(centroids[j], before[0])
    assert float((centroids[0] - before[0]) @ (centroids[1] - before[0])) < 0  # opposite sides
    # the first split moves the largest centroid by -delta and the empty one by +delta, delta drawn from
    # the generator as perturbation * N(0, I); the second split starts from the moved one
    delta = 1e-3 * torch.randn(6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(centroids[1], F.normalize(before[0] + delta, dim=0))
    pair = torch.tensor([0, 2])  # the smallest cluster that can still be split
    kmeans._reseed_empty(F.normalize(torch.randn(2, 6, generator=g), dim=1), pair, torch.Generator(), 1e-3)
    assert pair.tolist() == [1, 1]
    single = torch.tensor([1, 0])  # nothing left to split: unchanged
    two = F.normalize(torch.randn(2, 6, generator=g), dim=1)
    kept = two.clone()
    kmeans._reseed_empty(two, single, torch.Generator().manual_seed(3), perturbation=1e-3)
    assert single.tolist() == [1, 0] and torch.equal(two, kept)


def test_initial_centroids_are_distinct_rows_of_the_data():
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(20, 5, generator=g), dim=1) * 3  # not normalised: the centroids must be
    centroids = kmeans._init_centroids(x, 6, torch.Generator().manual_seed(5), distributed=False)
    rows = F.normalize(x, dim=1)
    matches = (centroids @ rows.t()).isclose(torch.tensor(1.0), atol=1e-6)
    assert matches.any(dim=1).all() and len(set(matches.float().argmax(dim=1).tolist())) == 6
    assert torch.allclose(centroids.norm(dim=1), torch.ones(6))
    more = kmeans._init_centroids(x[:3], 5, torch.Generator().manual_seed(5), distributed=False)
    assert ((more @ F.normalize(x[:3], dim=1).t()).max(dim=1).values > 1 - 1e-6).all()  # rows repeated
    with pytest.raises(ValueError, match=r"^spherical_kmeans: x has no rows on any process\.$"):
        kmeans._init_centroids(x[:0], 2, torch.Generator(), distributed=False)


def test_random_choices_follow_the_given_generator_only():
    """Initialisation (also when rows must be repeated) and re-seeding draw from the seeded generator, so
    every process gets the same centroids whatever its global random state."""
    g = torch.Generator().manual_seed(6)
    x = F.normalize(torch.randn(3, 5, generator=g), dim=1)
    centroids = F.normalize(torch.randn(4, 5, generator=g), dim=1)
    runs = []
    for global_seed in (0, 1, 2):
        torch.manual_seed(global_seed)
        init = kmeans._init_centroids(x, 8, torch.Generator().manual_seed(7), distributed=False)
        split = centroids.clone()
        kmeans._reseed_empty(split, torch.tensor([6, 0, 2, 0]), torch.Generator().manual_seed(8), 1e-3)
        runs.append((init, split))
    for init, split in runs[1:]:
        assert torch.equal(init, runs[0][0]) and torch.equal(split, runs[0][1])
