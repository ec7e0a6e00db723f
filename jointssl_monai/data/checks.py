"""Checks that refuse bad input early, with an error that names the file and the problem.

Header checks run *before* any pixel data is decoded, so that a file whose header claims an absurd size is
refused without allocating it. Array checks run right after loading, so that NaN/Inf voxels, constant images
or a wrong dimensionality never reach training silently.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MAX_VOXELS",
    "BadInputError",
    "SkipLog",
    "check_affine",
    "check_file",
    "check_image_header",
    "check_nifti_header",
    "check_shape",
    "check_voxel_values",
    "describe_path",
    "label_map_reason",
]

logger = logging.getLogger(__name__)

#: Largest image (voxels times channels) the loader accepts: 2**30 float32 values are 4 GiB.
DEFAULT_MAX_VOXELS = 2**30

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class BadInputError(ValueError):
    """An input file cannot be used for training; ``path`` and ``problem`` say which and why."""

    def __init__(self, path: str | os.PathLike | Sequence, problem: str) -> None:
        self.path = describe_path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):  # keep the two arguments through pickling (DataLoader workers)
        return (type(self), (self.path, self.problem))


def describe_path(path: str | os.PathLike | Sequence | None) -> str:
    """A short human-readable name for a file, a folder or an ordered list of DICOM files."""
    if path is None:
        return "<unknown input>"
    if isinstance(path, (str, os.PathLike)):
        return str(path)
    paths = [str(p) for p in path]
    if len(paths) == 1:
        return paths[0]
    folder = os.path.dirname(paths[0]) or "."
    return f"DICOM series of {len(paths)} files in {folder} ({Path(paths[0]).name}, ...)"


@dataclass
class SkipLog:
    """Bad inputs that were skipped (``skip_bad_inputs=True``) instead of stopping the run.

    Attributes:
        skipped: ``(file, reason)`` pairs in the order they were met.
    """

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, path: str | os.PathLike | Sequence, reason: str) -> None:
        name = describe_path(path)
        self.skipped.append((name, reason))
        logger.warning("skipping bad input %s: %s", name, reason)

    def __len__(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        if not self.skipped:
            return "no input skipped"
        lines = [f"{len(self.skipped)} input(s) skipped:"]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def check_file(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse a path that is not a non-empty regular file, saying which of the usual reasons applies.

    Raises:
        BadInputError: the path is a broken symbolic link or a link loop, does not exist, is a folder, or is
            empty (0 bytes).
    """
    name = str(path)
    if os.path.islink(name) and not os.path.exists(name):
        try:
            os.stat(name)
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise BadInputError(name, f"{what} is a symbolic link loop") from None
        raise BadInputError(name, f"{what} is a broken symbolic link (to {os.readlink(name)})")
    if not os.path.exists(name):
        raise BadInputError(name, f"{what} does not exist")
    if os.path.isdir(name):
        raise BadInputError(
            name,
            f"{what} is a folder, not an image file (list a DICOM series as its files, or scan the folder "
            "with 'jointssl datalist')",
        )
    if os.path.getsize(name) == 0:
        raise BadInputError(name, f"{what} is an empty file (0 bytes)")


def _check_data_file(path: str, data_file: str | None) -> None:
    """A detached header (NRRD ``.nhdr``, MetaImage ``.mhd``, Analyze ``.hdr``) must name an existing file."""
    if not data_file:
        return
    target = data_file if os.path.isabs(data_file) else os.path.join(os.path.dirname(path), data_file)
    if not os.path.isfile(target):
        raise BadInputError(path, f"data file {target} does not exist (the header points to it)")


def _detached_data_file(path: str) -> str | None:
    """The data file a detached header names (``None`` for single-file formats or data lists/patterns)."""
    name = path.lower()
    if name.endswith(".hdr"):
        return path[: -len(".hdr")] + (".img" if path.endswith(".hdr") else ".IMG")
    if not name.endswith((".nhdr", ".mhd")):
        return None
    pattern = (
        r"^\s*data ?file\s*:\s*(.+?)\s*$"
        if name.endswith(".nhdr")
        else r"^\s*ElementDataFile\s*=\s*(.+?)\s*$"
    )
    with open(path, "rb") as f:
        text = f.read(65536).decode("latin-1")
    match = re.search(pattern, text, flags=re.MULTILINE | re.IGNORECASE)
    if match is None:
        return None
    value = match.group(1)
    if value.upper() in ("LOCAL", "LIST") or value.upper().startswith("LIST") or "%" in value or " " in value:
        return None  # data inside the header, or a list/pattern of files: ITK checks those itself
    return value


def check_affine(affine, path: str | os.PathLike | Sequence) -> None:
    """Refuse a volume whose voxel-to-world matrix is singular or not finite (e.g. zero voxel sizes):
    orienting or resampling it would divide by zero or scramble the axes."""
    matrix = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(matrix).all() or abs(float(np.linalg.det(matrix))) < 1e-12:
        raise BadInputError(
            path,
            "singular affine (zero or non-finite voxel size or direction: "
            f"{np.round(matrix, 3).tolist()}); fix pixdim/sform/qform in the header",
        )


def check_shape(path: str, shape: Sequence[int], max_voxels: int, what: str) -> None:
    """Refuse a shape with a size <= 0 or more than ``max_voxels`` values; ``what`` names its source."""
    shape = [int(s) for s in shape]
    if not shape or any(s <= 0 for s in shape):
        raise BadInputError(path, f"{what} claims an invalid size {tuple(shape)}")
    total = int(np.prod(np.asarray(shape, dtype=np.float64)))
    if total > max_voxels:
        raise BadInputError(
            path,
            f"{what} claims {tuple(shape)} = {total:,} values, more than the limit of {max_voxels:,} "
            "(refused before allocating; raise max_voxels if this is real)",
        )


