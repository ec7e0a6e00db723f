"""Self-supervised objectives: Sinkhorn/SwAV, DeepCluster-v2, masked slice embedding, the joint loss."""

from jointssl_monai.losses.deepcluster import DeepClusterV2Loss
from jointssl_monai.losses.diagnostics import (
    cluster_diagnostics,
    clusters_used,
    largest_cluster_share,
    mean_assignment_entropy,
    occupancy_diagnostics,
    token_spread,
)
from jointssl_monai.losses.joint import JointSSLLoss
from jointssl_monai.losses.kmeans import KMeansResult, spherical_kmeans
from jointssl_monai.losses.masked import MaskedEmbeddingLoss, normalize_over_slices
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
    "normalize_over_slices",
    "normalize_prototypes_",
    "occupancy_diagnostics",
    "sinkhorn_knopp",
    "spherical_kmeans",
    "token_spread",
]
