"""A process whose batch has no rows for a level still runs that level's collectives, contributing nothing
(so that the other processes do not wait). The multi-process tests check the result across real processes;
these check, in one process, what each loss calls and what it leaves untouched, with the collectives and the
process-group queries recorded instead of run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.losses import DeepClusterV2Loss, JointSSLLoss, SwAVLoss
from jointssl_monai.losses import joint as joint_module
from jointssl_monai.losses import swav as swav_module
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput


def test_swav_without_rows_runs_sinkhorn_per_head_and_view_on_empty_scores(monkeypatch):
    calls = []

    def record(scores, epsilon, iterations, distributed=None):
        calls.append((tuple(scores.shape), epsilon, iterations, distributed))
        return scores

    monkeypatch.setattr(swav_module, "sinkhorn_knopp", record)
    loss = SwAVLoss(epsilon=0.07, sinkhorn_iterations=4, num_views=3, distributed=True)
    loss.participate_without_rows([5, 7])
    assert calls == [((0, 5), 0.07, 4, True)] * 3 + [((0, 7), 0.07, 4, True)] * 3
    assert int(loss.iteration) == 1  # the queue's start counts iterations on every process alike
    calls.clear()
    loss.eval()
    loss.participate_without_rows([5])
    assert len(calls) == 3 and int(loss.iteration) == 1  # evaluation does not advance the schedule
    with pytest.raises(ValueError, match="num_prototypes is needed"):
        SwAVLoss().participate_without_rows()
    with_default = SwAVLoss(num_prototypes=[4], num_views=2)
    monkeypatch.setattr(swav_module, "sinkhorn_knopp", record)
    calls.clear()
    with_default.participate_without_rows()
    assert [c[0] for c in calls] == [(0, 4), (0, 4)]


def test_deepcluster_without_rows_joins_the_bank_update_and_changes_nothing():
    loss = DeepClusterV2Loss(num_samples=10, dim=4, num_prototypes=(3,), num_views=2, distributed=False)
    rows = F.normalize(torch.randn(3, 4), dim=1)
    loss.update_memory([rows, rows], torch.tensor([1, 4, 7]))
    bank = loss.bank.clone()
    seen = []
    real_update = loss.update_memory

    def update_memory(embeddings, keys):
        seen.append(([tuple(e.shape) for e in embeddings], tuple(keys.shape)))
        real_update(embeddings, keys)

    loss.update_memory = update_memory
    loss.participate_without_rows()
    assert seen == [([(0, 4), (0, 4)], (0,))]
    assert torch.equal(loss.bank, bank) and loss.rows_in_bank() == 3
    loss.eval()
    loss.participate_without_rows()
    assert len(seen) == 1  # evaluation stores nothing and joins no update


def _branch(rows: int, dim: int = 8, prototypes: int = 5) -> ClusterBranch:
    emb = [F.normalize(torch.randn(rows, dim), dim=1) for _ in range(2)]
    return ClusterBranch(embeddings=emb, scores=[[e @ torch.randn(dim, prototypes)] for e in emb])


@pytest.mark.parametrize("inter_method", ["swav", "deepcluster"])
def test_joint_loss_joins_the_collectives_of_a_level_only_other_processes_have(monkeypatch, inter_method):
    loss = JointSSLLoss("swav", inter_method, intra_prototypes=5, inter_prototypes=3, embedding_dim=8,
                        inter_bank_size=16, intra_bank_size=64)  # fmt: skip
    joined, flags_sent = [], []

    def all_reduce_max(flags):
        flags_sent.append(flags.tolist())
        return torch.ones_like(flags)  # another process has rows of both levels

    monkeypatch.setattr(joint_module, "is_dist", lambda: True)
    monkeypatch.setattr(joint_module, "world_size", lambda: 2)
    monkeypatch.setattr(joint_module, "all_reduce_max", all_reduce_max)
    inter = loss.inter_loss
    monkeypatch.setattr(inter, "participate_without_rows", lambda *args: joined.append(args))
    monkeypatch.setattr(swav_module, "sinkhorn_knopp", lambda s, *a, **k: torch.softmax(s, dim=1))
    output = JointSSLOutput(intra=_branch(6), inter=None)  # this process: 2D images only
    prototypes = [torch.randn(3, 8)]
    result = loss(output, intra_prototypes=[torch.randn(5, 8)], inter_prototypes=prototypes)
    assert flags_sent == [[1, 0]]  # this process told the others which levels it has
    assert joined == ([([3],)] if inter_method == "swav" else [()])  # SwAV gets the prototype sizes
    assert "inter" not in result and torch.isfinite(result["loss"])
    joined.clear()
    monkeypatch.setattr(joint_module, "all_reduce_max", lambda flags: flags)  # nobody has volumes
    loss(output, intra_prototypes=[torch.randn(5, 8)], inter_prototypes=prototypes)
    assert joined == []