def check_nifti_header(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[int, ...]:
    """Read only the NIfTI/Analyze header and return the data shape; refuse absurd or invalid sizes.

    Raises:
        BadInputError: the header cannot be parsed or claims an absurd size.
    """
    import nibabel as nib

    path = str(path)
    check_file(path)
    if path.lower().endswith(".gz"):
        with open(path, "rb") as f:
            if f.read(2) != b"\x1f\x8b":
                raise BadInputError(path, "named .gz but is not gzip-compressed (rename it without .gz?)")
    _check_data_file(path, _detached_data_file(path))
    try:
        image = nib.load(path)  # nibabel maps the header only; pixel data is read lazily
        header = image.header
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        affine = image.affine
    except Exception as err:  # nibabel raises several types for corrupt headers
        raise BadInputError(path, f"unreadable NIfTI header ({type(err).__name__}: {err})") from err
    if dtype.kind not in "biuf":
        raise BadInputError(
            path,
            f"pixel type {dtype.name if dtype.fields is None else dtype} is not supported (expected "
            "real-valued grey levels)",
        )
    check_shape(path, shape, max_voxels, "NIfTI header")
    if len([s for s in shape if s > 1]) >= 3:
        check_affine(affine, path)
    return shape


def check_itk_header(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[int, ...]:
    """Read only the header of an ITK-readable file (MHA, NRRD, PNG, ...); return its shape ``(x, y[, z])``.

    RGB(A) pictures are accepted (they are converted to grey levels when loaded); other multi-component pixels
    (vectors, complex numbers) are refused.
    """
    import itk

    path = str(path)
    check_file(path)
    _check_data_file(path, _detached_data_file(path))
    try:
        io = itk.ImageIOFactory.CreateImageIO(path, itk.CommonEnums.IOFileMode_ReadMode)
        if io is None:
            raise ValueError("no ITK image reader recognises this file")
        io.SetFileName(path)
        io.ReadImageInformation()
        shape = tuple(int(io.GetDimensions(i)) for i in range(io.GetNumberOfDimensions()))
        components = int(io.GetNumberOfComponents())
        pixel = str(io.GetPixelTypeAsString(io.GetPixelType())).lower()
    except Exception as err:
        raise BadInputError(path, f"unreadable image header ({type(err).__name__}: {err})") from err
    if components > 1 and pixel not in ("rgb", "rgba"):
        raise BadInputError(
            path, f"pixels with {components} components of type {pixel!r} (expected grey or RGB)"
        )
    check_shape(path, (*shape, components), max_voxels, "image header")
    return shape


def check_image_header(path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[int, ...]:
    """Header check for any non-DICOM file by suffix; return the shape the header claims."""
    name = str(path).lower()
    check_file(path)
    if name.endswith(NIFTI_SUFFIXES):
        return check_nifti_header(path, max_voxels)
    return check_itk_header(path, max_voxels)


def check_voxel_values(array, path: str | os.PathLike | Sequence) -> None:
    """Refuse arrays with NaN/Inf values or a single constant value (nothing to learn, and
    intensity normalisation would divide by zero)."""
    values = np.asarray(array)
    if values.size == 0:
        raise BadInputError(path, "image is empty")
    finite = np.isfinite(values)
    if not finite.all():
        bad = int(values.size - finite.sum())
        raise BadInputError(path, f"image holds {bad:,} NaN/Inf value(s) out of {values.size:,}")
    low, high = float(values.min()), float(values.max())
    if low == high:
        raise BadInputError(path, f"image is constant (every value is {low:g})")


#: Label maps (segmentations, atlases, masks) repeat their neighbour's value in most of their foreground;
#: images do not. Measured on real files: 0.75-0.99 for atlases (AAL, Brodmann, JHU, Harvard-Oxford,
#: NeuroMaps) and masks, 0.03-0.09 for 8-bit MRI volumes and slices (Colin27, the ITK examples).
LABEL_MAP_NEIGHBOUR_AGREEMENT = 0.5
#: An integer image with this few distinct values is a mask or a drawing, not an acquisition.
LABEL_MAP_MAX_VALUES = 16


def label_map_reason(array) -> str | None:
    """Why an image looks like a label map rather than an acquired image, or ``None``.

    A label map holds integer values that repeat over whole regions: an integer image with at most
    :data:`LABEL_MAP_MAX_VALUES` distinct values, or whose non-zero voxels mostly equal their neighbour along
    the first axis (:data:`LABEL_MAP_NEIGHBOUR_AGREEMENT`). Pretraining on atlases and masks teaches a network
    to cluster region codes, not anatomy.
    """
    values = np.asarray(array, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)) or np.any(np.mod(values, 1) != 0):
        return None
    distinct = np.unique(values).size
    if distinct <= LABEL_MAP_MAX_VALUES:
        return f"label map or mask: only {distinct} distinct integer values"
    squeezed = np.squeeze(values)
    if squeezed.ndim < 2 or squeezed.shape[0] < 2:
        return None
    foreground = squeezed[1:] != 0
    agreement = float(((squeezed[1:] == squeezed[:-1]) & foreground).sum() / max(1, foreground.sum()))
    if agreement >= LABEL_MAP_NEIGHBOUR_AGREEMENT:
        return f"label map: {distinct} integer values, {agreement:.0%} of voxels equal their neighbour"
    return None
