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
from jointssl_monai.losses.joint import CLUSTERING_METHODS, LEVELS, JointSSLLoss, prototype_heads
from jointssl_monai.losses.kmeans import KMeansResult, spherical_kmeans
from jointssl_monai.losses.masked import MaskedEmbeddingLoss, normalize_over_slices
from jointssl_monai.losses.sinkhorn import sinkhorn_knopp
from jointssl_monai.losses.swav import SwAVLoss

__all__ = [
    "CLUSTERING_METHODS",
    "LEVELS",
    "DeepClusterV2Loss",
    "JointSSLLoss",
    "KMeansResult",
    "MaskedEmbeddingLoss",
    "SwAVLoss",
    "cluster_diagnostics",
    "clusters_used",
    "largest_cluster_share",
    "mean_assignment_entropy",
    "normalize_over_slices",
    "occupancy_diagnostics",
    "prototype_heads",
    "sinkhorn_knopp",
    "spherical_kmeans",
    "token_spread",
]
