"""SwAV, DeepCluster-v2, masked-embedding and joint losses (single process)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import (
    DeepClusterV2Loss,
    JointSSLLoss,
    MaskedEmbeddingLoss,
    SwAVLoss,
    normalize_over_slices,
    prototype_heads,
)
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def branch_from(embeddings: list[torch.Tensor], prototypes: list[torch.Tensor], **local) -> ClusterBranch:
    emb = [F.normalize(e, dim=1) for e in embeddings]
    protos = [F.normalize(p, dim=1) for p in prototypes]
    return ClusterBranch(embeddings=emb, scores=[[e @ p.t() for p in protos] for e in emb], **local)


def test_swav_rewards_agreeing_views() -> None:
    g = torch.Generator().manual_seed(0)
    protos = [torch.randn(8, 16, generator=g), torch.randn(5, 16, generator=g)]
    x = torch.randn(32, 16, generator=g)
    loss = SwAVLoss()
    agree = loss(branch_from([x, x + 0.01 * torch.randn(32, 16, generator=g)], protos))
    disagree = loss(branch_from([x, x[torch.randperm(32, generator=g)]], protos))
    assert agree < disagree


def test_swav_local_views_use_the_codes_of_their_rows() -> None:
    g = torch.Generator().manual_seed(1)
    protos = [torch.randn(6, 8, generator=g)]
    x = torch.randn(10, 8, generator=g)
    rows = torch.tensor([0, 3, 3, 7])
    matching = branch_from([x, x], protos)
    shuffled = branch_from([x, x], protos)
    local_match = branch_from([x[rows]], protos).scores
    local_wrong = branch_from([x[rows.flip(0)] * -1], protos).scores
    matching.local_scores, matching.local_rows = local_match, rows
    shuffled.local_scores, shuffled.local_rows = local_wrong, rows
    assert SwAVLoss()(matching) < SwAVLoss()(shuffled)
    with pytest.raises(ValueError, match="local_scores"):
        SwAVLoss()(ClusterBranch(matching.embeddings, matching.scores, local_match, torch.tensor([0, 1])))


def test_swav_queue_fills_and_changes_codes() -> None:
    g = torch.Generator().manual_seed(2)
    protos = [F.normalize(torch.randn(4, 8, generator=g), dim=1)]
    loss = SwAVLoss(queue_length=12, queue_start_iteration=1, embedding_dim=8)
    batches = [branch_from([torch.randn(5, 8, generator=g) for _ in range(2)], protos) for _ in range(4)]
    loss(batches[0], protos)  # iteration 0: queue not started
    assert int(loss.queue_count) == 0
    loss(batches[1], protos)
    assert int(loss.queue_count) == 5
    torch.testing.assert_close(loss.queue[0, :5], batches[1].embeddings[0])
    loss(batches[2], protos)
    loss(batches[3], protos)
    assert int(loss.queue_count) == 12  # capped at the queue length, newest first
    torch.testing.assert_close(loss.queue[1, :5], batches[3].embeddings[1])
    loss.eval()
    with_queue = loss(batches[0], protos)
    without = SwAVLoss().eval()(batches[0])
    assert not torch.allclose(with_queue, without)
    with pytest.raises(ValueError, match="pass the current prototypes"):
        loss(batches[0])
    assert "queue" in loss.state_dict() and "iteration" in loss.state_dict()
    loss.reset_queue()
    torch.testing.assert_close(loss(batches[0], protos), without)


def test_swav_shapes_are_validated() -> None:
    x = torch.randn(4, 8)
    good = branch_from([x, x], [torch.randn(3, 8)])
    with pytest.raises(ValueError, match="at least 2"):
        SwAVLoss()(ClusterBranch(good.embeddings[:1], good.scores[:1]))
    with pytest.raises(ValueError, match=r"scores\[1\]\[0\]"):
        SwAVLoss()(ClusterBranch(good.embeddings, [good.scores[0], [torch.randn(4, 5)]]))
    with pytest.raises(ValueError, match="embedding_dim"):
        SwAVLoss(queue_length=4)


def test_swav_bf16_autocast_large_scores_no_nan() -> None:
    weights = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = [x @ weights.t() * 1e3, (x + 0.1) @ weights.t() * 1e3]  # far beyond cosine range
        value = SwAVLoss()(ClusterBranch([x, x], [[s] for s in scores]))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(weights.grad).all()


def test_deepcluster_ignores_unassigned_and_learns_assignments() -> None:
    g = torch.Generator().manual_seed(3)
    centres = F.normalize(torch.randn(3, 6, generator=g), dim=1)
    labels = torch.randint(3, (30,), generator=g)
    x = F.normalize(centres[labels] + 0.1 * torch.randn(30, 6, generator=g), dim=1)
    keys = torch.arange(30) * 2  # odd keys never written
    loss = DeepClusterV2Loss(num_samples=60, dim=6, num_prototypes=(3, 4), kmeans_iterations=5)
    protos = [
        torch.randn(3, 6, generator=g, requires_grad=True),
        torch.randn(4, 6, generator=g, requires_grad=True),
    ]
    before = loss(branch_from([x, x], protos), keys)  # nothing assigned yet: zero, still differentiable
    before.backward()
    assert float(before.detach()) == 0.0 and protos[0].grad is not None
    assert bool(loss.written[keys].all()) and not bool(loss.written[keys + 1].any())
    centroids = loss.cluster()
    assert (loss.assignments[:, keys + 1] == -1).all()
    assert (loss.assignments[0, keys] >= 0).all() and (loss.assignments[1, keys] < 4).all()
    loss.eval()
    aligned = loss(branch_from([x, x], centroids), keys)
    misaligned = loss(branch_from([x, x], [c.roll(1, dims=0) for c in centroids]), keys)
    assert aligned < misaligned
    # rows with unassigned keys do not count
    mixed_keys = torch.cat([keys[:20], keys[:10] + 1])
    mixed = loss(branch_from([x[:30], x[:30]], centroids), mixed_keys)
    only_assigned = loss(branch_from([x[:20], x[:20]], centroids), keys[:20])
    torch.testing.assert_close(mixed, only_assigned)
    with pytest.raises(ValueError, match="keys must lie"):
        loss(branch_from([x, x], centroids), keys + 31)


def test_masked_embedding_loss() -> None:
    target = torch.randn(2, 5, 4)
    prediction = target.clone().requires_grad_(True)
    offset = torch.zeros(2, 5, 4)
    offset[0, 1] = 2.0  # masked position, wrong by 2 everywhere
    offset[1, 3] = 1.0  # unmasked valid position, wrong by 1
    offset[1, 4] = 5.0  # padded position: never counted
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = True
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 4] = False
    masked = MaskedEmbeddingLoss(target_norm="none")(prediction + offset, target, mask, valid)
    every = MaskedEmbeddingLoss("all", target_norm="none")(prediction + offset, target, mask, valid)
    torch.testing.assert_close(masked, torch.tensor((4.0 * 4) / (2 * 4)))
    torch.testing.assert_close(every, torch.tensor((4.0 * 4 + 1.0 * 4) / (9 * 4)))
    masked.backward()
    assert prediction.grad is not None
    with pytest.raises(ValueError, match="mask must be a bool"):
        MaskedEmbeddingLoss()(prediction, target, mask.float(), valid)
    with pytest.raises(ValueError, match="share a"):
        MaskedEmbeddingLoss()(prediction, target[:, :3], mask, valid)
    with pytest.raises(ValueError, match="reduction"):
        MaskedEmbeddingLoss("sum")
    with pytest.raises(ValueError, match="target_norm"):
        MaskedEmbeddingLoss(target_norm="token")


def test_masked_embedding_target_is_standardised_over_slices() -> None:
    """Default target: each feature of each volume standardised over its valid slices (hand-computed here);
    the loss is invariant to the scale of the tokens, and predicting the volume's mean token costs
    about 1 per element, however alike the slices are."""
    gen = torch.Generator().manual_seed(0)
    mean_token = torch.randn(2, 1, 6, generator=gen)
    target = mean_token + 1e-2 * torch.randn(2, 7, 6, generator=gen)  # slices nearly identical, as at init
    valid = torch.ones(2, 7, dtype=torch.bool)
    valid[1, 5:] = False
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[0, [1, 4]] = mask[1, 2] = True
    prediction = torch.randn(2, 7, 6, generator=gen)
    loss = MaskedEmbeddingLoss()
    expected = []
    for b, n in enumerate([7, 5]):
        x = target[b, :n].double()
        z = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-6 * x.pow(2).mean())
        rows = mask[b, :n].nonzero()[:, 0]
        expected.append((prediction[b, rows].double() - z[rows]) ** 2)
    torch.testing.assert_close(
        loss(prediction, target, mask, valid).double(), torch.cat(expected).mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        loss(prediction, 0.01 * target, mask, valid),
        loss(prediction, target, mask, valid),
        rtol=1e-3,
        atol=0,
    )
    predict_mean = loss(mean_token.expand(2, 7, 6), target, mask, valid)
    raw = MaskedEmbeddingLoss(target_norm="none")(mean_token.expand(2, 7, 6), target, mask, valid)
    assert float(raw) < 1e-3 and 0.3 < float(predict_mean) < 3.0


def test_slice_standardisation_of_padding_and_single_slices() -> None:
    """Padded positions come out as 0, and so does a volume with one valid slice (nothing varies)."""
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(3, 4, 5, generator=g) + 2.0
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = normalize_over_slices(tokens, valid)
    assert torch.equal(out[~valid], torch.zeros(int((~valid).sum()), 5))
    assert torch.equal(out[1], torch.zeros(4, 5))
    x = tokens[0, :3]
    torch.testing.assert_close(out[0, :3], (x - x.mean(0)) / x.std(0, unbiased=False), rtol=1e-4, atol=1e-5)


def test_masked_loss_without_valid_or_without_selected_positions() -> None:
    """``valid=None``: every position is valid; nothing selected: a zero on the prediction's graph."""
    g = torch.Generator().manual_seed(5)
    target = torch.randn(2, 4, 3, generator=g)
    prediction = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    mask = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    loss = MaskedEmbeddingLoss()
    torch.testing.assert_close(
        loss(prediction, target, mask), loss(prediction, target, mask, torch.ones_like(mask))
    )
    nothing = loss(prediction, target, torch.zeros_like(mask))
    assert float(nothing.detach()) == 0.0
    nothing.backward()
    assert torch.equal(prediction.grad, torch.zeros_like(prediction))


