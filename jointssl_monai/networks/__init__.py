"""Networks: slice encoder, deformable attention over slices, aggregator, heads, JointSSLNet."""

from jointssl_monai.networks.aggregator import (
    FullAttention1D,
    SliceAggregator,
    SliceTransformerLayer,
    sinusoidal_position_encoding,
)
from jointssl_monai.networks.deformable_attention import ContinuousPositionBias1D, DeformableAttention1D
from jointssl_monai.networks.heads import MultiPrototypes, ProjectionHead
from jointssl_monai.networks.jointssl_net import JointSSLNet
from jointssl_monai.networks.masked_modeling import MaskedSliceModeling
from jointssl_monai.networks.slice_encoder import SliceEncoder

__all__ = [
    "ContinuousPositionBias1D",
    "DeformableAttention1D",
    "FullAttention1D",
    "JointSSLNet",
    "MaskedSliceModeling",
    "MultiPrototypes",
    "ProjectionHead",
    "SliceAggregator",
    "SliceEncoder",
    "SliceTransformerLayer",
    "sinusoidal_position_encoding",
]
