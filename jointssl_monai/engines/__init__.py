"""Engines: the pretraining trainer built on MONAI/Ignite, its optimiser and schedule."""

from jointssl_monai.engines.optim import (
    LARS,
    build_optimizer,
    parameter_groups,
    warmup_cosine_lambda,
    warmup_cosine_scheduler,
)
from jointssl_monai.engines.setup_check import check_pretrain_setup, queue_room
from jointssl_monai.engines.trainer import JointSSLTrainer, NonFiniteLossError
from jointssl_monai.engines.utils import iteration_output, loss_scalars, prepare_ssl_batch, unwrap

__all__ = [
    "LARS",
    "JointSSLTrainer",
    "NonFiniteLossError",
    "build_optimizer",
    "check_pretrain_setup",
    "iteration_output",
    "loss_scalars",
    "parameter_groups",
    "prepare_ssl_batch",
    "queue_room",
    "unwrap",
    "warmup_cosine_lambda",
    "warmup_cosine_scheduler",
]
