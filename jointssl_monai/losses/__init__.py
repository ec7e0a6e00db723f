"""Self-supervised objectives: Sinkhorn/SwAV, DeepCluster-v2, masked slice embedding, the joint loss."""

from jointssl_monai.losses.deepcluster import DeepClusterV2Loss
from jointssl_monai.losses.diagnostics import (
    cluster_diagnostics,
    clusters_used,
    largest_cluster_share,
    mean_assignment_entropy,
)
from jointssl_monai.losses.joint import JointSSLLoss
from jointssl_monai.losses.kmeans import KMeansResult, spherical_kmeans
from jointssl_monai.losses.masked import MaskedEmbeddingLoss
from jointssl_monai.losses.sinkhorn import sinkhorn_knopp
from jointssl_monai.losses.swav import SwAVLoss, cancel_prototype_gradients, normalize_prototypes_

__all__ = [
    "DeepClusterV2Loss",
    "JointSSLLoss",
    "KMeansResult",
    "MaskedEmbeddingLoss",
    "SwAVLoss",
    "cancel_prototype_gradients",
    "cluster_diagnostics",
    "clusters_used",
    "largest_cluster_share",
    "mean_assignment_entropy",
    "normalize_prototypes_",
    "sinkhorn_knopp",
    "spherical_kmeans",
]
