"""Default datalists of the brain-extraction bundle, built from the real sample images installed offline.

Training: the Colin27 T1 volume (``ch2.nii.gz``) with the brain mask ``ch2bet.nii.gz > 0``.
Test: the ITK example subject's T1 with its skull-strip map ``> 0`` as the brain mask. That map has the
classes 6 (brain), 5 (a rim along the brain surface and the cerebellum, inside the intracranial volume) and
4 (126 isolated dark voxels inside the brain); all three lie inside the brain outline, so the mask is
``label > 0``.

The masks are derived at run time into ``output_dir`` (never committed): the bundle configs call
:func:`brain_extraction_datalist` through ``_target_``; a user replaces the list by overriding
``train#dataset#data`` / ``validate#dataset#data`` / ``datalist``.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

from jointssl_monai.apps.sample_data import find_sample

__all__ = ["binary_mask_file", "brain_extraction_datalist"]

_SPLITS = {
    # split: (image sample, label-source sample, mask file name)
    "train": ("colin27_t1", "colin27_brain", "colin27_brain_mask.nii.gz"),
    "test": ("itk_t1", "itk_t1_skullstrip", "itk_t1_brain_mask.nii.gz"),
}


def binary_mask_file(source: str | Path, output: str | Path) -> Path:
    """Write ``source > 0`` as a ``uint8`` NIfTI with the source's geometry; reuse an up-to-date file."""
    source, output = Path(source), Path(output)
    if output.is_file() and output.stat().st_mtime >= source.stat().st_mtime:
        return output
    image = nib.load(str(source))
    mask = (np.asarray(image.dataobj) > 0).astype(np.uint8)
    header = image.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    output.parent.mkdir(parents=True, exist_ok=True)
    # a private temporary name, then an atomic rename: several ranks or processes may derive it at once
    tmp = output.with_name(f".{os.getpid()}.{output.name}")
    nib.save(nib.Nifti1Image(mask, image.affine, header), str(tmp))
    tmp.replace(output)
    return output


def brain_extraction_datalist(
    split: str, output_dir: str | Path, with_label: bool = True
) -> list[dict[str, str]]:
    """The default datalist of one split: ``[{"image": path, "label": path}]``.

    Args:
        split: ``"train"`` (Colin27) or ``"test"`` (the ITK subject; also the bundle's validation and
            inference default).
        output_dir: folder where the derived brain masks are written.
        with_label: ``False`` returns images only (inference).

    Raises:
        KeyError: unknown split.
        jointssl_monai.apps.sample_data.SampleNotFoundError: the Debian data package is not installed.
    """
    if split not in _SPLITS:
        raise KeyError(f"unknown split {split!r}; use one of {sorted(_SPLITS)}")
    image_name, label_name, mask_name = _SPLITS[split]
    item = {"image": str(find_sample(image_name))}
    if with_label:
        item["label"] = str(binary_mask_file(find_sample(label_name), Path(output_dir) / mask_name))
    return [item]
