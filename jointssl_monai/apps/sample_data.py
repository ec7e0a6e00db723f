"""Real medical images that ship with installed packages, found without any download.

The demo and the tests use these instead of synthetic arrays:

- Debian ``mricron-data``: the Colin27 T1 brain MRI (181x217x181, 1 mm), its skull-stripped version and the
  AAL atlas on the same grid.
- Debian ``insighttoolkit5-examples``: a second subject's T1 (128x128x62) with a 7-class segmentation and a
  skull-strip map, plus real 2D MRI slices (PNG, MHA).
- pydicom's own test files (CT, MR, multi-file DICOM series) and, when installed, PyPI ``pydicom-data``.
- nibabel's test data (small anatomical and functional volumes).

Files are located through the package that installed them (``dpkg -L``, the Python package's folder), never
through a path hard-coded for one machine.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEMO_SAMPLES",
    "SAMPLES",
    "Sample",
    "SampleNotFoundError",
    "available_samples",
    "demo_datalist",
    "find_sample",
    "pydicom_test_dir",
]

logger = logging.getLogger(__name__)


class SampleNotFoundError(FileNotFoundError):
    """A named sample image is not installed; the message says which package provides it."""


@dataclass(frozen=True)
class Sample:
    """Where a sample image comes from.

    Attributes:
        source: ``"deb:<package>"`` for a Debian package, ``"py:<module>"`` for a Python package.
        relative: path of the file inside the package, matched as a suffix of the installed path.
        description: what the image is.
    """

    source: str
    relative: str
    description: str


_ITK = "deb:insighttoolkit5-examples"
_MRICRON = "deb:mricron-data"

SAMPLES: dict[str, Sample] = {
    "colin27_t1": Sample(_MRICRON, "templates/ch2.nii.gz", "Colin27 T1 MRI, 181x217x181, 1 mm"),
    "colin27_brain": Sample(_MRICRON, "templates/ch2bet.nii.gz", "Colin27 T1, skull-stripped"),
    "colin27_aal": Sample(_MRICRON, "templates/aal.nii.gz", "AAL atlas (116 regions) on the Colin27 grid"),
    "itk_t1": Sample(_ITK, "Data/KmeansTest_T1UCharRaw.nii.gz", "T1 MRI, 128x128x62, 2x2x3 mm"),
    "itk_t1_seg": Sample(_ITK, "Data/KmeansTest_T1KmeansPrelimSegmentation.nii.gz", "7-class segmentation"),
    "itk_t1_skullstrip": Sample(_ITK, "Data/KmeansTest_T1RawSkullStrip.nii.gz", "skull-strip class map"),
    "itk_pd_slice_png": Sample(_ITK, "Data/BrainProtonDensitySlice.png", "2D PD-weighted MRI slice (PNG)"),
    "itk_t1_slice_png": Sample(_ITK, "Data/BrainT1Slice.png", "2D T1 MRI slice (PNG)"),
    "itk_pd_3slices_mha": Sample(_ITK, "Data/BrainProtonDensity3Slices.mha", "3-slice PD MRI volume (MHA)"),
    "itk_rat_lung_mha": Sample(_ITK, "Data/RatLungSlice1.mha", "2D rat lung CT slice (MHA)"),
    "pydicom_ct": Sample("py:pydicom", "data/test_files/CT_small.dcm", "CT slice, 128x128 (DICOM)"),
    "pydicom_mr": Sample("py:pydicom", "data/test_files/MR_small.dcm", "MR slice, 64x64 (DICOM)"),
    "pydicom_ct_series": Sample(
        "py:pydicom", "data/test_files/dicomdirtests/98892001/CT5N", "5-file CT series, 16x16 (DICOM folder)"
    ),
    "pydicom_cr_x_ray": Sample("py:data_store", "data/RG1_UNCR.dcm", "CR X-ray (DICOM, pydicom-data)"),
    "nibabel_anatomical": Sample("py:nibabel", "tests/data/anatomical.nii", "small anatomical MRI (NIfTI)"),
    "nibabel_4d": Sample("py:nibabel", "tests/data/example4d.nii.gz", "real 4D fMRI series (NIfTI)"),
}


@functools.cache
def _debian_package_files(package: str) -> tuple[str, ...]:
    dpkg = shutil.which("dpkg")
    if dpkg is None:
        return ()
    result = subprocess.run([dpkg, "-L", package], capture_output=True, text=True, check=False)
    return tuple(result.stdout.splitlines()) if result.returncode == 0 else ()


def _python_package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pydicom_test_dir() -> Path:
    """Folder of pydicom's bundled test files (read directly: pydicom's own look-up may try a download)."""
    root = _python_package_dir("pydicom")
    if root is None:
        raise SampleNotFoundError("pydicom is not installed")
    return root / "data" / "test_files"


def find_sample(name: str) -> Path:
    """Return the installed path of the sample image ``name`` (a key of :data:`SAMPLES`).

    Raises:
        KeyError: ``name`` is not a known sample.
        SampleNotFoundError: the package that provides it is not installed (the message says how to
            install it).
    """
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known samples: {', '.join(sorted(SAMPLES))}")
    sample = SAMPLES[name]
    kind, package = sample.source.split(":", 1)
    if kind == "deb":
        suffix = "/" + sample.relative
        for line in _debian_package_files(package):
            if line.endswith(suffix) and Path(line).exists():
                return Path(line)
        hint = f"install the Debian package: apt-get install -y {package}"
    else:
        root = _python_package_dir(package)
        if root is not None and (root / sample.relative).exists():
            return root / sample.relative
        pip_name = {"data_store": "pydicom-data"}.get(package, package)
        hint = f"install the Python package: pip install {pip_name}"
    raise SampleNotFoundError(f"sample {name!r} ({sample.description}) is not installed; {hint}")


def available_samples() -> dict[str, Path]:
    """All sample images that are installed on this machine, by name."""
    found = {}
    for name in SAMPLES:
        try:
            found[name] = find_sample(name)
        except SampleNotFoundError:
            continue
    return found


#: Real images of the demo data set: (sample name, dims, modality). Label maps and atlases are left out.
DEMO_SAMPLES: tuple[tuple[str, int, str], ...] = (
    ("colin27_t1", 3, "MR"),
    ("itk_t1", 3, "MR"),
    ("nibabel_anatomical", 3, "MR"),
    ("itk_pd_3slices_mha", 3, "MR"),
    ("pydicom_ct_series", 3, "CT"),
    ("itk_pd_slice_png", 2, "MR"),
    ("itk_t1_slice_png", 2, "MR"),
    ("itk_rat_lung_mha", 2, "CT"),
    ("pydicom_ct", 2, "CT"),
    ("pydicom_mr", 2, "MR"),
    ("pydicom_cr_x_ray", 2, "CR"),
)


def demo_datalist() -> list[dict[str, Any]]:
    """Datalist entries for the demo images installed on this machine (at least one volume and one image).

    A DICOM series folder is listed as its files in name order; the loader orders slices by position.
    """
    entries = []
    for name, dims, modality in DEMO_SAMPLES:
        try:
            path = find_sample(name)
        except SampleNotFoundError as err:
            logger.warning(f"demo data: {err}")
            continue
        image: str | list[str] = str(path)
        if path.is_dir():
            image = sorted(str(p) for p in path.iterdir() if p.is_file())
        entries.append({"image": image, "dims": dims, "modality": modality, "sample": name})
    if not any(e["dims"] == 3 for e in entries) or not any(e["dims"] == 2 for e in entries):
        raise SampleNotFoundError(
            "the demo needs at least one real volume and one real 2D image; install them with "
            "'apt-get install -y mricron-data insighttoolkit5-examples' (and pip install pydicom-data)"
        )
    return entries
