"""Engines: the pretraining trainer built on MONAI/Ignite, its optimiser and schedule."""

from jointssl_monai.engines.optim import (
    LARS,
    build_optimizer,
    parameter_groups,
    warmup_cosine_lambda,
    warmup_cosine_scheduler,
)
from jointssl_monai.engines.trainer import (
    JointSSLTrainer,
    NonFiniteLossError,
    iteration_output,
    prepare_ssl_batch,
    unwrap,
)

__all__ = [
    "LARS",
    "JointSSLTrainer",
    "NonFiniteLossError",
    "build_optimizer",
    "iteration_output",
    "parameter_groups",
    "prepare_ssl_batch",
    "unwrap",
    "warmup_cosine_lambda",
    "warmup_cosine_scheduler",
]
