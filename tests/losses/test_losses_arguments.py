"""The loss constructors' rules at their boundaries: the smallest allowed value builds, the first value past
it is refused with a message that starts with the argument's own name (as the ``jointssl`` line shows it);
the inputs the losses refuse, each with a message that says what was expected."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import (
    DeepClusterV2Loss,
    JointSSLLoss,
    MaskedEmbeddingLoss,
    SwAVLoss,
    clusters_used,
    largest_cluster_share,
    prototype_heads,
)
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput

# (argument, smallest allowed value, first refused value, the rule as worded)
BOUNDARIES = [
    ("w_intra", 0, -1e-9, "a number >= 0"),
    ("w_inter", 0.0, -0.5, "a number >= 0"),
    ("w_mask", 0, -1, "a number >= 0"),
    ("temperature", 1e-9, 0, "a number > 0"),
    ("sinkhorn_epsilon", 1e-9, 0.0, "a number > 0"),
    ("sinkhorn_iterations", 1, 0, "an integer >= 1"),
    ("intra_queue_length", 0, -1, "an integer >= 0"),
    ("inter_queue_length", 0, -1, "an integer >= 0"),
    ("kmeans_iterations", 1, 0, "an integer >= 1"),
    ("seed", 0, -1, "an integer >= 0"),
    ("intra_prototypes", 2, 1, "an integer >= 2"),
    ("inter_prototypes", [2, 2], [2, 1], "an integer >= 2"),
]


@pytest.mark.parametrize(("name", "allowed", "refused", "rule"), BOUNDARIES, ids=[b[0] for b in BOUNDARIES])
def test_each_rule_holds_at_its_boundary_and_names_its_argument(name, allowed, refused, rule):
    settings = {"intra_method": "swav", "inter_method": "deepcluster", "embedding_dim": 8,
                "intra_bank_size": 32, "inter_bank_size": 8}  # fmt: skip
    loss = JointSSLLoss(**{**settings, name: allowed})
    if name.startswith("w_"):
        assert getattr(loss, name) == allowed  # the weight is the one given, not a default
    shown = repr(refused[-1] if isinstance(refused, list) else refused)
    message = rf"^{re.escape(name)} must be {re.escape(rule)}, got {re.escape(shown)}$"
    with pytest.raises(ValueError, match=message):
        JointSSLLoss(**{**settings, name: refused})


def test_methods_are_named_by_level_and_none_disables_a_level():
    for level in ("intra", "inter"):
        options = r"\['swav', 'deepcluster', 'none'\]"
        with pytest.raises(
            ValueError, match=rf"^JointSSLLoss: {level}_method must be one of {options}, got 'byol'\.$"
        ):
            JointSSLLoss(**{f"{level}_method": "byol"})
    loss = JointSSLLoss("none", None, w_mask=1.0)
    assert [loss.uses(level) for level in ("intra", "inter", "mask")] == [False, False, True]


def test_prototype_heads_per_method():
    assert prototype_heads(5, "swav") == [5]
    assert prototype_heads(5, None) == [5]
    assert prototype_heads(5, "deepcluster") == [5, 5, 5]  # three k-means heads, as DeepCluster-v2's recipe
    assert prototype_heads((4, 6), "deepcluster") == [4, 6]
    for bad in ([], "5", True, 5.0):
        with pytest.raises(ValueError, match=r"^heads must be an integer >= 2"):
            prototype_heads(bad, "swav", name="heads")


def _swav_branch(rows: int = 4, prototypes: int = 3, views: int = 2) -> ClusterBranch:
    g = torch.Generator().manual_seed(0)
    emb = [F.normalize(torch.randn(rows, 6, generator=g), dim=1) for _ in range(views)]
    protos = F.normalize(torch.randn(prototypes, 6, generator=g), dim=1)
    return ClusterBranch(emb, [[e @ protos.t()] for e in emb])


def test_swav_constructor_rules_at_their_boundaries():
    SwAVLoss(temperature=1e-9)
    with pytest.raises(ValueError, match=r"^SwAVLoss: temperature must be > 0, got 0\.$"):
        SwAVLoss(temperature=0)
    SwAVLoss(queue_length=0)
    with pytest.raises(ValueError, match=r"^SwAVLoss: queue_length must be >= 0, got -1\.$"):
        SwAVLoss(queue_length=-1)
    SwAVLoss(queue_length=1, embedding_dim=6)
    with pytest.raises(ValueError, match=r"^SwAVLoss: embedding_dim is required when queue_length > 0\.$"):
        SwAVLoss(queue_length=1)
    with pytest.raises(ValueError, match=r"^SwAVLoss: num_prototypes is needed to take part without rows\.$"):
        SwAVLoss().participate_without_rows()


def test_swav_refuses_branches_that_do_not_fit_and_says_what_was_expected():
    good = _swav_branch()
    s0, s1 = good.scores

    def refused(branch: ClusterBranch, message: str, loss: SwAVLoss | None = None, **kwargs) -> None:
        with pytest.raises(ValueError, match=message):
            (loss or SwAVLoss())(branch, **kwargs)

    refused(
        ClusterBranch(good.embeddings, [s0, s1, s1]), r"^SwAVLoss: 3 score views for 2 embedding views\.$"
    )
    three = _swav_branch(views=3)
    # a queue holds the views it was built for, even a queue of one row
    refused(three, r"^SwAVLoss: queue built for 2 views, got 3\.$", SwAVLoss(queue_length=1, embedding_dim=6))
    refused(
        ClusterBranch(good.embeddings, [s0, s1 + s1]),
        r"^SwAVLoss: scores\[1\] has 2 heads, scores\[0\] has 1\.$",
    )
    wide = [torch.zeros(4, 7)]
    refused(
        ClusterBranch(good.embeddings, [s0, wide]),
        r"^SwAVLoss: scores\[1\]\[0\] has shape \(4, 7\), expected \(4, 3\)\.$",
    )
    # the rows are those of the first view's embeddings
    longer = [F.normalize(torch.randn(5, 6), dim=1), good.embeddings[1]]
    refused(
        ClusterBranch(longer, good.scores),
        r"^SwAVLoss: scores\[0\]\[0\] has shape \(4, 3\), expected \(5, 3\)\.$",
    )
    flat = [torch.zeros(4)]
    refused(
        ClusterBranch(good.embeddings, [flat, flat]),
        r"^SwAVLoss: scores\[0\]\[0\] has shape \(4,\), expected \(4, 4\)\.$",
    )
    local = ClusterBranch(good.embeddings, good.scores, [s0])
    refused(local, r"^SwAVLoss: local_scores given without local_rows\.$")
    prototypes = [torch.randn(3, 6), torch.randn(3, 6)]
    refused(good, r"^SwAVLoss: 2 prototype tensors for 1 heads\.$", prototypes=prototypes)
    queued = SwAVLoss(queue_length=4, embedding_dim=6)
    queued(good, [torch.randn(3, 6)])
    refused(good, r"^SwAVLoss: the queue is in use, pass the current prototypes to forward\(\)\.$", queued)


DEEPCLUSTER_SMALLEST = {"num_samples": 1, "dim": 1, "num_views": 1, "num_prototypes": (1,)}


@pytest.mark.parametrize(
    ("name", "refused", "shown"),
    [("num_samples", 0, "0"), ("dim", 0, "0"), ("num_views", 0, "0"), ("num_prototypes", (), r"\(\)"),
     ("num_prototypes", (2, 0), r"\(2, 0\)")],
)  # fmt: skip
def test_deepcluster_sizes_at_their_boundaries(name: str, refused, shown: str) -> None:
    DeepClusterV2Loss(**DEEPCLUSTER_SMALLEST, temperature=1e-9)
    with pytest.raises(ValueError, match=rf"^DeepClusterV2Loss: invalid sizes .*\b{name}={shown}"):
        DeepClusterV2Loss(**{**DEEPCLUSTER_SMALLEST, name: refused})
    with pytest.raises(ValueError, match=r"^DeepClusterV2Loss: temperature must be > 0, got 0\.$"):
        DeepClusterV2Loss(**DEEPCLUSTER_SMALLEST, temperature=0)


def test_deepcluster_keys_and_scores_are_checked():
    loss = DeepClusterV2Loss(num_samples=10, dim=6, num_prototypes=(3,)).eval()
    branch = _swav_branch(rows=4, prototypes=3)

    def refused(keys, message: str, target: ClusterBranch = branch) -> None:
        with pytest.raises(ValueError, match=message):
            loss(target, keys)

    refused(torch.arange(5), r"^DeepClusterV2Loss: keys must be a \(4,\) tensor, got \(5,\)\.$")
    refused([0, 1, 2, 3], r"^DeepClusterV2Loss: keys must be a \(4,\) tensor, got list\.$")
    refused(
        torch.tensor([0, 1, 2, 10]), r"^DeepClusterV2Loss: keys must lie in \[0, 10\), got range \[0, 10\]"
    )
    refused(
        torch.tensor([-1, 1, 2, 9]), r"^DeepClusterV2Loss: keys must lie in \[0, 10\), got range \[-1, 9\]"
    )
    longer = ClusterBranch([torch.randn(5, 6), branch.embeddings[1]], branch.scores)
    refused(torch.arange(4), r"^DeepClusterV2Loss: keys must be a \(5,\) tensor, got \(4,\)\.$", longer)
    local = ClusterBranch(branch.embeddings, branch.scores, [branch.scores[0]])
    refused(torch.arange(4), r"^DeepClusterV2Loss: local_scores given without local_rows\.$", local)
    two_heads = ClusterBranch(branch.embeddings, [branch.scores[0], branch.scores[1] * 2])
    refused(torch.arange(4), r"^DeepClusterV2Loss: view 1 has 2 heads, expected 1\.$", two_heads)
    wide = ClusterBranch(branch.embeddings, [[torch.zeros(4, 5)], branch.scores[1]])
    refused(
        torch.arange(4),
        r"^DeepClusterV2Loss: scores of view 0, head 0 have shape \(4, 5\), expected \(4, 3\)\.$",
        wide,
    )
    # keys of any integer type are read as indices, as long keys are
    loss.assignments[0] = torch.arange(10) % 3
    expected = loss(branch, torch.tensor([9, 2, 5, 1]))
    for dtype in (torch.int16, torch.int32, torch.uint8):
        torch.testing.assert_close(loss(branch, torch.tensor([9, 2, 5, 1], dtype=dtype)), expected)


def test_masked_loss_names_the_mask_that_does_not_fit():
    prediction = torch.zeros(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"^MaskedEmbeddingLoss: valid must be a bool \(B, S\) = \(2, 5\) tensor, got "
    ):
        MaskedEmbeddingLoss()(prediction, prediction, mask, mask.float())
    with pytest.raises(
        ValueError, match=r"^MaskedEmbeddingLoss: mask must be a bool \(B, S\) = \(2, 5\) tensor, got "
    ):
        MaskedEmbeddingLoss()(prediction, prediction, mask[:, :4])


def test_diagnostics_take_codes_of_one_cluster_or_more():
    assert clusters_used(torch.ones(3, 1)) == 1 and largest_cluster_share(torch.ones(3, 1)) == 1.0
    for bad in (torch.ones(4), torch.ones(3, 0)):
        shown = re.escape(str(tuple(bad.shape)))
        with pytest.raises(
            ValueError, match=rf"^cluster diagnostics: codes must be \(N, K\), got shape {shown}\.$"
        ):
            clusters_used(bad)


def test_joint_loss_input_rules_name_what_is_missing():
    with pytest.raises(ValueError, match=r"^prototypes must be an integer >= 2"):
        prototype_heads(1, "swav")
    with pytest.raises(
        ValueError, match=r"needs inter_bank_size \(the number of memory-bank keys\) and embedding_dim\.$"
    ):
        JointSSLLoss(inter_method="deepcluster", embedding_dim=6)
    loss = JointSSLLoss(inter_method="deepcluster", inter_prototypes=[3], embedding_dim=6, inter_bank_size=10)
    with pytest.raises(
        ValueError, match=r"^JointSSLLoss: DeepCluster-v2 at the inter level needs inter_keys\.$"
    ):
        loss(JointSSLOutput(inter=_swav_branch()))
    with pytest.raises(TypeError, match=r"^JointSSLLoss: expected a JointSSLOutput, got dict\.$"):
        loss({"inter": None})
    tokens = torch.zeros(2, 5, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for target, masks in ((None, [mask]), ([tokens], None)):
        with pytest.raises(
            ValueError, match=r"^JointSSLLoss: masked_prediction given without masked_target or mask\.$"
        ):
            loss(JointSSLOutput(masked_prediction=[tokens], masked_target=target, mask=masks))
    with pytest.raises(ValueError, match="zip"):  # one target for two masked views
        loss(JointSSLOutput(masked_prediction=[tokens, tokens], masked_target=[tokens], mask=[mask, mask]))
