"""Helpers shared by the pretraining engine and its handlers (as ``monai.engines.utils`` is for MONAI's)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "DIAGNOSTIC_SUFFIXES",
    "batches_done_in_epoch",
    "iteration_output",
    "loss_scalars",
    "prepare_ssl_batch",
    "unwrap",
]

#: Suffixes of the collapse diagnostics in an iteration's output (``intra_clusters_used``, ...), which are
#: reported as they are, not as ``loss_<component>``.
DIAGNOSTIC_SUFFIXES = ("_normalized_entropy", "_clusters_used", "_largest_share", "_token_spread")


def iteration_output(engine_or_output: Any) -> dict:
    """The dict of one iteration's results (``loss``, ``loss_<component>``, diagnostics, ``output``).

    The trainer stores it as a one-item list, MONAI's decollated convention, so that MONAI's
    ``from_engine(["loss"], first=True)`` (the default of ``--tracking mlflow``) finds the loss.
    """
    output = getattr(getattr(engine_or_output, "state", None), "output", engine_or_output)
    if isinstance(output, list) and output and isinstance(output[0], dict):
        return output[0]
    return output if isinstance(output, dict) else {}


def batches_done_in_epoch(engine: Any) -> int:
    """Iterations of the current epoch already run when it starts: 0, except in a run resumed from a
    checkpoint written in the middle of an epoch (``checkpoint_iteration_interval``), which goes on there.

    Read at ``Events.EPOCH_STARTED``, when ``state.iteration`` still holds the iterations of earlier epochs.
    """
    length = engine.state.epoch_length
    return engine.state.iteration % length if length else 0


def unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (or the module itself)."""
    return network.module if hasattr(network, "module") else network


def _to_device(value: Any, device: torch.device, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, non_blocking=non_blocking)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device, non_blocking) for v in value)
    return value


def prepare_ssl_batch(batchdata: dict, device: torch.device, non_blocking: bool = False, **_: Any) -> dict:
    """Move every tensor of a collated pretraining batch (``outputs.BATCH_KEYS``) to ``device``."""
    if not isinstance(batchdata, dict):
        raise TypeError(f"a pretraining batch must be a dict of BATCH_KEYS, got {type(batchdata).__name__}")
    return {key: _to_device(value, device, non_blocking) for key, value in batchdata.items()}


def loss_scalars(engine_or_output: Any) -> dict[str, float]:
    """``loss`` and every ``loss_<component>`` of an iteration's output as floats: the ``output_transform``
    of ``TensorBoardStatsHandler`` in ``pretrain.json`` (empty for a skipped step)."""
    output = iteration_output(engine_or_output)
    return {k: float(v) for k, v in output.items() if k == "loss" or k.startswith("loss_")}
