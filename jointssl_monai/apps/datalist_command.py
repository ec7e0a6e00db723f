"""``jointssl datalist``: scan folders and write a MONAI datalist, with a summary of what was skipped."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from jointssl_monai.data.checks import DEFAULT_MAX_VOXELS, BadInputError
from jointssl_monai.data.datalist import build_datalist, load_datalist, write_datalist
from jointssl_monai.data.verify import verify_entries

__all__ = ["build_datalist_command", "report_path", "verify_command"]


def report_path(datalist: str | os.PathLike) -> Path:
    """The JSON report written beside a datalist: ``datalist.json`` -> ``datalist.report.json``."""
    path = Path(datalist)
    return path.with_name(f"{path.stem}.report.json")


def build_datalist_command(
    *dirs: str,
    output: str = "datalist.json",
    modality_map: Mapping[str, str] | None = None,
    default_modality: str = "OT",
    strict: bool = False,
    verify: bool = False,
    workers: int = 2,
    absolute_paths: bool = False,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    fields: Mapping[str, Any] | None = None,
    skip_label_maps: bool = False,
) -> str:
    """Scan ``dirs`` for 2D images and 3D volumes and write a MONAI datalist to ``output``.

    A scanner: it lists what it can read and reports what it skipped and why, in the printed summary and in
    :func:`report_path` beside the datalist. ``strict`` stops at the first bad file instead. ``verify``
    also decodes every voxel of every entry (:func:`~jointssl_monai.data.verify.verify_entries`, ``workers``
    processes) and leaves out (or, ``strict``, refuses) what does not decode; the header scan alone cannot
    see truncated data. See :func:`~jointssl_monai.data.datalist.build_datalist` for the other arguments;
    paths in the file are relative to its folder unless ``absolute_paths``.

    Returns:
        The printed summary.
    """
    if not dirs:
        raise ValueError("give at least one folder to scan")
    base_dir = None if absolute_paths else Path(output).absolute().parent
    entries, summary = build_datalist(
        dirs,
        modality_map=modality_map,
        default_modality=default_modality,
        skip_bad_inputs=not strict,
        base_dir=None,
        max_voxels=max_voxels,
        fields=fields,
        skip_label_maps=skip_label_maps,
    )
    undecodable = 0
    if verify and entries:
        report = verify_entries(entries, num_workers=workers, max_voxels=max_voxels)
        if strict:
            report.usable(skip_bad_inputs=False, source=" ".join(dirs))  # refuses, naming every bad entry
        for _, image, reason in report.bad:  # logged once each, as every other skip
            summary.skipped.add(image, f"does not decode: {reason}")
        entries, undecodable = report.good, len(report.bad)
    if not entries:
        raise BadInputError(list(dirs) if len(dirs) > 1 else dirs[0], "no usable image found")
    if base_dir is not None:
        entries = [_relative(entry, base_dir) for entry in entries]
    path = write_datalist(entries, output)
    details = {
        "datalist": str(path), "entries": len(entries), "verified": verify,
        "volumes": sum(e["dims"] == 3 for e in entries), "images": sum(e["dims"] == 2 for e in entries),
        "skipped": [{"image": name, "reason": reason} for name, reason in summary.skipped.skipped],
        "ignored": [{"image": name, "reason": reason} for name, reason in summary.ignored],
    }  # fmt: skip
    report_file = report_path(path)
    report_file.write_text(json.dumps(details, indent=2) + "\n")
    decoded = f", {undecodable} more left out by the decoding check" if undecodable else ""
    text = f"{summary}\nwrote {len(entries)} entries to {path}{decoded} (report: {report_file})"
    print(text)
    return text


def _relative(entry: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    image = entry["image"]
    if isinstance(image, list):
        return {**entry, "image": [os.path.relpath(p, base_dir) for p in image]}
    return {**entry, "image": os.path.relpath(image, base_dir)}


def verify_command(
    datalist: str,
    workers: int = 2,
    memory_limit_gb: float = 8.0,
    output: str | None = None,
    key: str = "training",
) -> str:
    """Decode every voxel of every entry of ``datalist``; print and write (``output``, default
    :func:`report_path`) what does not decode; raise one error naming them all if any does not."""
    entries = load_datalist(datalist, key=key)
    report = verify_entries(entries, num_workers=workers, memory_limit_gb=memory_limit_gb)
    path = Path(output) if output else report_path(datalist)
    path.write_text(json.dumps({"datalist": str(datalist), **report.as_dict()}, indent=2) + "\n")
    report.usable(skip_bad_inputs=False, source=datalist)
    text = f"{report.summary()} (report: {path})"
    print(text)
    return text
