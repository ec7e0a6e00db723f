"""The clustering losses against short independent references written here from the papers' formulas.

SwAV: Caron et al., NeurIPS 2020, Eq. 1-3 and Alg. 1 (Sinkhorn-Knopp with SwAV's normalisation order).
DeepCluster-v2: cross-entropy of ``scores / temperature`` against k-means pseudo-labels. Joint loss: the
weighted sum of its parts (Nguyen et al., AAAI 2023).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import (
    DeepClusterV2Loss,
    JointSSLLoss,
    MaskedEmbeddingLoss,
    SwAVLoss,
    sinkhorn_knopp,
)
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput


def reference_sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn, plain: exp, total to 1, then per prototype to 1/K and per sample to 1/B, times B."""
    q = torch.exp(scores / epsilon).t()  # (K, B)
    q = q / q.sum()
    k, b = q.shape
    for _ in range(iterations):
        q = q / (k * q.sum(dim=1, keepdim=True))
        q = q / (b * q.sum(dim=0, keepdim=True))
    return (b * q).t()


def reference_swav(
    scores: list[list[torch.Tensor]],
    local_scores: list[list[torch.Tensor]],
    local_rows: torch.Tensor | None,
    temperature: float,
    epsilon: float,
    iterations: int = 3,
) -> torch.Tensor:
    """Eq. 1-3: mean over heads, code views v and predicting views p != v of -sum_k q_v log p_p."""

    def swapped(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return -(q * torch.log_softmax(z / temperature, dim=1)).sum(dim=1).mean()

    per_head = []
    for h in range(len(scores[0])):
        per_code_view = []
        for v, view in enumerate(scores):
            q = reference_sinkhorn(view[h], epsilon, iterations)
            terms = [swapped(q, other[h]) for p, other in enumerate(scores) if p != v]
            terms += [swapped(q[local_rows], local[h]) for local in local_scores]
            per_code_view.append(torch.stack(terms).mean())
        per_head.append(torch.stack(per_code_view).mean())
    return torch.stack(per_head).mean()


def clustered(rows: int, dim: int, seed: int, centres: int = 4, spread: float = 0.1) -> torch.Tensor:
    """Float64 unit rows drawn around a few random unit centres."""
    g = torch.Generator().manual_seed(seed)
    hubs = F.normalize(torch.randn(centres, dim, generator=g, dtype=torch.float64), dim=1)
    picks = torch.randint(centres, (rows,), generator=g)
    noise = spread * torch.randn(rows, dim, generator=g, dtype=torch.float64)
    return F.normalize(hubs[picks] + noise, dim=1)


def unit_rows(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)).double(), dim=1)


@pytest.mark.parametrize("batch,prototypes", [(32, 10), (64, 100), (256, 3000)])
def test_sinkhorn_matches_swav_reference(batch: int, prototypes: int) -> None:
    scores = clustered(batch, 16, seed=batch) @ unit_rows(prototypes, 16, seed=prototypes).t()
    expected = reference_sinkhorn(scores, epsilon=0.05, iterations=3)
    got = sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def views_of(base: torch.Tensor, protos: list[torch.Tensor], seed: int, jitter: float = 0.2):
    """Scores of a noisy unit view of ``base`` for every prototype head."""
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(base + jitter * torch.randn(base.shape, generator=g, dtype=base.dtype), dim=1)
    return emb, [emb @ p.t() for p in protos]


def multicrop_branch(num_global: int, local_rows: torch.Tensor | None) -> ClusterBranch:
    """24 float64 rows, two heads (10 and 30 prototypes), ``num_global`` global views and, when
    ``local_rows`` is given, two local views of those rows."""
    base = clustered(24, 16, seed=5)
    protos = [unit_rows(10, 16, seed=6), unit_rows(30, 16, seed=7)]
    globals_ = [views_of(base, protos, seed=10 + v) for v in range(num_global)]
    branch = ClusterBranch([e for e, _ in globals_], [s for _, s in globals_])
    if local_rows is not None:
        branch.local_scores = [
            views_of(base[local_rows], protos, seed=20 + i, jitter=0.4)[1] for i in range(2)
        ]
        branch.local_rows = local_rows
    return branch


