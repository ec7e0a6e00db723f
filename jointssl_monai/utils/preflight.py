"""Checks made before training starts, so that a run does not fail hours later on its first checkpoint."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MIN_BATCH_NORM_ROWS",
    "MIN_KMEANS_ROWS_PER_CLUSTER",
    "PreflightError",
    "check_output_dir",
    "check_pretrain_setup",
    "estimate_checkpoint_bytes",
    "queue_room",
]

#: Fewest rows a projection head's BatchNorm may normalise per process and call.
MIN_BATCH_NORM_ROWS = 8
#: k-means (DeepCluster-v2) needs at least this many bank rows per cluster, or clusters hold single items.
MIN_KMEANS_ROWS_PER_CLUSTER = 2

#: Bytes ``torch.save`` adds per stored tensor (zip local and central headers, 64-byte alignment, pickle
#: record), rounded up from measurements on torch 2.x.
PER_TENSOR_OVERHEAD = 512
_PROBE = b"\0" * 4096


class PreflightError(OSError):
    """The output folder cannot hold the run's outputs; the message names the folder and the numbers."""


def _size(n: int) -> str:
    return f"{n / 1024**3:.2f} GiB ({n} bytes)"


def check_output_dir(path: str | os.PathLike, need_bytes: int = 0) -> Path:
    """Create ``path`` if needed, prove it writable with a real temporary file, and check its free space.

    Args:
        path: the output folder (checkpoints, logs).
        need_bytes: free space required, e.g. from :func:`estimate_checkpoint_bytes` times the number of
            checkpoints kept plus one (an atomic save holds the old and the new file at the same time).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        PreflightError: the folder cannot be created, is not writable, or has less than ``need_bytes`` free.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:
        raise PreflightError(f"output folder {path} exists and is not a folder") from err
    except OSError as err:  # NotADirectoryError (a parent is a file), PermissionError, read-only file system
        raise PreflightError(f"output folder {path} cannot be created: {err}") from err
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=path)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(_PROBE)
                handle.flush()
                os.fsync(handle.fileno())
        finally:
            Path(probe).unlink(missing_ok=True)
    except OSError as err:
        raise PreflightError(f"output folder {path} is not writable: {err}") from err
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise PreflightError(
            f"output folder {path} has {_size(free)} free, but at least {_size(need_bytes)} are needed "
            f"(short by {_size(need_bytes - free)})"
        )
    return path


def _tensor_storages(obj: Any, seen: dict[tuple[int, int], int]) -> None:
    """Collect the storages reachable from ``obj`` (``torch.save`` writes each storage once, whole)."""
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
    elif isinstance(obj, Mapping):
        for value in obj.values():
            _tensor_storages(value, seen)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            _tensor_storages(value, seen)
    elif callable(getattr(obj, "state_dict", None)):  # modules, optimizers, schedulers, RandomState
        _tensor_storages(obj.state_dict(), seen)


def estimate_checkpoint_bytes(
    *objects: Any,
    optimizer: torch.optim.Optimizer | None = None,
    safety_factor: float = 1.1,
    overhead_bytes: int = 1024**2,
) -> int:
    """An upper estimate of the size of a checkpoint holding ``objects`` (and ``optimizer``).

    Counts the bytes of every distinct tensor storage reachable from modules (parameters and buffers),
    state dicts, nested dicts/lists and anything with a ``state_dict()``, plus :data:`PER_TENSOR_OVERHEAD` per
    storage, times ``safety_factor``, plus ``overhead_bytes`` for the non-tensor content. An optimizer's
    moments exist only after its first step (Adam keeps two tensors per parameter, SGD with momentum and LARS
    one): estimate after a step, or allow for them.

    Args:
        objects: modules, optimizers, state dicts or other checkpointable objects.
        optimizer: an optimizer to include (same as passing it in ``objects``).
        safety_factor: multiplier for what the count cannot see (pickled metadata, file system blocks).
        overhead_bytes: fixed allowance for small non-tensor content.

    Returns:
        The estimate in bytes.
    """
    seen: dict[tuple[int, int], int] = {}
    for obj in (*objects, optimizer) if optimizer is not None else objects:
        _tensor_storages(obj, seen)
    raw = sum(seen.values()) + PER_TENSOR_OVERHEAD * len(seen)
    return int(raw * safety_factor) + overhead_bytes


def queue_room(data_rows: int, step_rows: int, world_size: int = 1) -> int:
    """Longest per-process SwAV queue that holds no stale copy of a current item.

    The processes' queues and batches together must not hold more rows than the data set has:
    ``world_size * (queue + step_rows) <= data_rows``.
    """
    return max(0, data_rows // max(1, world_size) - step_rows)


def _has_batch_norm(module: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules())


def check_pretrain_setup(
    network: torch.nn.Module,
    loss: torch.nn.Module,
    volumes_per_batch: int,
    images_per_batch: int,
    num_slices: int,
    num_volumes: int | None = None,
    num_images: int | None = None,
    world_size: int | None = None,
) -> None:
    """Refuse set-ups in which a clustering level or a projection head cannot learn, before any work.

    What crosses components, and so no constructor can check:

    - **K below the rows clustered.** SwAV's Sinkhorn spreads the rows of a step (all processes, plus the
      queue) equally over the ``K`` prototypes: with fewer rows than prototypes every row is its own cluster
      (SwAV itself clusters 4096 rows into 3000). DeepCluster-v2's k-means clusters the bank (one row per
      slice or volume of the data set) and needs ``MIN_KMEANS_ROWS_PER_CLUSTER`` rows per cluster, or most
      centroids hold one item or stay empty.
    - **No stale duplicates in a SwAV queue.** A queue longer than :func:`queue_room` holds old copies of
      the very items of the current batch, which the equal partition then has to split apart (a volume-level
      queue of 256 over 32 volumes made the volume-level loss climb far above ``log K``).
    - **BatchNorm over enough rows.** A projection head with BatchNorm sees both views of the rows of one
      process; with fewer than ``MIN_BATCH_NORM_ROWS`` rows it encodes the difference between the views.

    Args:
        network: the :class:`~jointssl_monai.networks.JointSSLNet`.
        loss: the :class:`~jointssl_monai.losses.JointSSLLoss`.
        volumes_per_batch: volumes per step and process.
        images_per_batch: 2D images per step and process.
        num_slices: slices per volume sample (an upper bound of the valid slices).
        num_volumes: volumes in the data set (enables the data-set checks).
        num_images: 2D images in the data set.
        world_size: processes (default: the initialised process group's size, else 1).

    Raises:
        ValueError: naming every problem with the config keys and numbers involved.
    """
    from jointssl_monai.losses import DeepClusterV2Loss, SwAVLoss
    from jointssl_monai.utils.dist import world_size as current_world_size

    world = int(world_size or current_world_size())
    use_intra, use_inter = getattr(network, "use_intra", True), getattr(network, "use_inter", True)
    levels = {
        "intra": (
            use_intra,
            volumes_per_batch * num_slices + images_per_batch,
            None if num_volumes is None else num_volumes * num_slices + (num_images or 0),
            "slice/image rows",
        ),
        "inter": (use_inter and volumes_per_batch > 0, volumes_per_batch, num_volumes, "volumes"),
    }
    problems = []
    for level, (active, step_rows, data_rows, what) in levels.items():
        criterion = getattr(loss, f"{level}_loss", None)
        if not active or criterion is None:
            continue
        k = max(getattr(network, f"{level}_prototypes").num_prototypes)
        if isinstance(criterion, SwAVLoss):
            rows = world * (step_rows + criterion.queue_length)
            if rows < k:
                problems.append(
                    f"{level}_prototypes = {k} with swav: Sinkhorn clusters {rows} {what} per step "
                    f"({world} process(es) x ({step_rows} per step + {level}_queue_length "
                    f"{criterion.queue_length})); use at most {rows} prototypes or a longer queue"
                )
            room = None if data_rows is None else queue_room(data_rows, step_rows, world)
            if room is not None and criterion.queue_length > room:
                problems.append(
                    f"{level}_queue_length = {criterion.queue_length} with {data_rows} {what} in the data "
                    f"set and {step_rows * world} per step: the queue would hold stale copies of the batch's "
                    f"own items; use at most {room}"
                )
        elif isinstance(criterion, DeepClusterV2Loss):
            rows = criterion.num_samples if data_rows is None else min(data_rows, criterion.num_samples)
            if rows < MIN_KMEANS_ROWS_PER_CLUSTER * k:
                problems.append(
                    f"{level}_prototypes = {k} with deepcluster: k-means clusters a bank of {rows} {what}; "
                    f"use at most {rows // MIN_KMEANS_ROWS_PER_CLUSTER} prototypes per head"
                )
    heads = {"intra": 2 * (volumes_per_batch * num_slices + images_per_batch), "inter": 2 * volumes_per_batch}
    for level, rows in heads.items():
        head = getattr(network, f"{level}_head")
        trained = any(p.requires_grad for p in head.parameters())
        if trained and _has_batch_norm(head) and rows < MIN_BATCH_NORM_ROWS:
            key = "proj_batch_norm" if level == "intra" else "inter_proj_batch_norm"
            problems.append(
                f"{key} = true: the {level} projection head's BatchNorm would normalise {rows} rows per "
                f"process (both views); it needs at least {MIN_BATCH_NORM_ROWS}: turn it off or batch more"
            )
    if problems:
        raise ValueError(
            f"pretraining set-up refused ({len(problems)} problem(s)):\n  - " + "\n  - ".join(problems)
        )
