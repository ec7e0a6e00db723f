"""A hostile corpus made from real images: files whose headers read but whose data do not, of every kind a
header scan lets through (the verification and the soak test use it).

Each maker takes a folder and the real sample paths, writes one bad file and returns the datalist entry
for it; :data:`BAD_KINDS` maps a kind to its maker.
"""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def _cut(source: Path, target: Path, fraction: float) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def truncated_gzip(folder: Path, samples: dict[str, Path]) -> dict:
    """A real .nii.gz cut in the middle of its gzip stream (the header, at the start, still reads)."""
    return {"image": str(_cut(samples["itk_t1"], folder / "truncated_gzip.nii.gz", 0.5)), "dims": 3}


def short_nifti(folder: Path, samples: dict[str, Path]) -> dict:
    """A real volume as an uncompressed .nii, shorter than its header says."""
    plain = gzip.decompress(samples["itk_t1"].read_bytes())
    path = folder / "short.nii"
    path.write_bytes(plain[: int(len(plain) * 0.6)])
    return {"image": str(path), "dims": 3}


def broken_png(folder: Path, samples: dict[str, Path]) -> dict:
    """A real PNG slice whose compressed pixel data stop half way."""
    return {"image": str(_cut(samples["itk_pd_slice_png"], folder / "broken.png", 0.6)), "dims": 2}


def truncated_jpeg(folder: Path, samples: dict[str, Path]) -> dict:
    """A real PNG slice saved as JPEG, cut in half."""
    Image.open(samples["itk_pd_slice_png"]).convert("L").save(folder / "full.jpg", quality=90)
    path = _cut(folder / "full.jpg", folder / "truncated.jpg", 0.5)
    (folder / "full.jpg").unlink()
    return {"image": str(path), "dims": 2}


def short_detached_data(folder: Path, samples: dict[str, Path]) -> dict:
    """An MHA header (.mhd) whose detached .raw data file holds half the voxels the header declares."""
    volume = np.asarray(nib.load(samples["itk_t1"]).dataobj, dtype=np.uint8)
    (folder / "detached.raw").write_bytes(volume.tobytes(order="F")[: volume.size // 2])
    header = (
        f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, volume.shape))}\n"
        "ElementType = MET_UCHAR\nElementDataFile = detached.raw\n"
    )
    (folder / "detached.mhd").write_text(header)
    return {"image": str(folder / "detached.mhd"), "dims": 3}


def short_nrrd(folder: Path, samples: dict[str, Path]) -> dict:
    """The first 8 slices of a real volume as a raw NRRD whose data stop at a third of the declared size."""
    volume = np.asarray(nib.load(samples["itk_t1"]).dataobj, dtype=np.uint8)[:, :, :8]
    header = (
        f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: {' '.join(map(str, volume.shape))}\nencoding: raw\n\n"
    ).encode()
    (folder / "short.nrrd").write_bytes(header + volume.tobytes(order="F")[: volume.size // 3])
    return {"image": str(folder / "short.nrrd"), "dims": 3}


BAD_KINDS: dict[str, Callable[[Path, dict[str, Path]], dict]] = {
    "truncated_gzip": truncated_gzip,
    "short_nifti": short_nifti,
    "broken_png": broken_png,
    "truncated_jpeg": truncated_jpeg,
    "short_detached_data": short_detached_data,
    "short_nrrd": short_nrrd,
}


def good_entries(folder: Path, samples: dict[str, Path]) -> list[dict]:
    """Real images copied into ``folder``: two volumes and two 2D slices."""
    entries = []
    for name, dims in (
        ("itk_t1", 3),
        ("nibabel_anatomical", 3),
        ("itk_pd_slice_png", 2),
        ("itk_t1_slice_png", 2),
    ):
        target = folder / samples[name].name
        shutil.copy(samples[name], target)
        entries.append({"image": str(target), "dims": dims, "modality": "MR"})
    return entries


__all__ = ["BAD_KINDS", "good_entries"]