# The losses compute their cross-entropy in float32 whatever the score dtype (values of a few units).
CE_TOL = {"atol": 1e-6, "rtol": 1e-7}
SWAV_SETTINGS = [(0.1, 0.05), (0.05, 0.03), (0.5, 0.1), (0.1, 0.03), (0.05, 0.1)]


@pytest.mark.parametrize("temperature,epsilon", SWAV_SETTINGS)
def test_swav_loss_and_codes_match_reference(temperature: float, epsilon: float) -> None:
    branch = multicrop_branch(num_global=2, local_rows=None)
    for head in branch.scores[1]:
        head.requires_grad_(True)
    got = SwAVLoss(temperature=temperature, epsilon=epsilon)(branch)
    expected = reference_swav(branch.scores, [], None, temperature, epsilon)
    torch.testing.assert_close(got.double(), expected, **CE_TOL)
    # The codes q_0 of view 0 are fixed targets: d loss / d scores_1 = (softmax(scores_1 / T) - q_0) / (TNVH)
    # with N = 24 rows, V = 2 code views and H = 2 heads, so the gradient gives the codes back.
    got.backward()
    scale = temperature * 24 * 2 * 2
    recovered = [torch.softmax(s.detach() / temperature, dim=1) - scale * s.grad for s in branch.scores[1]]
    for h, codes in enumerate(recovered):
        torch.testing.assert_close(codes, reference_sinkhorn(branch.scores[0][h], epsilon), atol=1e-6, rtol=0)


@pytest.mark.parametrize("temperature,epsilon", SWAV_SETTINGS[:3])
def test_swav_multicrop_matches_reference_on_the_rows_of_the_local_views(
    temperature: float, epsilon: float
) -> None:
    rows = torch.tensor([17, 3, 3, 22, 9, 0, 11, 5])  # not 0..n-1, one row twice
    branch = multicrop_branch(num_global=3, local_rows=rows)
    got = SwAVLoss(temperature=temperature, epsilon=epsilon)(branch)
    expected = reference_swav(branch.scores, branch.local_scores, rows, temperature, epsilon)
    torch.testing.assert_close(got.double(), expected, **CE_TOL)
    first_rows = torch.arange(rows.numel())
    wrong = reference_swav(branch.scores, branch.local_scores, first_rows, temperature, epsilon)
    assert abs(float(wrong - expected)) > 1e-3  # the check above can tell the rows apart


def test_deepcluster_loss_matches_hand_labels() -> None:
    temperature = 0.3
    loss = DeepClusterV2Loss(num_samples=40, dim=16, num_prototypes=(10, 30), temperature=temperature).eval()
    keys = torch.tensor([4, 9, 13, 21, 30, 31, 36, 2])
    g = torch.Generator().manual_seed(8)
    for h, k in enumerate(loss.num_prototypes):
        loss.assignments[h] = torch.randint(k, (40,), generator=g)
    loss.assignments[0, 13] = -1  # unassigned rows are left out of their head's mean
    loss.assignments[1, [9, 30]] = -1
    base = clustered(8, 16, seed=9)
    protos = [unit_rows(10, 16, seed=6), unit_rows(30, 16, seed=7)]
    global_views = [views_of(base, protos, seed=30 + v) for v in range(2)]
    local_rows = torch.tensor([7, 1, 1, 4])
    local = views_of(base[local_rows], protos, seed=40, jitter=0.4)[1]
    branch = ClusterBranch([e for e, _ in global_views], [s for _, s in global_views], [local], local_rows)

    def hand_ce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(scores / temperature, dim=1)
        kept = labels >= 0
        return -log_p[kept, labels[kept]].mean()

    per_term = [
        hand_ce(s[h], loss.assignments[h, view_keys])
        for s, view_keys in [(branch.scores[0], keys), (branch.scores[1], keys), (local, keys[local_rows])]
        for h in range(2)
    ]
    expected = torch.stack(per_term).mean()
    torch.testing.assert_close(loss(branch, keys).double(), expected, **CE_TOL)


