"""Where pretraining data come from: a datalist file, a folder to scan, or the real demo images."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from jointssl_monai.data.datalist import build_datalist, load_datalist, validate_datalist
from jointssl_monai.data.sample_data import SampleNotFoundError, find_sample
from jointssl_monai.data.validation import BadInputError

__all__ = ["DEMO_SAMPLES", "demo_datalist", "pretrain_datalist"]

logger = logging.getLogger(__name__)

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


def pretrain_datalist(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None,
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    skip_bad_inputs: bool = False,
) -> list[dict[str, Any]]:
    """The pretraining entries from a datalist (file or list) or, if none, by scanning ``dataset_dir``.

    Raises:
        ValueError: neither is given.
        BadInputError: nothing usable was found.
    """
    if datalist is not None:
        if isinstance(datalist, (str, os.PathLike)):
            entries = load_datalist(datalist, skip_bad_inputs=skip_bad_inputs)
            source: Any = datalist
        else:
            source = "the given datalist"
            entries = validate_datalist(datalist, source, skip_bad_inputs=skip_bad_inputs)
    elif dataset_dir is not None:
        folders = [dataset_dir] if isinstance(dataset_dir, (str, os.PathLike)) else list(dataset_dir)
        entries, summary = build_datalist(folders, skip_bad_inputs=skip_bad_inputs)
        logger.info(f"scanned {', '.join(map(str, folders))}: {summary}")
        source = folders[0] if len(folders) == 1 else folders
    else:
        raise ValueError(
            "pretraining needs data: set 'datalist' (a datalist JSON) or 'dataset_dir' (a folder)"
        )
    if not entries:
        raise BadInputError(source, "no pretraining image found")
    return entries