def test_joint_loss_components_and_missing_branches() -> None:
    x = torch.randn(6, 8)
    protos = [torch.randn(4, 8, requires_grad=True)]
    intra_only = JointSSLOutput(intra=branch_from([x, x + 0.1], protos))
    out = JointSSLLoss()(intra_only)
    assert {"loss", "intra"} <= set(out) and "inter" not in out and "mask" not in out
    assert out["loss"].requires_grad and not out["intra"].requires_grad
    assert 0.0 <= out["intra_normalized_entropy"] <= 1.0 and 1 <= out["intra_clusters_used"] <= 4
    nothing = JointSSLLoss()(JointSSLOutput())
    assert set(nothing) == {"loss"} and float(nothing["loss"]) == 0.0
    weighted = JointSSLLoss(w_intra=2.5, diagnostics=False)(intra_only)
    torch.testing.assert_close(weighted["loss"], 2.5 * out["intra"])
    with pytest.raises(ValueError, match="needs intra_keys"):
        JointSSLLoss("deepcluster", intra_prototypes=[4], embedding_dim=8, intra_bank_size=10)(intra_only)
    with pytest.raises(ValueError, match="intra_method must be one of"):
        JointSSLLoss(intra_method="simclr")
    with pytest.raises(ValueError, match="needs inter_bank_size"):
        JointSSLLoss(inter_method="deepcluster", embedding_dim=8)