def test_joint_loss_is_the_weighted_sum_of_its_parts() -> None:
    swav_kwargs = {"temperature": 0.2, "epsilon": 0.03, "sinkhorn_iterations": 5}
    joint = JointSSLLoss(w_intra=2.0, w_inter=3.0, w_mask=5.0, temperature=0.2, sinkhorn_epsilon=0.03,
                         sinkhorn_iterations=5)  # fmt: skip
    intra = multicrop_branch(num_global=2, local_rows=torch.tensor([1, 6, 6]))
    inter = multicrop_branch(num_global=2, local_rows=None)
    g = torch.Generator().manual_seed(11)
    target = torch.randn(3, 5, 8, generator=g)
    prediction = target + 0.5 * torch.randn(3, 5, 8, generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, 2] = True
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 4] = False
    # one masked view: how several views combine is the masked-modelling tests' business
    output = JointSSLOutput(
        intra=intra,
        inter=inter,
        masked_prediction=[prediction],
        masked_target=[target],
        mask=[mask],
        valid=valid,
    )
    parts = {
        "intra": SwAVLoss(**swav_kwargs)(intra),
        "inter": SwAVLoss(**swav_kwargs)(inter),
        "mask": joint.mask_loss(prediction, target, mask, valid),
    }
    result = joint(output)
    for name, value in parts.items():
        torch.testing.assert_close(result[name], value)
    expected = 2.0 * parts["intra"] + 3.0 * parts["inter"] + 5.0 * parts["mask"]
    torch.testing.assert_close(result["loss"], expected)


def test_swav_defaults_are_the_papers_settings() -> None:
    """Temperature 0.1, Sinkhorn epsilon 0.05 and 3 iterations when nothing is given (SwAV's recipe)."""
    branch = multicrop_branch(num_global=2, local_rows=torch.tensor([2, 7]))
    expected = reference_swav(branch.scores, branch.local_scores, branch.local_rows, 0.1, 0.05, 3)
    torch.testing.assert_close(SwAVLoss()(branch).double(), expected, **CE_TOL)


@pytest.mark.parametrize("iterations", [1, 7])
def test_swav_runs_the_sinkhorn_iterations_it_is_given(iterations: int) -> None:
    branch = multicrop_branch(num_global=2, local_rows=None)
    got = SwAVLoss(epsilon=0.03, sinkhorn_iterations=iterations)(branch)
    torch.testing.assert_close(
        got.double(), reference_swav(branch.scores, [], None, 0.1, 0.03, iterations), **CE_TOL
    )


def test_swav_batches_of_one_row_and_of_none() -> None:
    """One row is scored like any batch; no row gives a zero that still reaches the scores' graph."""
    branch = multicrop_branch(num_global=2, local_rows=None)
    one = ClusterBranch([e[:1] for e in branch.embeddings], [[s[:1] for s in view] for view in branch.scores])
    expected = reference_swav(one.scores, [], None, 0.1, 0.05)
    assert float(expected) > 0.1
    torch.testing.assert_close(SwAVLoss()(one).double(), expected, **CE_TOL)
    none = ClusterBranch(
        [e[:0] for e in branch.embeddings],
        [[s[:0].clone().requires_grad_(True) for s in view] for view in branch.scores],
    )
    value = SwAVLoss()(none)
    assert float(value.detach()) == 0.0
    value.backward()
    assert all(torch.equal(s.grad, torch.zeros_like(s)) for view in none.scores for s in view)


def test_losses_are_float32_whatever_the_score_dtype() -> None:
    """The cross-entropies are computed in float32, so float64 scores give a float32 loss too."""
    branch = multicrop_branch(num_global=2, local_rows=torch.tensor([0, 5]))
    assert branch.scores[0][0].dtype == torch.float64
    assert SwAVLoss()(branch).dtype == torch.float32
    loss = DeepClusterV2Loss(num_samples=24, dim=16, num_prototypes=(10, 30)).eval()
    loss.assignments[:] = torch.arange(24) % 10
    assert loss(branch, torch.arange(24)).dtype == torch.float32


