"""Soak: 200 pretraining iterations through the bundle, 2 loader workers, on a real datalist of which a third
are bad files of every kind a header scan lets through (and some it does not), with ``skip_bad_inputs``.

The run must finish, pass over each bad file every time it is drawn, and record each one once (in
``provenance.json``); a float32 volume with finite extreme values (+/-3e38) must be trained on, not skipped.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom.data
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "engines"))
sys.path.insert(0, str(Path(__file__).parents[1] / "data"))
from hostile_corpus import BAD_KINDS, good_entries
from pretrain_bundle_runs import run_bundle, small_real_datalist

pytestmark = pytest.mark.slow

SAMPLES = ("itk_t1", "nibabel_anatomical", "itk_pd_slice_png", "itk_t1_slice_png")
MORE_SLICES = (  # more real 2D MRI slices of the same package, as good images
    "BrainProtonDensitySlice256x256.png", "BrainMidSagittalSlice.png", "FatMRISlice.png",
    "VisibleWomanHeadSlice.png", "VisibleWomanEyeSlice.png",
)  # fmt: skip


def _bad_entries(folder: Path, samples: dict[str, Path], ct_series: Path) -> dict[str, dict]:
    bad = {kind: make(folder, samples) for kind, make in BAD_KINDS.items()}
    itk_data = samples["itk_pd_slice_png"].parent
    bad["vector_pixels"] = {
        "image": str(itk_data / "BayesianClassifierInitializerMemberships.mhd"),
        "dims": 3,
    }
    bad["bad_vr_dicom"] = {"image": pydicom.data.get_testdata_file("badVR.dcm", download=False), "dims": 2}
    nan = np.asarray(nib.load(samples["itk_t1"]).dataobj, dtype=np.float32)
    nan[10:12, 10:12, 10] = np.nan
    nib.save(nib.Nifti1Image(nan, np.eye(4)), str(folder / "nan.nii.gz"))
    bad["nan_voxels"] = {"image": str(folder / "nan.nii.gz"), "dims": 3}
    files = sorted(str(p) for p in ct_series.iterdir())
    bad["series_with_a_gap"] = {"image": files[:1] + files[2:], "dims": 3, "modality": "CT"}
    return bad


def test_200_iterations_with_a_third_bad_inputs_finish_and_count_each_once(tmp_path, sample_path):
    samples = {name: sample_path(name) for name in SAMPLES}
    data = tmp_path / "data"
    data.mkdir()
    good = json.loads(small_real_datalist(tmp_path).read_text())["training"] + good_entries(data, samples)
    for name in MORE_SLICES:
        good.append({"image": shutil.copy(samples["itk_pd_slice_png"].parent / name, data), "dims": 2})
    extreme = np.asarray(nib.load(samples["itk_t1"]).dataobj, dtype=np.float32) * (3e38 / 255) - 1.5e38
    nib.save(nib.Nifti1Image(extreme, np.eye(4)), str(data / "extreme.nii.gz"))
    good.append({"image": str(data / "extreme.nii.gz"), "dims": 3, "modality": "MR"})
    bad = _bad_entries(data, samples, sample_path("pydicom_ct_series"))
    entries = good + list(bad.values())
    assert len(bad) >= len(entries) / 3
    datalist = tmp_path / "soak.json"
    datalist.write_text(json.dumps({"training": entries}))

    volumes = sum(e["dims"] == 3 for e in entries)
    images = len(entries) - volumes
    epoch_length = max(volumes // 2, images // 2)  # batch 4: 2 volumes and 2 images a step
    run_bundle(
        tmp_path / "run", datalist=str(datalist), skip_bad_inputs=True, num_workers=2, cache="none",
        max_epochs=200 // epoch_length, intra_method="swav", timeout=900,
    )  # fmt: skip
    [record] = json.loads((tmp_path / "run" / "runs" / "pretrain" / "provenance.json").read_text())["runs"]
    assert record["completed"] and record["iterations_run"] == (200 // epoch_length) * epoch_length >= 190
    skipped = [Path(item["image"].split(" (")[0]).name for item in record["skipped_inputs"]]
    expected = [Path(e["image"]).name if isinstance(e["image"], str) else None for e in bad.values()]
    assert len(skipped) == len(set(skipped)) == len(bad), skipped  # every bad file, each once
    assert {name for name in expected if name} <= set(skipped)
    assert any(item["image"].startswith("DICOM series of") for item in record["skipped_inputs"])
    assert "extreme.nii.gz" not in skipped  # finite extremes are scaled, not skipped
    history = json.loads((tmp_path / "run" / "runs" / "pretrain" / "history.json").read_text())["epochs"]
    assert all(np.isfinite(epoch["loss"]) for epoch in history)
    print(json.dumps({"entries": len(entries), "bad": len(bad), "iterations": record["iterations_run"],
                      "skipped_steps": record["skipped_steps"], "skipped_inputs": len(skipped)}))  # fmt: skip
