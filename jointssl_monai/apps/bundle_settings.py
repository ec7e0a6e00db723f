"""The settings that every segmentation config of the bundle shares, defined once in ``configs/common.json``.

MONAI Label loads ``configs/train.json`` and ``configs/inference.json`` each alone (one file, with
``bundle_root`` set to the bundle folder), so MONAI's way of sharing keys, several ``--config_file`` entries,
does not reach it, and a ``%file#key`` macro resolves its path against the working directory, not the bundle.
Each config therefore reads the shared file at run time from its own ``bundle_root``::

    "imports": ["$from jointssl_monai.apps.bundle_settings import shared_settings"],
    "shared": "$shared_settings(@bundle_root)",
    "backbone": "$@shared['backbone']",

A command-line override of ``backbone`` still changes one run: it replaces that config's own ``backbone`` key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["SHARED_FILE", "shared_settings"]

#: Where the shared settings live, relative to the bundle root.
SHARED_FILE = Path("configs") / "common.json"


def shared_settings(bundle_root: str | os.PathLike) -> dict[str, Any]:
    """Read ``<bundle_root>/configs/common.json``.

    Args:
        bundle_root: the bundle folder (the configs' ``bundle_root``).

    Returns:
        The settings, a JSON object.

    Raises:
        FileNotFoundError: no shared settings file in this bundle root (a wrong ``--bundle_root``).
        ValueError: the file is not a JSON object; the message names the file.
    """
    path = Path(bundle_root) / SHARED_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: bundle_root {str(bundle_root)!r} must be the bundle folder (the one that "
            "holds configs/), e.g. '--bundle_root .' when running from inside it"
        )
    try:
        settings = json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{path} must hold a JSON object of settings, not {type(settings).__name__}")
    return settings
