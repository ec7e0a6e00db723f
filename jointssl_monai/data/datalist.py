"""Build a MONAI datalist from folders of NIfTI, DICOM, MHA/NRRD and PNG files.

The output is a MONAI (Decathlon-style) datalist::

    {"training": [{"image": "ct/a.nii.gz", "dims": 3, "modality": "CT", "shape": [512, 512, 80]},
                  {"image": ["series/1.dcm", "series/2.dcm", ...], "dims": 3, "modality": "CT", ...},
                  {"image": "xray/b.png", "dims": 2, "modality": "OT", ...}]}

Paths are relative to the folder of the datalist file (MONAI's ``load_decathlon_datalist`` resolves them with
``base_dir``), so a dataset folder can be moved together with its datalist. A DICOM series is listed as its
files in slice order, so a folder may hold several series. The result is deterministic: files are visited in
sorted order and series are sorted by their first file.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jointssl_monai.data.checks import (
    DEFAULT_MAX_VOXELS,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    BadInputError,
    SkipLog,
    check_file,
    check_image_header,
    label_map_reason,
)
from jointssl_monai.data.dicom import DICOM_SUFFIXES, order_dicom_series, scan_dicom_file
from jointssl_monai.data.io import load_ssl_image

__all__ = [
    "DatalistSummary",
    "build_datalist",
    "load_datalist",
    "validate_datalist",
    "write_datalist",
]

logger = logging.getLogger(__name__)


@dataclass
class DatalistSummary:
    """What a scan found: counts, and every file that was skipped or ignored with the reason."""

    volumes: int = 0
    images: int = 0
    modalities: dict[str, int] = field(default_factory=dict)
    skipped: SkipLog = field(default_factory=SkipLog)
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def count(self, entry: Mapping[str, Any]) -> None:
        if entry["dims"] == 3:
            self.volumes += 1
        else:
            self.images += 1
        self.modalities[entry["modality"]] = self.modalities.get(entry["modality"], 0) + 1

    def __str__(self) -> str:
        mods = ", ".join(f"{k}: {v}" for k, v in sorted(self.modalities.items())) or "none"
        lines = [f"found {self.volumes} volume(s) and {self.images} 2D image(s) (modalities: {mods})"]
        if len(self.skipped):
            lines.append(self.skipped.summary())
        if self.ignored:
            lines.append(f"{len(self.ignored)} file(s) ignored:")
            lines += [f"  {name}: {reason}" for name, reason in self.ignored]
        return "\n".join(lines)


def _suffix_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    if name.endswith(PIL_SUFFIXES):
        return "pil"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    return "unknown"


def _modality_for(path: Path, root: Path, modality_map: Mapping[str, str] | None, default: str) -> str:
    if modality_map:
        rel = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.as_posix()
        for pattern, modality in modality_map.items():
            if fnmatch.fnmatch(rel, pattern) or fnmatch.fnmatch(path.as_posix(), pattern):
                return str(modality)
    return default


def _dims_from_shape(path: Path, shape: tuple[int, ...]) -> int:
    spatial = list(shape)
    while len(spatial) > 2 and spatial[-1] == 1:
        spatial = spatial[:-1]
    if len(spatial) == 2:
        return 2
    if len(spatial) == 3:
        return 3
    raise BadInputError(
        path, f"wrong dimensionality: shape {tuple(shape)}, expected a 2D image or a 3D volume"
    )


def _walk(paths: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    found: list[tuple[Path, Path]] = []
    for item in paths:
        root = Path(item)
        if not root.exists():
            raise BadInputError(root, "file or folder does not exist")
        if root.is_file():
            found.append((root, root.parent))
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            found += [(Path(dirpath) / name, root) for name in sorted(filenames) if not name.startswith(".")]
    return found


def build_datalist(
    paths: Sequence[str | os.PathLike],
    modality_map: Mapping[str, str] | None = None,
    default_modality: str = "OT",
    skip_bad_inputs: bool = False,
    base_dir: str | os.PathLike | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    fields: Mapping[str, Any] | None = None,
    skip_label_maps: bool = False,
) -> tuple[list[dict[str, Any]], DatalistSummary]:
    """Scan folders (or files) and return the datalist entries and a summary.

    Args:
        paths: folders to scan recursively, or single files.
        modality_map: ``{pattern: modality}`` for files without a DICOM ``Modality`` tag; patterns are
            ``fnmatch`` globs tried in order against the path relative to the scanned folder, then the full
            path (e.g. ``{"ct/*": "CT", "*t1*": "MR"}``).
        default_modality: modality of non-DICOM files that no pattern matches (``"OT"``, DICOM's "other").
        skip_bad_inputs: skip broken files and series (each listed with its reason in the summary) instead of
            raising :class:`BadInputError`.
        base_dir: write paths relative to this folder (normally the datalist's folder); absolute if ``None``.
        max_voxels: refuse headers that claim more values than this.
        fields: extra fields copied into every entry.
        skip_label_maps: decode every image and leave out label maps, atlases and masks
            (:func:`~jointssl_monai.data.checks.label_map_reason`), listed as ignored with the reason.

    Returns:
        ``(entries, summary)``; each entry holds ``image`` (a path, or for a DICOM series its files in slice
        order), ``dims`` (2 or 3), ``modality``, ``shape`` (as the header states it) and ``fields``.
    """
    summary = DatalistSummary()
    entries: list[tuple[str, dict[str, Any]]] = []
    series: dict[str, list[tuple[Path, Any]]] = {}
    series_root: dict[str, Path] = {}

    def fail(where, err: BadInputError) -> None:
        if not skip_bad_inputs:
            raise err
        files = where if isinstance(where, (list, tuple)) else [where]
        for f in files:
            summary.skipped.add(f, err.problem)

    def rel(path: Path) -> str:
        if base_dir is None:
            return str(path.absolute())
        return os.path.relpath(path.absolute(), Path(base_dir).absolute())

    def add(paths_: Path | list[Path], dims: int, modality: str, shape: Sequence[int]) -> None:
        if skip_label_maps:
            files = [str(p) for p in paths_] if isinstance(paths_, list) else str(paths_)
            reason = label_map_reason(load_ssl_image(files, dims, max_voxels=max_voxels).numpy())
            if reason is not None:
                summary.ignored.append((str(paths_[0] if isinstance(paths_, list) else paths_), reason))
                return
        image: Any = [rel(p) for p in paths_] if isinstance(paths_, list) else rel(paths_)
        entry = {"image": image, "dims": dims, "modality": modality, "shape": [int(s) for s in shape]}
        entry.update(fields or {})
        first = paths_[0] if isinstance(paths_, list) else paths_
        entries.append((str(first), entry))
        summary.count(entry)

    for path, root in _walk(paths):
        kind = _suffix_kind(path)
        try:
            if kind in ("dicom", "unknown"):
                read = scan_dicom_file(path, max_voxels)
                if read is None:
                    if kind == "dicom":
                        raise BadInputError(path, "not a valid DICOM file (no DICOM header found)")
                    summary.ignored.append((str(path), "not a recognised image file"))
                    continue
                ds, frames = read
                if frames == 0:
                    summary.ignored.append(
                        (str(path), "DICOM object without an image (DICOMDIR, report, ...)")
                    )
                    continue
                uid = str(ds.get("SeriesInstanceUID", "")) or f"file:{path}"
                if frames > 1:  # a multi-frame file is a volume on its own
                    uid = f"{uid}:file:{path}"
                series.setdefault(uid, []).append((path, ds))
                series_root.setdefault(uid, root)
                continue
            shape = check_image_header(path, max_voxels)
            dims = _dims_from_shape(path, shape)
            add(path, dims, _modality_for(path, root, modality_map, default_modality), shape)
        except BadInputError as err:
            fail(path, err)

    for uid, members in series.items():
        try:
            first_ds = members[0][1]
            modality = str(first_ds.get("Modality", "")) or _modality_for(
                members[0][0], series_root[uid], modality_map, default_modality
            )
            if len(members) == 1:
                path, ds = members[0]
                frames = int(ds.get("NumberOfFrames", 1) or 1)
                shape = (int(ds.Columns), int(ds.Rows)) + ((frames,) if frames > 1 else ())
                add(path, 3 if frames > 1 else 2, modality, shape)
                continue
            if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in members):
                raise BadInputError(
                    [p for p, _ in members], "mixed series: multi-frame and single-frame files"
                )
            ordered = order_dicom_series(members)
            add(ordered, 3, modality, (int(first_ds.Columns), int(first_ds.Rows), len(ordered)))
        except BadInputError as err:
            fail([p for p, _ in members], err)

    entries.sort(key=lambda item: item[0])
    return [entry for _, entry in entries], summary


def write_datalist(
    entries: Sequence[Mapping[str, Any]], output: str | os.PathLike, key: str = "training"
) -> Path:
    """Write entries as a MONAI datalist JSON ``{key: entries}`` (stable key order, for diffs)."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({key: list(entries)}, indent=2, sort_keys=True) + "\n")
    return output


def _entry_problem(entry: Any) -> str | None:
    """What is wrong with the types of one datalist entry (``None``: nothing)."""
    if not isinstance(entry, Mapping):
        return f"expected an object with 'image' and 'dims', got {type(entry).__name__} {entry!r:.60}"
    for key in ("image", "dims"):
        if key not in entry:
            return f"missing key {key!r} (keys: {', '.join(map(str, entry)) or 'none'})"
    image = entry["image"]
    paths = image if isinstance(image, list) else [image]
    if not paths or not all(isinstance(p, str) and p for p in paths):
        return f"'image' must be a path or a list of paths, got {type(image).__name__} {image!r:.60}"
    dims = entry["dims"]
    if isinstance(dims, bool) or dims not in (2, 3):
        return f"'dims' must be 2 or 3, got {dims!r}"
    if "modality" in entry and not isinstance(entry["modality"], str):
        return f"'modality' must be a string, got {type(entry['modality']).__name__} {entry['modality']!r}"
    return None


def validate_datalist(
    entries: Sequence[Any],
    source: str | os.PathLike = "the datalist",
    base_dir: str | os.PathLike | None = None,
    check_files: bool = False,
    skip_bad_inputs: bool = False,
) -> list[dict[str, Any]]:
    """Check every entry's keys and types, resolve relative ``image`` paths and refuse duplicates.

    Relative paths are joined to ``base_dir`` and normalised. Paths upward of it (``../images/x.nii.gz``)
    are allowed, as in MONAI datalists: a datalist is configuration written by its user, and a dataset often
    sits next to, not under, the folder of its lists. What does not exist is named, as written and resolved.

    Args:
        entries: the datalist entries.
        source: name of the datalist in messages (its file).
        base_dir: folder that relative paths are relative to (``None``: leave them as they are).
        check_files: also refuse paths that are not non-empty files (missing, folders, link loops).
        skip_bad_inputs: drop bad entries (logged and counted) instead of raising.

    Raises:
        BadInputError: naming ``source``, the entry number and the problem.
    """
    kept: list[dict[str, Any]] = []
    skipped = SkipLog()
    seen: dict[tuple[str, ...], int] = {}
    for i, entry in enumerate(entries):
        try:
            problem = _entry_problem(entry)
            if problem is not None:
                raise BadInputError(source, f"entry {i}: {problem}")
            entry = dict(entry)
            paths = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            if base_dir is not None:
                paths = [os.path.normpath(os.path.join(base_dir, p)) for p in paths]
            written_paths = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
            for written, path in zip(written_paths, paths, strict=True):
                if check_files:
                    try:
                        check_file(path, what="image")
                    except BadInputError as err:
                        problem = err.problem.replace("image", f"image {path}", 1)
                        problem += f" (written {written!r})" if written != path else ""
                        raise BadInputError(source, f"entry {i}: {problem}") from None
            key = tuple(paths)
            if key in seen:
                raise BadInputError(
                    source, f"entry {i}: image {paths[0]} is listed again (entry {seen[key]})"
                )
            seen[key] = i
            entry["image"] = paths if isinstance(entry["image"], list) else paths[0]
            kept.append(entry)
        except BadInputError as err:
            if not skip_bad_inputs:
                raise
            skipped.add(err.path, err.problem)
    if len(skipped):
        logger.warning("%d datalist entr%s skipped:\n%s", len(skipped), "y" if len(skipped) == 1 else "ies",
                       skipped.summary())  # fmt: skip
    return kept


def load_datalist(
    path: str | os.PathLike, key: str = "training", skip_bad_inputs: bool = False
) -> list[dict[str, Any]]:
    """Read a datalist file ``{key: [entries]}``, check it and resolve relative ``image`` paths (files or
    DICOM file lists) against its folder (see :func:`validate_datalist`).

    Raises:
        BadInputError: the file is missing, not JSON, not ``{key: [...]}``, or (unless ``skip_bad_inputs``)
            an entry is malformed, duplicated or names a missing file; the message names the file and entry.
    """
    path = Path(path)
    check_file(path, what="datalist file")
    try:
        content = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise BadInputError(path, f"datalist is not a text file ({err})") from None
    except json.JSONDecodeError as err:
        raise BadInputError(path, f"datalist is not valid JSON (line {err.lineno}, column {err.colno}: "
                                  f"{err.msg})") from None  # fmt: skip
    if not isinstance(content, dict):
        raise BadInputError(
            path, f"expected a JSON object with a {key!r} list, got a {type(content).__name__}"
        )
    if key not in content:
        raise BadInputError(path, f"datalist has no {key!r} list (keys: {', '.join(content) or 'none'})")
    if not isinstance(content[key], list):
        raise BadInputError(path, f"{key!r} must be a list of entries, got {type(content[key]).__name__}")
    return validate_datalist(
        content[key], path, base_dir=path.absolute().parent, check_files=True, skip_bad_inputs=skip_bad_inputs
    )
