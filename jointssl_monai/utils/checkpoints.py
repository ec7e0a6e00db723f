"""Checkpoint files: atomic writes, safe reads, finding the newest one to resume from.

A checkpoint path has one writer (rank 0 in distributed runs). Writes go to a hidden temporary file in
the same folder (``.<name>.<random>.tmp``), which is flushed to disk and then renamed over the target, so a
process killed at any moment leaves either the previous complete file or the new complete file at the path.
Temporary files left by killed writes are never picked up by :func:`latest_checkpoint` and are removed by the
next successful :func:`atomic_save` of the same path.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = [
    "PROTOTYPE_MODULES",
    "atomic_save",
    "atomic_write_json",
    "latest_checkpoint",
    "load_network_checkpoint",
    "safe_load",
    "temp_files_of",
]

logger = logging.getLogger(__name__)


def temp_files_of(path: str | os.PathLike) -> list[Path]:
    """The temporary files that :func:`atomic_save` writes (or left behind) for ``path``."""
    path = Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))


def _fsync_dir(directory: Path) -> None:
    """Flush a folder's entries (the rename) to disk; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, flush it to disk, then rename it into place.

    A process killed at any moment leaves either the previous complete file or the new complete file at
    ``path``, never a truncated one. After a successful save, temporary files of earlier interrupted saves of
    the same path are removed.

    Args:
        obj: anything ``torch.save`` accepts; keep it to tensors and plain Python values so that
            :func:`safe_load` can read it back.
        path: the checkpoint file; its folder is created if needed.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    return _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write ``data`` as indented JSON with the guarantees of :func:`atomic_save` (run logs, provenance)."""
    return _atomic_write(path, lambda handle: handle.write(json.dumps(data, indent=2).encode()))


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a log or checkpoint is an ordinary file
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    for stale in temp_files_of(path):  # left by a writer killed before its rename (single writer per path)
        stale.unlink(missing_ok=True)
    return path


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: a checkpoint whose unpickling would run code is refused.

    Args:
        path: the checkpoint file.
        map_location: where to put the tensors.

    Raises:
        FileNotFoundError: ``path`` is missing or not a file.
        RuntimeError: the file is empty, truncated, not a checkpoint, or would import/call anything outside
            the tensor/plain-value allow-list of ``weights_only`` unpickling; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    size = path.stat().st_size
    if size == 0:
        raise RuntimeError(f"checkpoint {path} is empty (0 bytes): an interrupted or failed write")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors have many types; name the file in all of them
        raise RuntimeError(
            f"cannot load checkpoint {path} ({size} bytes) safely (weights_only=True): {err}"
        ) from err


_NUMBER = re.compile(r"(\d+)")


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "*.pt") -> str | None:
    """The newest checkpoint in ``directory`` (highest iteration/epoch number in its name), or ``None``.

    Names written by MONAI's ``CheckpointSaver`` carry the epoch or iteration number
    (``checkpoint_epoch=3.pt``, ``checkpoint_key_metric=...``); among files with numbers the largest number
    wins, ties broken by modification time. Hidden files (the temporary files of interrupted writes) and empty
    files are ignored.

    Args:
        directory: the folder to search (not recursively).
        pattern: glob pattern of checkpoint names.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [
        p
        for p in directory.glob(pattern)
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp") and p.stat().st_size > 0
    ]
    if not candidates:
        return None

    def order(path: Path) -> tuple[int, float]:
        numbers = _NUMBER.findall(path.stem)
        return (int(numbers[-1]) if numbers else -1, path.stat().st_mtime)

    return str(max(candidates, key=order))


#: Modules of ``JointSSLNet`` whose layout may differ between the stages of the authors' recipe: the prototype
#: banks, sized by each stage's clustering method (DeepCluster-v2: one bank per head; ``"none"``: one bank).
PROTOTYPE_MODULES = ("intra_prototypes", "inter_prototypes")


def load_network_checkpoint(
    network: torch.nn.Module,
    path: str | os.PathLike,
    key: str = "network",
    flexible: Sequence[str] = PROTOTYPE_MODULES,
) -> int:
    """Initialise ``network`` from a pretraining checkpoint (its ``key`` entry, or a plain state dict).

    Used to chain the stages of the authors' recipe (stage B starts from stage A's weights, and so on). Every
    key must match, with one exception: a module named in ``flexible`` (the prototype banks) whose keys or
    shapes differ from the checkpoint's keeps the network's own initialisation, with a warning naming it.
    Each stage sizes the banks for its own clustering methods (a level set to ``"none"`` gets one bank,
    DeepCluster-v2 one per head), so stage C with volume-level DeepCluster-v2 cannot take stage B's single
    volume-level bank; in the authors' recipe no stage before C trains that bank, and DeepCluster-v2 replaces
    its banks by k-means centroids anyway. A bank whose layout matches is loaded like everything else.

    Returns:
        The number of tensors loaded.
    """
    state = safe_load(path)
    if isinstance(state, dict) and isinstance(state.get(key), dict):
        state = state[key]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"checkpoint {path} holds no state dict under {key!r}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = network.state_dict()
    kept: list[str] = []
    fresh = 0  # tensors left at the network's own initialisation
    for name in flexible:
        prefix = name + "."
        theirs = {k: tuple(v.shape) for k, v in state.items() if k.startswith(prefix)}
        ours = {k: tuple(v.shape) for k, v in own.items() if k.startswith(prefix)}
        if not theirs or not ours or theirs == ours:  # matching (or absent on one side: strict rules apply)
            continue
        kept.append(f"{name} ({list(theirs.values())} in the checkpoint, {list(ours.values())} here)")
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({k: v for k, v in own.items() if k.startswith(prefix)})
        fresh += len(ours)
    if kept:
        logger.warning(f"init checkpoint {path}: kept the fresh initialisation of {'; '.join(kept)}")
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint {path} does not fit this network: {err}") from err
    return len(state) - fresh
