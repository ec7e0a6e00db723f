"""Loading 2D images and 3D volumes with MONAI readers, with the reader quirks normalised away.

One layout comes out whatever the file format and reader, and it is MONAI's own axis order, i.e. what
``LoadImage`` + ``EnsureChannelFirst`` give a fine-tuning pipeline (one in-plane orientation from pretraining
to fine-tuning, so pretrained filters meet the anatomy the way they learned it):

- a 3D volume is a ``MetaTensor`` of shape ``(1, X, Y, Z)`` with its affine (ready for
  ``Orientationd``/``Spacingd``); :class:`~jointssl_monai.data.transforms.SliceSequenced` later turns it into
  slices that keep the in-plane axes in this order;
- a 2D image is a tensor of shape ``(1, X, Y)``: the first index is the picture's *column* (``x``, left to
  right; DICOM ``Columns``, PIL width), the second its *row* (``y``, top to bottom), exactly as MONAI's PIL,
  pydicom and ITK readers order it (the transpose of the picture array of ``pydicom``/``PIL``). A single
  DICOM file loaded as 2D equals the same slice of its series loaded as a volume, before any orientation.
  2D images are not re-oriented: their affines are unreliable (``PydicomReader`` gives an axis-swapping
  default affine to files without ``ImageOrientationPatient``, which ``Orientation`` would turn into a
  transpose), and 2D MONAI pipelines (``LoadImage`` + ``EnsureChannelFirst``) usually do not orient them.
  Their flips are left as read (the views flip them at random anyway).

Normalisations (each pinned on a real file in the tests):

- the ITK reader returns a single 2D DICOM as 3D with a singleton axis: 2D items are squeezed;
- ``PydicomReader`` leaves ``MONOCHROME1`` images (many X-rays) inverted, bone dark: they are inverted so that
  bright means dense, as for ``MONOCHROME2`` and for the ITK/GDCM reader;
- RGB(A) pictures are averaged to one grey channel (the ITK reader gives PNGs as RGB components, PIL as grey;
  both come out the same).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from jointssl_monai.data.checks import (
    DEFAULT_MAX_VOXELS,
    ITK_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    BadInputError,
    check_affine,
    check_image_header,
    check_voxel_values,
    describe_path,
)
from jointssl_monai.data.dicom import invert_monochrome1, load_dicom_series, read_dicom_header

__all__ = ["LoadSSLImaged", "load_ssl_image"]

_READERS = ("NibabelReader", "PydicomReader", "ITKReader", "PILReader")


def _reader_for(path: str) -> str:
    name = path.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "NibabelReader"
    if name.endswith(ITK_SUFFIXES):
        return "ITKReader"
    if name.endswith(PIL_SUFFIXES):
        # Pillow is optional: ITK reads the same pictures (RGB ones as 3 components, averaged to grey later)
        return "PILReader" if importlib.util.find_spec("PIL") is not None else "ITKReader"
    return "PydicomReader"


def _monai_read(path: str, reader: str) -> tuple[np.ndarray, dict]:
    from monai.data import image_reader

    if reader not in _READERS:
        raise ValueError(f"unknown reader {reader!r}; choose one of {_READERS}")
    kwargs = {"channel_dim": None} if reader == "ITKReader" else {}
    obj = getattr(image_reader, reader)(**kwargs)
    array, meta = obj.get_data(obj.read(path))
    return np.asarray(array), dict(meta)


def _to_layout(array: np.ndarray, dims: int, source: str) -> np.ndarray:
    """Squeeze singleton and colour axes, and check the dimensionality the datalist states."""
    if dims == 2 and array.ndim == 3 and array.shape[-1] in (3, 4) and array.shape[0] > 4:
        array = array[..., :3].mean(axis=-1)  # RGB(A) picture -> grey
    while array.ndim > dims and array.shape[-1] == 1:
        array = array[..., 0]
    if dims == 2:
        while array.ndim > 2 and 1 in array.shape:
            array = np.squeeze(array, axis=array.shape.index(1))
    if array.ndim != dims or min(array.shape) < 1:
        kind = "2D image" if dims == 2 else "3D volume"
        raise BadInputError(
            source, f"wrong dimensionality: read shape {array.shape}, the datalist says a {kind}"
        )
    if dims == 2 and min(array.shape) < 2:
        raise BadInputError(source, f"image of shape {array.shape} is too small (a single row or column)")
    if dims == 3 and min(array.shape) == 1:
        raise BadInputError(source, f"wrong dimensionality: volume of shape {array.shape} has a single slice")
    return array


def load_ssl_image(
    image: str | os.PathLike | Sequence[str | os.PathLike],
    dims: int,
    reader: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> torch.Tensor:
    """Load one datalist ``image`` (a file, or a DICOM series as its ordered files) in this module's layout.

    Args:
        image: path of the file, or the files of one DICOM series in slice order.
        dims: 2 or 3, as stated by the datalist.
        reader: force one MONAI reader (``"ITKReader"``, ``"PydicomReader"``, ``"NibabelReader"``,
            ``"PILReader"``); by default chosen from the file suffix (DICOM by pydicom, NIfTI by nibabel,
            MHA/NRRD by ITK, PNG/JPEG by PIL).
        max_voxels: refuse headers that claim more values than this, before reading pixel data.

    Raises:
        BadInputError: the file is missing, unreadable, truncated, too large, of the wrong dimensionality,
            holds NaN/Inf values or is constant. The message names the file.
    """
    if dims not in (2, 3):
        raise BadInputError(image, f"'dims' must be 2 or 3, got {dims!r}")
    source = describe_path(image)
    affine = None
    try:
        if not isinstance(image, (str, os.PathLike)) and len(image) > 1:
            array, affine = load_dicom_series([str(p) for p in image], max_voxels)
        else:
            path = str(image if isinstance(image, (str, os.PathLike)) else image[0])
            chosen = reader or _reader_for(path)
            ds = None
            if chosen == "PydicomReader" or _reader_for(path) == "PydicomReader":
                ds = read_dicom_header(path, max_voxels)
            else:
                check_image_header(path, max_voxels)
            array, meta = _monai_read(path, chosen)
            array = array.astype(np.float32, copy=False)
            if ds is not None and chosen == "PydicomReader":
                array = invert_monochrome1(array, ds)  # ITK/GDCM already inverts MONOCHROME1
            affine = np.asarray(meta.get("affine", np.eye(4)), dtype=np.float64)
    except BadInputError:
        raise
    except Exception as err:  # any reader failure on a corrupt/truncated file
        raise BadInputError(image, f"unreadable image ({type(err).__name__}: {err})") from err
    array = _to_layout(array, dims, source)
    check_voxel_values(array, image)
    if dims == 2:  # MONAI's reader order (columns, rows), as LoadImage gives it to fine-tuning: kept as is
        return torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32)[None]
    check_affine(affine, image)
    return MetaTensor(torch.as_tensor(array, dtype=torch.float32)[None], affine=torch.as_tensor(affine))


class LoadSSLImaged(MapTransform):
    """Dictionary transform: load ``data[key]`` with :func:`load_ssl_image`, using ``data[dims_key]``.

    Also stores ``data["source"]``, a readable name of the input, which later error messages use.

    Args:
        keys: keys of the image paths (normally ``"image"``).
        dims_key: key holding 2 or 3 (the datalist's ``dims``).
        reader: force one MONAI reader (see :func:`load_ssl_image`).
        max_voxels: refuse headers that claim more values than this.
        allow_missing_keys: don't raise when a key is absent.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        dims_key: str = "dims",
        reader: str | None = None,
        max_voxels: int = DEFAULT_MAX_VOXELS,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.dims_key = dims_key
        self.reader = reader
        self.max_voxels = max_voxels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d.setdefault("source", describe_path(d[key]))
            if self.dims_key not in d:
                raise BadInputError(d[key], f"datalist entry has no {self.dims_key!r} field (2 or 3)")
            d[key] = load_ssl_image(d[key], int(d[self.dims_key]), self.reader, self.max_voxels)
        return d
