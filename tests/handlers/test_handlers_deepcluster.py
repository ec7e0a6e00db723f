"""DeepClusterHandler: at every epoch start, k-means of each bank, and its centroids become the prototypes."""

import torch
from ignite.engine import Engine, Events
from torch import nn

from jointssl_monai.handlers import DeepClusterHandler
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks.heads import MultiPrototypes

DIM = 8
HEADS = {"intra": ([3, 4], 24), "inter": ([2, 3], 10)}  # prototypes per head, rows of the bank


class Prototypes(nn.Module):
    """What the handler reads of a JointSSLNet: its prototype layers per level."""

    def __init__(self) -> None:
        super().__init__()
        self.intra_prototypes = MultiPrototypes(DIM, HEADS["intra"][0])
        self.inter_prototypes = MultiPrototypes(DIM, HEADS["inter"][0])

    def prototypes(self, level: str) -> MultiPrototypes:
        return getattr(self, f"{level}_prototypes")


def test_every_epoch_start_copies_the_kmeans_centroids_into_the_prototypes_of_every_head():
    torch.manual_seed(0)
    network = Prototypes()
    (intra_k, intra_rows), (inter_k, inter_rows) = HEADS["intra"], HEADS["inter"]
    loss = JointSSLLoss(
        "deepcluster",
        "deepcluster",
        intra_prototypes=intra_k,
        inter_prototypes=inter_k,
        embedding_dim=DIM,
        intra_bank_size=intra_rows,
        inter_bank_size=inter_rows,
    )
    for level, (_, rows) in HEADS.items():
        getattr(loss, f"{level}_loss").update_memory(
            [torch.randn(rows, DIM), torch.randn(rows, DIM)], torch.arange(rows)
        )
    before = {n: p.detach().clone() for n, p in network.named_parameters()}
    engine = Engine(lambda engine, batch: None)
    DeepClusterHandler(loss, network, init_memory=False).attach(engine)
    seen = []  # after the handler, at every epoch start: (level, head, prototypes, centroids)

    @engine.on(Events.EPOCH_STARTED)
    def record(_):
        for level in HEADS:
            heads, kmeans = (
                getattr(network, f"{level}_prototypes").heads,
                getattr(loss, f"{level}_loss").centroids,
            )
            assert len(heads) == len(kmeans) == len(HEADS[level][0])
            seen.extend(
                (level, h, w.weight.detach().clone(), c.clone())
                for h, (w, c) in enumerate(zip(heads, kmeans, strict=True))
            )

    engine.run([0], max_epochs=2)

    assert [int(getattr(loss, f"{level}_loss").num_clusterings) for level in HEADS] == [2, 2]
    assert len(seen) == 2 * sum(len(k) for k, _ in HEADS.values())
    for level, h, weight, centroid in seen:
        assert centroid.abs().sum() > 0  # clustered (the centroids are zeros before the first clustering)
        torch.testing.assert_close(weight, centroid, rtol=0, atol=0, msg=f"{level} head {h}")
        assert not torch.allclose(weight, before[f"{level}_prototypes.heads.{h}.weight"])
