"""Checkpoint files: atomic writes, safe reads, finding the newest one to resume from."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "latest_checkpoint", "safe_load"]


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary file in the same folder, flush it to disk, then rename it into place.

    A process killed at any moment leaves either the previous complete file or the new complete file at
    ``path``, never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load`` with ``weights_only=True``: a checkpoint whose unpickling would run code is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist or is not a file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # unpickling errors have many types; name the file in all of them
        raise RuntimeError(f"cannot load checkpoint {path} safely (weights_only=True): {err}") from err


_NUMBER = re.compile(r"(\d+)")


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "*.pt") -> str | None:
    """The newest checkpoint in ``directory`` (highest iteration/epoch number in its name), or ``None``.

    Names written by MONAI's ``CheckpointSaver`` carry the epoch or iteration number
    (``checkpoint_epoch=3.pt``, ``checkpoint_key_metric=...``); among files with numbers the largest number
    wins, ties broken by modification time. Temporary files of interrupted writes are ignored.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = [p for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    if not candidates:
        return None

    def order(path: Path) -> tuple[int, float]:
        numbers = _NUMBER.findall(path.stem)
        return (int(numbers[-1]) if numbers else -1, path.stat().st_mtime)

    return str(max(candidates, key=order))
