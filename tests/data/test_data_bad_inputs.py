"""Generated bad inputs of every kind: an error naming the file and the problem, or a counted skip."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from jointssl_monai.data import (
    BadInputError,
    build_datalist,
    build_pretrain_dataset,
    build_pretrain_loader,
    build_pretrain_transforms,
    collate_joint_ssl,
)
from jointssl_monai.data.dataset import find_bad_input
from jointssl_monai.data.io import load_ssl_image


def _nifti(path, array):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), np.eye(4)), str(path))
    return path


@pytest.fixture
def good_volume(tmp_path):
    rng = np.random.default_rng(0)
    return _nifti(tmp_path / "good.nii.gz", rng.random((24, 20, 12)))


def _truncated_gz(tmp_path, good_volume):
    data = good_volume.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage(tmp_path, _):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(gzip.compress(b"this is not a NIfTI file" * 20))
    return path


def _absurd_header(tmp_path, _):
    # a 1 kB file whose header claims 30000 x 30000 x 30000 float32 voxels (108 TB)
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    path = tmp_path / "absurd.nii"
    with open(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 1024)
    return path


def _nan(tmp_path, _):
    a = np.ones((16, 16, 8), np.float32)
    a[3, 4, 5] = np.nan
    a[0, 0, 0] = np.inf
    return _nifti(tmp_path / "nan.nii.gz", a)


def _constant(tmp_path, _):
    return _nifti(tmp_path / "constant.nii.gz", np.full((16, 16, 8), 7.0))


def _four_d(tmp_path, _):
    return _nifti(tmp_path / "four_d.nii.gz", np.random.default_rng(0).random((8, 8, 8, 3)))


def _missing(tmp_path, _):
    return tmp_path / "does_not_exist.nii.gz"


def _dicom_without_pixels(tmp_path, _, source=None):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm", download=False))
    del ds.PixelData
    path = tmp_path / "no_pixels.dcm"
    ds.save_as(path)
    return path


def _dicom_lying_header(tmp_path, _):
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm", download=False))
    ds.Rows, ds.Columns = 40000, 40000  # pixel data holds 128 x 128 only
    path = tmp_path / "lying.dcm"
    ds.save_as(path)
    return path


def _dicom_truncated(tmp_path, _):
    src = pydicom.data.get_testdata_file("CT_small.dcm", download=False)
    data = Path(src).read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) - 9000])
    return path


CASES = {
    "truncated": (_truncated_gz, r"unreadable"),
    "garbage": (_garbage, r"unreadable NIfTI header"),
    "absurd_header": (_absurd_header, r"claims \(30000, 30000, 30000\).*refused before allocating"),
    "nan": (_nan, r"2 NaN/Inf value\(s\)"),
    "constant": (_constant, r"constant \(every value is 7\)"),
    "four_d": (_four_d, r"wrong dimensionality"),
    "missing": (_missing, r"does not exist"),
    "dicom_without_pixels": (_dicom_without_pixels, r"no pixel data"),
    "dicom_lying_header": (_dicom_lying_header, r"claims|pixel data holds"),
    "dicom_truncated": (_dicom_truncated, r"unreadable DICOM|pixel data holds"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loader_names_file_and_problem(case, tmp_path, good_volume):
    make, pattern = CASES[case]
    path = make(tmp_path, good_volume)
    with pytest.raises(BadInputError, match=pattern) as info:
        load_ssl_image(path, dims=3 if path.suffix != ".dcm" else 2)
    assert str(path) in str(info.value)


def test_absurd_header_is_refused_before_allocating(tmp_path, good_volume, monkeypatch):
    path = _absurd_header(tmp_path, good_volume)
    monkeypatch.setattr(nib.arrayproxy.ArrayProxy, "__array__", lambda *a, **k: pytest.fail("data was read"))
    with pytest.raises(BadInputError, match="refused before allocating"):
        load_ssl_image(path, dims=3)


def test_datalist_skips_each_bad_file_with_its_reason(tmp_path, good_volume):
    for case in ("nan", "absurd_header", "garbage", "dicom_without_pixels", "dicom_lying_header"):
        CASES[case][0](tmp_path, good_volume)
    entries, summary = build_datalist([tmp_path], skip_bad_inputs=True)
    # NaN values are only seen when loading; the header-level problems are caught by the scan
    assert sorted(e["image"].rsplit("/", 1)[1] for e in entries) == ["good.nii.gz", "nan.nii.gz"]
    reasons = dict((name.rsplit("/", 1)[1], why) for name, why in summary.skipped.skipped)
    assert set(reasons) == {"absurd.nii", "garbage.nii.gz", "no_pixels.dcm", "lying.dcm"}
    assert "no pixel data" in reasons["no_pixels.dcm"]


def test_loader_skips_bad_items_and_never_crashes_in_collate(tmp_path, good_volume):
    bad = [CASES[c][0](tmp_path, good_volume) for c in ("nan", "constant", "truncated", "missing")]
    datalist = [{"image": str(p), "dims": 3, "modality": "MR"} for p in [good_volume, *bad]]
    dataset = build_pretrain_dataset(datalist, num_slices=8, spatial_size=(16, 16), skip_bad_inputs=True)
    loader = build_pretrain_loader(dataset, volumes_per_batch=5, shuffle=False, drop_last=False)
    (batch,) = list(loader)
    assert batch["volume_index"].tolist() == [0]
    assert batch["volume_views"][0].shape == (1, 1, 8, 16, 16)
    # without skipping, the first bad item stops the run with its file name
    strict = build_pretrain_dataset(datalist, num_slices=8, spatial_size=(16, 16))
    with pytest.raises(BadInputError, match=r"nan\.nii\.gz: image holds 2 NaN/Inf"):
        list(build_pretrain_loader(strict, volumes_per_batch=5, shuffle=False, drop_last=False))


def test_volume_smaller_than_the_crop_is_padded(tmp_path):
    # 5 slices of 10 x 12 for S=8 slices of 16 x 16: slices are zero-padded at the end, the plane is resized
    path = _nifti(tmp_path / "small.nii.gz", np.random.default_rng(0).random((10, 12, 5)))
    dataset = build_pretrain_dataset([{"image": str(path), "dims": 3, "modality": "MR"}], num_slices=8,
                                     spatial_size=(16, 16))  # fmt: skip
    item = dataset[0]
    assert item["num_slices"] == 5
    for view in item["views"]:
        assert view.shape == (1, 8, 16, 16)
        assert torch.count_nonzero(view[:, 5:]) == 0 and torch.count_nonzero(view[:, :5]) > 0


def test_mixed_series_files_given_by_hand_are_refused(pydicom_ct_series, pydicom_mr, tmp_path):
    files = sorted(str(p) for p in pydicom_ct_series.iterdir())
    shutil.copy(pydicom_mr, tmp_path / "mr.dcm")
    with pytest.raises(BadInputError, match="mixed series"):
        load_ssl_image([*files, str(tmp_path / "mr.dcm")], dims=3)


def test_a_batch_of_only_bad_items_is_empty_not_a_crash(tmp_path, good_volume):
    bad = [CASES[c][0](tmp_path, good_volume) for c in ("nan", "missing")]
    datalist = [{"image": str(p), "dims": 3, "modality": "MR"} for p in bad]
    dataset = build_pretrain_dataset(datalist, num_slices=4, spatial_size=(8, 8), skip_bad_inputs=True)
    (batch,) = list(build_pretrain_loader(dataset, volumes_per_batch=2, shuffle=False))
    assert all(value is None for key, value in batch.items() if key != "skipped_inputs")
    assert [Path(name).name for name, _ in batch["skipped_inputs"]] == ["nan.nii.gz", "does_not_exist.nii.gz"]
    guard = dataset.transform.transforms[0]
    assert [name.rsplit("/", 1)[1] for name, _ in guard.skipped.skipped] == [
        "nan.nii.gz",
        "does_not_exist.nii.gz",
    ]


@pytest.mark.parametrize("skip", [True, False])
def test_views_that_are_not_finite_after_the_transforms_are_a_bad_input(skip):
    _, random_part = build_pretrain_transforms(num_slices=4, spatial_size=(8, 8), skip_bad_inputs=skip)
    slices = torch.rand(1, 4, 8, 8)
    slices[0, 1, 2, 3] = float("inf")  # what a view transform or an overflowing scale could leave
    item = {"image": slices, "num_slices": 4, "index": 3, "source": "inf.nii.gz", "dims": 3}
    if not skip:
        with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps it; the datasets unwrap it
            random_part(item)
        assert (
            str(find_bad_input(info.value))
            == "inf.nii.gz: the views hold NaN/Inf values after the transforms"
        )
        return
    marker = random_part(item)  # skipped: the collate function drops it instead of stopping the run
    assert marker["index"] == 3 and "NaN/Inf" in marker["skipped"]
    batch = collate_joint_ssl([marker])
    assert batch["skipped_inputs"] == [("inf.nii.gz", marker["skipped"])]
    assert all(value is None for key, value in batch.items() if key != "skipped_inputs")