def test_the_loss_decides_each_level_family_heads_and_use() -> None:
    """One place decides the clustering family: the network's prototypes and the handlers ask the loss."""
    loss = JointSSLLoss("swav", "deepcluster", intra_prototypes=16, inter_prototypes=4, embedding_dim=8,
                        inter_bank_size=20, intra_queue_length=32)  # fmt: skip
    assert isinstance(loss.level("intra"), SwAVLoss) and isinstance(loss.level("inter"), DeepClusterV2Loss)
    assert loss.method("intra") == "swav" and loss.method("inter") == "deepcluster"
    assert loss.prototype_heads("intra") == [16] and loss.prototype_heads("inter") == [4, 4, 4]
    assert loss.level("intra").queue_length == 32 and loss.level("inter").num_samples == 20
    assert loss.uses("intra") and loss.uses("inter") and loss.uses("mask")
    # a zero weight or "none" disables a level; the network still gets its prototype layout
    off = JointSSLLoss("none", "deepcluster", w_inter=0.0, w_mask=0.0, inter_prototypes=4)
    assert off.level("intra") is None and off.level("inter") is None and off.method("inter") is None
    assert not (off.uses("intra") or off.uses("inter") or off.uses("mask"))
    assert off.prototype_heads("intra") == [3000] and off.prototype_heads("inter") == [4, 4, 4]
    assert JointSSLLoss().prototype_heads("inter") == [3000]  # the default of both levels
    assert prototype_heads([5, 7], "swav") == [5, 7] and prototype_heads(5, None) == [5]
    with pytest.raises(ValueError, match="level must be one of"):
        loss.level("volume")


