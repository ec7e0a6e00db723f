"""What the losses keep between steps and what the joint loss reports: SwAV's queue schedule, DeepCluster-v2's
clustering schedule and labels, counters that survive checkpoints exactly, the joint loss's settings reaching
its parts, the collapse statistics and the terms present in a batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import (
    DeepClusterV2Loss,
    JointSSLLoss,
    SwAVLoss,
    cluster_diagnostics,
    spherical_kmeans,
    token_spread,
)
from jointssl_monai.losses import joint as joint_module
from jointssl_monai.losses import swav as swav_module
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput


def branch(rows: int, prototypes: torch.Tensor, seed: int, views: int = 2) -> ClusterBranch:
    g = torch.Generator().manual_seed(seed)
    emb = [F.normalize(torch.randn(rows, prototypes.shape[1], generator=g), dim=1) for _ in range(views)]
    return ClusterBranch(emb, [[e @ prototypes.t()] for e in emb])


PROTOS = F.normalize(torch.randn(5, 6, generator=torch.Generator().manual_seed(0)), dim=1)


def queue_rows_after(loss: SwAVLoss, steps: int) -> list[int]:
    """Rows in the queue after each of ``steps`` training steps of 3 rows."""
    filled = []
    for step in range(steps):
        loss.train()(branch(3, PROTOS, seed=step), [PROTOS])
        filled.append(int(loss.queue_count))
    return filled


def test_swav_queue_starts_at_the_given_iteration() -> None:
    assert queue_rows_after(SwAVLoss(queue_length=8, embedding_dim=6), 3) == [3, 6, 8]  # from the first step
    assert queue_rows_after(SwAVLoss(queue_length=8, queue_start_iteration=2, embedding_dim=6), 4) == [
        0,
        0,
        3,
        6,
    ]
    joint = JointSSLLoss(None, "swav", w_mask=0, inter_prototypes=5, inter_queue_length=8, embedding_dim=6)
    late = JointSSLLoss(None, "swav", w_mask=0, inter_prototypes=5, inter_queue_length=8, embedding_dim=6,
                        queue_start_iteration=2)  # fmt: skip
    for criterion, expected in ((joint, [3, 6, 8]), (late, [0, 0, 3])):
        filled = []
        for step in range(3):
            criterion(JointSSLOutput(inter=branch(3, PROTOS, seed=step)), inter_prototypes=[PROTOS])
            filled.append(int(criterion.inter_loss.queue_count))
        assert filled == expected


def test_a_queue_of_one_row_is_used() -> None:
    loss = SwAVLoss(queue_length=1, embedding_dim=6)
    assert queue_rows_after(loss, 2) == [1, 1]
    torch.testing.assert_close(
        loss.queue[:, 0], torch.stack([e[0] for e in branch(3, PROTOS, seed=1).embeddings])
    )
    batch = branch(3, PROTOS, seed=7)
    with_queue = loss.eval()(batch, [PROTOS])
    assert abs(float(with_queue - SwAVLoss().eval()(batch))) > 1e-4  # the queued row changes the codes


def test_a_resumed_queue_waits_for_the_start_iteration() -> None:
    """A checkpoint's queue rows are not used before this run's ``queue_start_iteration``."""
    filled = SwAVLoss(queue_length=8, embedding_dim=6)
    queue_rows_after(filled, 2)
    resumed = SwAVLoss(queue_length=8, queue_start_iteration=10, embedding_dim=6)
    resumed.load_state_dict(filled.state_dict())
    batch = branch(3, PROTOS, seed=8)
    torch.testing.assert_close(resumed.eval()(batch, [PROTOS]), SwAVLoss().eval()(batch))


def test_queued_rows_are_scored_against_unit_prototypes() -> None:
    """Prototype rows of any length give the queued rows the same (cosine) scores."""
    loss = SwAVLoss(queue_length=6, embedding_dim=6)
    queue_rows_after(loss, 2)
    batch = branch(3, PROTOS, seed=9)
    scaled = PROTOS * torch.tensor([[0.5], [2.0], [3.0], [1.0], [7.0]])
    loss.eval()
    torch.testing.assert_close(loss(batch, [scaled]), loss(batch, [PROTOS]))
    torch.testing.assert_close(loss.double()(batch, [PROTOS.double()]), loss.float()(batch, [PROTOS]))


def test_counters_are_exact_integers() -> None:
    """Iteration and clustering counters keep counting past 2**24 (where a float32 counter stalls), and a
    checkpoint gives every counter back exactly."""
    big = 2**24
    loss = SwAVLoss(queue_length=4, queue_start_iteration=big + 1, embedding_dim=6)
    loss.iteration.fill_(big)
    assert queue_rows_after(loss, 2) == [0, 3]  # the step after 2**24 starts the queue
    empty_rows = SwAVLoss(queue_length=big + 2, embedding_dim=0)
    state = {"queue": torch.zeros(2, big + 2, 0), "queue_count": torch.tensor(big + 1),
             "iteration": torch.tensor(big + 3)}  # fmt: skip
    empty_rows.load_state_dict(state)
    assert {k: int(v) for k, v in empty_rows.state_dict().items() if k != "queue"} == {
        "queue_count": big + 1, "iteration": big + 3}  # fmt: skip

    x = circle(200)
    clusterer = DeepClusterV2Loss(
        num_samples=200, dim=2, num_prototypes=(8,), num_views=1, kmeans_iterations=2
    )
    clusterer.update_memory([x], torch.arange(200))
    clusterer.num_clusterings.fill_(big)
    first, second = clusterer.cluster()[0], clusterer.cluster()[0]
    for n, got in ((big, first), (big + 1, second)):
        expected = spherical_kmeans(x, 8, 2, generator=torch.Generator().manual_seed(n)).centroids
        torch.testing.assert_close(got, expected)
    assert not torch.allclose(first, second)


def circle(n: int) -> torch.Tensor:
    """Unit rows at random angles in 2D: k-means (seed 0) is still moving after 10 iterations."""
    t = torch.rand(n, generator=torch.Generator().manual_seed(0)) * 2 * math.pi
    return F.normalize(torch.stack([t.cos(), t.sin()], dim=1), dim=1)


@pytest.mark.parametrize(
    ("options", "iterations", "seed"), [({}, 10, 0), ({"kmeans_iterations": 3, "seed": 5}, 3, 5)]
)
def test_deepcluster_clusters_with_its_documented_schedule(options: dict, iterations: int, seed: int) -> None:
    """10 k-means iterations and seed 0 unless given, the ``n``-th clustering seeded ``seed + n``; the joint
    loss hands both settings to its DeepCluster-v2 levels."""
    x = circle(200)
    alone = DeepClusterV2Loss(num_samples=200, dim=2, num_prototypes=(8,), num_views=1, **options)
    joint = JointSSLLoss("none", "deepcluster", inter_prototypes=[8], embedding_dim=2, inter_bank_size=200,
                         **options).inter_loss  # fmt: skip
    joint.update_memory([x, x], torch.arange(200))
    alone.update_memory([x], torch.arange(200))
    for n in range(2):
        expected = spherical_kmeans(x, 8, iterations, generator=torch.Generator().manual_seed(seed + n))
        for loss in (alone, joint):
            torch.testing.assert_close(loss.cluster()[0], expected.centroids)
            assert torch.equal(loss.bank_labels(), expected.assignments)


def test_bank_labels_are_minus_one_until_clustered_and_default_to_the_first_head() -> None:
    loss = DeepClusterV2Loss(num_samples=30, dim=2, num_prototypes=(4, 9), num_views=1, kmeans_iterations=2)
    keys = torch.arange(0, 30, 2)
    loss.update_memory([circle(15)], keys)
    assert torch.equal(loss.bank_labels(), torch.full((15,), -1))
    loss.cluster()
    for head in (0, 1):
        assert torch.equal(loss.bank_labels(head), loss.assignments[head, keys])
    assert torch.equal(loss.bank_labels(), loss.bank_labels(0)) and int(loss.bank_labels(1).max()) > 3


def two_view_branch(collapsed_view: int) -> ClusterBranch:
    """Two views, two heads; in head 0 every row of ``collapsed_view`` prefers prototype 0 and the other view
    spreads; head 1 scores every prototype alike."""
    eye = torch.eye(4)
    spread = F.normalize(eye + 0.1, dim=1).repeat(2, 1)
    collapsed = F.normalize(
        eye[[0] * 8] + 0.1 * torch.rand(8, 4, generator=torch.Generator().manual_seed(1)), dim=1
    )
    emb = [collapsed, spread] if collapsed_view == 0 else [spread, collapsed]
    return ClusterBranch(emb, [[e @ eye.t(), torch.zeros(8, 4)] for e in emb])  # head 1: no preference


@pytest.mark.parametrize("collapsed_view", [0, 1])
def test_statistics_describe_the_first_view_and_head(collapsed_view: int) -> None:
    """The collapse statistics of a level are those of view 0, head 0 (softmax of its scores): exactly the
    three documented keys per level."""
    output = JointSSLOutput(intra=two_view_branch(collapsed_view))
    result = JointSSLLoss(inter_method=None, intra_prototypes=[4, 4])(output)
    stats = cluster_diagnostics(F.softmax(output.intra.scores[0][0] / 0.1, dim=1))
    assert {k for k in result if k.startswith("intra_")} == {
        "intra_normalized_entropy", "intra_clusters_used", "intra_largest_share"}  # fmt: skip
    for key in ("normalized_entropy", "clusters_used", "largest_share"):
        assert result[f"intra_{key}"] == pytest.approx(stats[key])
    assert result["intra_clusters_used"] == (1 if collapsed_view == 0 else 4)
    # before its first forward a SwAV level is described by the branch it is given
    fresh = JointSSLLoss._level_health(SwAVLoss(), output.intra)
    assert fresh == pytest.approx(cluster_diagnostics(F.softmax(output.intra.scores[0][0] / 0.1, dim=1)))


def test_statistics_of_a_level_with_one_row_and_with_none() -> None:
    criterion = JointSSLLoss(intra_method=None, inter_prototypes=5, w_mask=0)
    one = criterion(JointSSLOutput(inter=branch(1, PROTOS, seed=2)))
    assert one["inter_clusters_used"] == 1 and one["inter_largest_share"] == 1.0
    none = criterion(JointSSLOutput(inter=branch(0, PROTOS, seed=2)))
    assert set(none) == {"loss", "inter"} and float(none["inter"]) == 0.0


def test_token_spread_is_reported_for_the_first_masked_view() -> None:
    g = torch.Generator().manual_seed(3)
    tokens = [torch.randn(2, 4, 3, generator=g), torch.zeros(2, 4, 3)]
    valid = torch.ones(2, 4, dtype=torch.bool)
    mask = [torch.zeros(2, 4, dtype=torch.bool)] * 2
    criterion = JointSSLLoss(None, None)
    out = criterion(JointSSLOutput(masked_prediction=tokens, masked_target=tokens, mask=mask, valid=valid))
    assert (
        out["mask_token_spread"] == pytest.approx(token_spread(tokens[0], valid))
        and out["mask_token_spread"] > 0.1
    )
    assert "mask_token_spread" not in criterion(
        JointSSLOutput(masked_prediction=tokens, masked_target=tokens, mask=mask)
    )
    assert "mask_token_spread" not in criterion(JointSSLOutput(valid=valid))


def test_the_terms_present_in_the_batch_make_the_loss() -> None:
    """A batch without slices still has its volume term; with ``w_mask=0`` the masked views are left out and
    the loss is a zero."""
    inter = branch(4, PROTOS, seed=4)
    out = JointSSLLoss(inter_prototypes=5, diagnostics=False)(JointSSLOutput(inter=inter))
    torch.testing.assert_close(out["loss"], SwAVLoss()(inter))
    assert set(out) == {"loss", "inter"}
    tokens = torch.randn(2, 4, 3)
    masked = JointSSLOutput(
        masked_prediction=[tokens], masked_target=[tokens + 1], mask=[torch.ones(2, 4, dtype=torch.bool)]
    )
    assert (
        set(JointSSLLoss(w_mask=0)(masked)) == {"loss"}
        and float(JointSSLLoss(w_mask=0)(masked)["loss"]) == 0.0
    )


def test_joint_swav_levels_get_the_prototypes_and_sizes_they_need(monkeypatch) -> None:
    """The intra prototypes reach a queued intra level; a level absent here but present on another process
    joins its Sinkhorn with the configured prototype counts when no prototypes are passed."""
    criterion = JointSSLLoss(intra_prototypes=5, inter_prototypes=[3, 4], intra_queue_length=6,
                             embedding_dim=6, w_mask=0)  # fmt: skip
    for step in range(3):
        criterion(JointSSLOutput(intra=branch(3, PROTOS, seed=step)), intra_prototypes=[PROTOS])
    assert int(criterion.intra_loss.queue_count) == 6
    calls = []

    def record(scores, epsilon, iterations, distributed=None):
        calls.append(tuple(scores.shape))
        return torch.softmax(scores, dim=1)

    flags = []
    monkeypatch.setattr(swav_module, "sinkhorn_knopp", record)
    monkeypatch.setattr(joint_module, "is_dist", lambda: True)
    monkeypatch.setattr(joint_module, "world_size", lambda: 2)
    monkeypatch.setattr(
        joint_module, "all_reduce_max", lambda f: flags.append(f.clone()) or torch.tensor([1, 1])
    )
    criterion(JointSSLOutput())
    assert calls == [(0, 5), (0, 5), (0, 3), (0, 3), (0, 4), (0, 4)]
    assert flags[0].dtype == torch.int32 and flags[0].tolist() == [0, 0]
    calls.clear()
    monkeypatch.setattr(joint_module, "all_reduce_max", lambda f: torch.tensor([1, 0], dtype=torch.int32))
    criterion(JointSSLOutput())
    assert calls == [(0, 5), (0, 5)]  # only the intra level is present elsewhere
    calls.clear()
    monkeypatch.setattr(joint_module, "world_size", lambda: 1)  # a group of one: nothing to agree on
    monkeypatch.setattr(
        joint_module, "all_reduce_max", lambda f: pytest.fail("no exchange in a group of one")
    )
    criterion(JointSSLOutput())
    assert calls == []


def test_one_view_levels() -> None:
    """DeepCluster-v2 built for one view scores a one-view branch; a disabled level ignores its branch,
    whatever it holds, and leaves a zero loss."""
    x = circle(12)
    one_view = ClusterBranch([x], [[x @ x[:4].t()]])
    loss = DeepClusterV2Loss(num_samples=12, dim=2, num_prototypes=(4,), num_views=1, temperature=0.5)
    loss.assignments[0] = torch.arange(12) % 4
    expected = F.cross_entropy(one_view.scores[0][0] / 0.5, torch.arange(12) % 4)
    torch.testing.assert_close(loss.eval()(one_view, torch.arange(12)), expected)
    out = JointSSLLoss(None, None, w_mask=0)(JointSSLOutput(intra=one_view))
    assert set(out) == {"loss"} and float(out["loss"]) == 0.0
