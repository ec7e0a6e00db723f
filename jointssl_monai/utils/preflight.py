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
    "PreflightError",
    "check_output_dir",
    "estimate_checkpoint_bytes",
]

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