@pytest.mark.parametrize("family", ["swav", "deepcluster"])
def test_joint_loss_falls_on_a_toy_problem(family: str) -> None:
    """Linear slice encoder + prototypes + mask predictor on four separable blobs; SGD must lower the loss."""
    torch.manual_seed(0)
    blobs = torch.randn(4, 12) * 3
    labels = torch.arange(64) % 4
    data = blobs[labels] + torch.randn(64, 12)  # 64 slices = 16 volumes of 4 slices
    encoder = torch.nn.Linear(12, 8)
    intra_protos, inter_protos = torch.nn.Linear(8, 6, bias=False), torch.nn.Linear(8, 3, bias=False)
    predictor = torch.nn.Linear(8, 8)
    mask_token = torch.nn.Parameter(torch.zeros(8))
    params = [*encoder.parameters(), *intra_protos.parameters(), *inter_protos.parameters()]
    params += [*predictor.parameters(), mask_token]
    optimizer = torch.optim.SGD(params, lr=0.2, momentum=0.9)
    criterion = JointSSLLoss(family, family, intra_prototypes=[6], inter_prototypes=[3], embedding_dim=8,
                             intra_bank_size=64, inter_bank_size=16, kmeans_iterations=5)  # fmt: skip
    mask = torch.zeros(16, 4, dtype=torch.bool)
    mask[:, 1] = True
    history = []
    for step in range(40):
        views = [data + 0.3 * torch.randn(64, 12) for _ in range(2)]
        emb = [F.normalize(encoder(v), dim=1) for v in views]
        vol = [F.normalize(e.view(16, 4, 8).mean(1), dim=1) for e in emb]
        w_intra, w_inter = (F.normalize(p.weight, dim=1) for p in (intra_protos, inter_protos))
        tokens = emb[0].view(16, 4, 8)
        masked_tokens = torch.where(mask[..., None], mask_token.expand(16, 4, 8), tokens)
        output = JointSSLOutput(
            intra=ClusterBranch(emb, [[e @ w_intra.t()] for e in emb]),
            inter=ClusterBranch(vol, [[z @ w_inter.t()] for z in vol]),
            masked_prediction=[predictor(masked_tokens.roll(1, dims=1))],
            masked_target=[tokens.detach()],
            mask=[mask],
            valid=torch.ones(16, 4, dtype=torch.bool),
        )
        out = criterion(output, intra_keys=torch.arange(64), inter_keys=torch.arange(16))
        optimizer.zero_grad()
        out["loss"].backward()
        if step < 2:  # SwAV's prototype freezing, as PrototypeHandler does it
            intra_protos.weight.grad = None
        optimizer.step()
        if family == "deepcluster" and step % 10 == 0:  # the clustering schedule a handler would run
            for level, protos in (("intra_loss", intra_protos), ("inter_loss", inter_protos)):
                with torch.no_grad():
                    protos.weight.copy_(getattr(criterion, level).cluster()[0])
        history.append(float(out["loss"]))
    assert all(torch.isfinite(torch.tensor(history)))
    assert sum(history[-5:]) / 5 < 0.7 * sum(history[1:6]) / 5


def test_collapse_statistics_cover_the_rows_sinkhorn_clustered() -> None:
    """Two volumes a step agree on one prototype by chance; the statistics of a SwAV level with a queue count
    the queued rows too, so a level that uses its prototypes is not reported as collapsed."""
    prototypes = torch.eye(4)
    criterion = JointSSLLoss(None, "swav", w_mask=0.0, inter_queue_length=8, embedding_dim=4).train()

    def step(rows: torch.Tensor) -> dict:
        emb = F.normalize(rows, dim=1)
        branch = ClusterBranch([emb, emb], [[emb @ prototypes.t()], [emb @ prototypes.t()]])
        return criterion(JointSSLOutput(inter=branch), inter_prototypes=[prototypes])

    for k in range(4):  # the queue fills with rows near every prototype
        step(torch.eye(4)[[k, k]] + 0.01)
    out = step(torch.eye(4)[[0, 0]] + 0.01)  # this step: both volumes on prototype 0
    assert out["inter_clusters_used"] == 4 and out["inter_largest_share"] <= 0.5
