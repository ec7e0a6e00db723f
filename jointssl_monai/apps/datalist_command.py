"""``jointssl datalist``: scan folders and write a MONAI datalist, with a summary of what was skipped."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jointssl_monai.data.checks import DEFAULT_MAX_VOXELS, BadInputError
from jointssl_monai.data.datalist import build_datalist, write_datalist

__all__ = ["build_datalist_command"]


def build_datalist_command(
    *dirs: str,
    output: str = "datalist.json",
    modality_map: Mapping[str, str] | None = None,
    default_modality: str = "OT",
    skip_bad_inputs: bool = False,
    absolute_paths: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    fields: Mapping[str, Any] | None = None,
    skip_label_maps: bool = False,
) -> str:
    """Scan ``dirs`` for 2D images and 3D volumes and write a MONAI datalist to ``output``.

    Prints and returns a summary listing every skipped or ignored file and why. See :func:`build_datalist`
    for the arguments; paths in the file are relative to its folder unless ``absolute_paths``.
    """
    if not dirs:
        raise ValueError("give at least one folder to scan")
    base_dir = None if absolute_paths else Path(output).absolute().parent
    entries, summary = build_datalist(
        dirs,
        modality_map=modality_map,
        default_modality=default_modality,
        skip_bad_inputs=skip_bad_inputs,
        base_dir=base_dir,
        max_voxels=max_voxels,
        fields=fields,
        skip_label_maps=skip_label_maps,
    )
    if not entries:
        raise BadInputError(list(dirs) if len(dirs) > 1 else dirs[0], "no usable image found")
    path = write_datalist(entries, output)
    text = f"{summary}\nwrote {len(entries)} entries to {path}"
    print(text)
    return text