def test_deepcluster_default_temperature_and_the_first_cluster_as_label() -> None:
    """Temperature 0.1 by default; rows whose label is cluster 0 count like any other label."""
    base = clustered(8, 16, seed=12)
    protos = [unit_rows(10, 16, seed=6)]
    views = [views_of(base, protos, seed=50 + v) for v in range(2)]
    branch = ClusterBranch([e for e, _ in views], [s for _, s in views])
    loss = DeepClusterV2Loss(num_samples=8, dim=16, num_prototypes=(10,)).eval()
    loss.assignments[0] = 0
    expected = torch.stack([-torch.log_softmax(s[0] / 0.1, dim=1)[:, 0].mean() for s in branch.scores]).mean()
    torch.testing.assert_close(loss(branch, torch.arange(8)).double(), expected, **CE_TOL)


def _joint_output(seed: int) -> JointSSLOutput:
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(3, 5, 8, generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[:, [1, 3]] = True
    valid = torch.ones(3, 5, dtype=torch.bool)
    valid[2, 3:] = False
    return JointSSLOutput(
        intra=multicrop_branch(num_global=2, local_rows=torch.tensor([4, 4, 9])),
        inter=multicrop_branch(num_global=2, local_rows=None),
        masked_prediction=[target + torch.randn(3, 5, 8, generator=g) for _ in range(2)],
        masked_target=[target, target.roll(1, dims=1)],
        mask=[mask, mask.roll(1, dims=1)],
        valid=valid,
    )


def test_joint_loss_defaults_weigh_the_three_terms_equally_with_swavs_settings() -> None:
    """Default objective: L_intra + L_inter + L_mask, both levels SwAV with temperature 0.1, epsilon 0.05 and
    3 Sinkhorn iterations; L_mask sums the masked views' losses on slice-standardised targets."""
    output = _joint_output(seed=13)
    result = JointSSLLoss()(output)
    for level in ("intra", "inter"):
        branch = output.branch(level)
        expected = reference_swav(branch.scores, branch.local_scores, branch.local_rows, 0.1, 0.05, 3)
        torch.testing.assert_close(result[level].double(), expected, **CE_TOL)
    mask = sum(
        MaskedEmbeddingLoss()(p, t, m, output.valid)
        for p, t, m in zip(output.masked_prediction, output.masked_target, output.mask, strict=True)
    )
    torch.testing.assert_close(result["mask"], mask)
    torch.testing.assert_close(result["loss"], result["intra"] + result["inter"] + result["mask"])


@pytest.mark.parametrize(("reduction", "norm"), [("all", "slices"), ("masked", "none")])
def test_joint_loss_hands_its_masked_options_to_the_masked_term(reduction: str, norm: str) -> None:
    output = _joint_output(seed=14)
    result = JointSSLLoss(w_intra=0, w_inter=0, mask_reduction=reduction, mask_target_norm=norm)(output)
    part = MaskedEmbeddingLoss(reduction, norm)
    expected = sum(
        part(p, t, m, output.valid)
        for p, t, m in zip(output.masked_prediction, output.masked_target, output.mask, strict=True)
    )
    default = JointSSLLoss(w_intra=0, w_inter=0)(output)["mask"]
    assert abs(float(expected - default)) > 1e-3  # the options change the term
    torch.testing.assert_close(result["mask"], expected)
    torch.testing.assert_close(result["loss"], expected)


def test_joint_loss_hands_temperature_to_deepcluster() -> None:
    output = _joint_output(seed=15)
    joint = JointSSLLoss("none", "deepcluster", w_mask=0, inter_prototypes=[10, 30], temperature=0.4,
                         embedding_dim=16, inter_bank_size=24).eval()  # fmt: skip
    part = DeepClusterV2Loss(num_samples=24, dim=16, num_prototypes=(10, 30), temperature=0.4).eval()
    for loss in (joint.inter_loss, part):
        loss.assignments[:] = torch.arange(24) % 7
    keys = torch.arange(24).flip(0)
    torch.testing.assert_close(joint(output, inter_keys=keys)["inter"], part(output.inter, keys))
