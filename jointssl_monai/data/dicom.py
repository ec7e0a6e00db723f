"""DICOM in one place: header checks, series ordering and loading of single-frame series.

The datalist scanner (:func:`scan_dicom_file`, :func:`order_dicom_series`) and the loader
(:func:`read_dicom_header`, :func:`load_dicom_series`) share these functions, so that a series the scanner
lists is the series the loader stacks. Pixel data are never decoded before :func:`check_dicom_dataset` has
checked that the header's size is sane and, for uncompressed files, that the bytes are all there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jointssl_monai.data.checks import DEFAULT_MAX_VOXELS, BadInputError, check_file, check_shape

__all__ = [
    "DICOM_SUFFIXES",
    "check_dicom_dataset",
    "check_slice_spacing",
    "invert_monochrome1",
    "load_dicom_series",
    "order_dicom_series",
    "read_dicom_header",
    "scan_dicom_file",
    "slice_normal",
]

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")

#: Relative spacing deviation above which a DICOM series counts as having a missing slice.
SPACING_TOLERANCE = 0.5


def _read_slice(path: str) -> tuple[np.ndarray, dict]:
    from monai.data import PydicomReader

    reader = PydicomReader()
    array, meta = reader.get_data(reader.read(path))
    return np.asarray(array), dict(meta)


def scan_dicom_file(path: Path, max_voxels: int = DEFAULT_MAX_VOXELS):
    """Read a DICOM file's header and (undecoded) pixel bytes, and check it; ``None`` if not DICOM at all."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    check_file(path)
    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        return None
    except Exception as err:  # truncated/corrupt files raise struct/EOF/value errors
        raise BadInputError(path, f"unreadable DICOM file ({type(err).__name__}: {err})") from err
    if "Rows" not in ds and "PixelData" not in ds:
        return ds, 0  # not an image object: DICOMDIR, report, structure set, ...
    frames, _, _ = check_dicom_dataset(ds, path, max_voxels)
    return ds, frames


