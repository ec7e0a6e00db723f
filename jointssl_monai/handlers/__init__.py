"""Ignite handlers for pretraining and fine-tuning."""

from jointssl_monai.handlers.checkpoint import AtomicCheckpointSaver
from jointssl_monai.handlers.cluster_health import ClusterHealthHandler
from jointssl_monai.handlers.deepcluster import DeepClusterHandler
from jointssl_monai.handlers.encoder_export import EncoderExportHandler
from jointssl_monai.handlers.history import LossHistoryHandler
from jointssl_monai.handlers.pretrained_encoder import PretrainedEncoderLoader
from jointssl_monai.handlers.prototypes import PrototypeHandler
from jointssl_monai.handlers.provenance import RunProvenanceHandler

__all__ = [
    "AtomicCheckpointSaver",
    "ClusterHealthHandler",
    "DeepClusterHandler",
    "EncoderExportHandler",
    "LossHistoryHandler",
    "PretrainedEncoderLoader",
    "PrototypeHandler",
    "RunProvenanceHandler",
]