def slice_normal(ds) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    row, col = np.asarray(iop[:3], dtype=float), np.asarray(iop[3:], dtype=float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    return normal / norm if norm > 0 else None


def check_slice_spacing(
    series: Sequence[Path | str], paths: Sequence[Path | str], keys: Sequence[float]
) -> None:
    """Refuse slices, in the order given, whose positions along the normal (``keys``) repeat or are not
    evenly spaced: a missing slice, a repeated one, or files out of slice order.

    Raises:
        BadInputError: naming the ``series`` (all its files) and the first irregular step.
    """
    names = [Path(p).name for p in paths]
    gaps = np.diff(np.asarray(keys, dtype=float))
    if np.any(np.abs(gaps) < 1e-4):
        i = int(np.argmin(np.abs(gaps)))
        raise BadInputError(
            series, f"mixed series: {names[i]} and {names[i + 1]} share slice position {keys[i]:.3f}"
        )
    if len(gaps) > 1:
        step = float(np.median(gaps))
        irregular = np.abs(gaps - step) > SPACING_TOLERANCE * abs(step)
        if irregular.any():
            i = int(np.argmax(irregular))
            raise BadInputError(
                series,
                f"incomplete series: step of {gaps[i]:.3f} mm after {names[i]} where slices are "
                f"{step:.3f} mm apart (a slice is missing, or the files are not in slice order)",
            )


def order_dicom_series(datasets: Sequence[tuple[Path, Any]]) -> list[Path]:
    """Order the single-frame files of one series along the slice normal and check that the series is whole.

    Slices are sorted by ``ImagePositionPatient`` projected on the normal of ``ImageOrientationPatient``; when
    either tag is missing, by ``InstanceNumber``. Then every slice must share Rows/Columns and orientation, no
    two slices may share a position, and the spacing must be regular (a gap means a missing slice).

    Raises:
        BadInputError: the series is mixed or incomplete; the message names the series and the problem.
    """
    paths = [p for p, _ in datasets]
    sizes = {(int(ds.Rows), int(ds.Columns)) for _, ds in datasets}
    if len(sizes) > 1:
        raise BadInputError(paths, f"mixed series: slices have different Rows x Columns {sorted(sizes)}")
    normals = [slice_normal(ds) for _, ds in datasets]
    positions = [ds.get("ImagePositionPatient") for _, ds in datasets]
    if all(n is not None for n in normals) and all(p is not None and len(p) == 3 for p in positions):
        if any(not np.allclose(n, normals[0], atol=1e-3) for n in normals):
            raise BadInputError(paths, "mixed series: slices have different ImageOrientationPatient")
        keys = [float(np.dot(np.asarray(p, dtype=float), normals[0])) for p in positions]
        order = sorted(range(len(paths)), key=lambda i: (keys[i], str(paths[i])))
        check_slice_spacing(paths, [paths[i] for i in order], [keys[i] for i in order])
    else:
        numbers = [ds.get("InstanceNumber") for _, ds in datasets]
        if any(n is None for n in numbers):
            raise BadInputError(
                paths, "series without ImagePositionPatient nor InstanceNumber: cannot order it"
            )
        order = sorted(range(len(paths)), key=lambda i: (int(numbers[i]), str(paths[i])))
        sorted_numbers = [int(numbers[i]) for i in order]
        if len(set(sorted_numbers)) != len(sorted_numbers):
            raise BadInputError(paths, "mixed series: repeated InstanceNumber")
    return [paths[i] for i in order]


def read_dicom_header(path: str, max_voxels: int = DEFAULT_MAX_VOXELS):
    import pydicom

    check_file(path)
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise BadInputError(path, f"unreadable DICOM file ({type(err).__name__}: {err})") from err
    check_dicom_dataset(ds, path, max_voxels)
    return ds


def invert_monochrome1(array: np.ndarray, ds) -> np.ndarray:
    # MONOCHROME1: the lowest value is displayed white. Mirror the value range so that bright means dense,
    # like MONOCHROME2 and like ITK/GDCM do (up to a constant offset, which intensity normalisation removes).
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        return array.max() + array.min() - array
    return array


def load_dicom_series(
    files: Sequence[str], max_voxels: int = DEFAULT_MAX_VOXELS
) -> tuple[np.ndarray, np.ndarray]:
    """Stack single-frame DICOM files in the given (datalist) order; affine from the slice positions.

    A series whose files are not evenly spaced along the slice normal in that order (a missing slice, files
    out of order) is refused, as the datalist scan refuses it (:func:`check_slice_spacing`).
    """
    slices, origins, keys, affine = [], [], [], None
    shape = None
    for path in files:
        ds = read_dicom_header(path, max_voxels)
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise BadInputError(files, f"mixed series: {path} is a multi-frame file")
        array, meta = _read_slice(path)
        array = invert_monochrome1(array.astype(np.float32), ds)
        if shape is not None and array.shape != shape:
            raise BadInputError(
                files, f"mixed series: {path} has shape {array.shape}, the first slice {shape}"
            )
        shape = array.shape
        slices.append(array)
        position, normal = ds.get("ImagePositionPatient"), slice_normal(ds)
        if position is not None and len(position) == 3 and normal is not None:
            keys.append(float(np.dot(np.asarray(position, dtype=float), normal)))
        slice_affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
        affine = slice_affine if affine is None else affine
        origins.append(slice_affine[:3, 3])
    if len(keys) == len(files) > 1:
        check_slice_spacing(files, files, keys)
    volume = np.stack(slices, axis=-1)
    affine = affine.copy()
    if len(files) > 1:  # third column: step between consecutive slice origins (in the datalist order)
        affine[:3, 2] = (origins[-1] - origins[0]) / (len(files) - 1)
    return volume, affine


def check_dicom_dataset(ds, path: str | os.PathLike, max_voxels: int = DEFAULT_MAX_VOXELS) -> tuple[int, ...]:
    """Check a DICOM dataset (read with its pixel bytes, not decoded) and return ``(frames, rows, columns)``.

    Refuses files without pixel data, sizes beyond ``max_voxels`` and, for uncompressed transfer syntaxes,
    pixel data shorter than ``Rows x Columns x frames x samples x bytes`` claims (a truncated file or a lying
    header), all before ``pixel_array`` allocates anything.
    """
    path = str(path)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise BadInputError(
            path, "DICOM file has no pixel data (not an image: e.g. a report or structure set)"
        )
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as err:
        raise BadInputError(path, "DICOM file has pixel data but no valid Rows/Columns") from err
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError) as err:  # e.g. NumberOfFrames '1A' (pydicom's badVR.dcm)
        raise BadInputError(
            path, f"DICOM header has an invalid NumberOfFrames or SamplesPerPixel ({err})"
        ) from err
    check_shape(path, (frames, rows, cols, samples), max_voxels, "DICOM header")
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if "PixelData" in ds and (syntax is None or not syntax.is_compressed):
        expected = rows * cols * frames * samples * int(ds.get("BitsAllocated", 16)) // 8
        actual = len(ds.PixelData)
        if actual < expected:
            raise BadInputError(
                path,
                f"DICOM pixel data holds {actual:,} bytes but Rows x Columns x frames x samples x bits "
                f"({rows}x{cols}x{frames}x{samples}x{ds.get('BitsAllocated', 16)}) needs {expected:,} "
                "(truncated file or wrong header)",
            )
    return frames, rows, cols
