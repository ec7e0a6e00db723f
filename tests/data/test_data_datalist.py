"""Datalist building on the real offline images, including the multi-file DICOM series."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from jointssl_monai.apps.datalist_command import build_datalist_command
from jointssl_monai.data import BadInputError, build_datalist, load_datalist, load_ssl_image


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, pydicom_ct_series, itk_t1, itk_pd_slice_png, itk_pd_3slices_mha,
                 itk_rat_lung_mha, pydicom_ct, nibabel_4d, nibabel_anatomical):  # fmt: skip
    root = tmp_path_factory.mktemp("mixed")
    shutil.copytree(pydicom_ct_series, root / "ct_series")
    (root / "mr").mkdir()
    for src in (itk_t1, nibabel_anatomical, nibabel_4d, itk_pd_3slices_mha):
        shutil.copy(src, root / "mr" / src.name)
    (root / "slices").mkdir()
    for src in (itk_pd_slice_png, itk_rat_lung_mha, pydicom_ct):
        shutil.copy(src, root / "slices" / src.name)
    (root / "slices" / "notes.txt").write_text("not an image")
    return root


def test_finds_volumes_images_and_series(mixed_folder):
    entries, summary = build_datalist([mixed_folder], modality_map={"mr/*": "MR"}, skip_bad_inputs=True,
                                      base_dir=mixed_folder)  # fmt: skip
    by_image = {e["image"] if isinstance(e["image"], str) else "series": e for e in entries}
    assert by_image["mr/KmeansTest_T1UCharRaw.nii.gz"] | {} == {
        "image": "mr/KmeansTest_T1UCharRaw.nii.gz", "dims": 3, "modality": "MR", "shape": [128, 128, 62]
    }  # fmt: skip
    assert by_image["mr/BrainProtonDensity3Slices.mha"]["dims"] == 3
    assert by_image["slices/BrainProtonDensitySlice.png"]["dims"] == 2
    assert by_image["slices/RatLungSlice1.mha"]["dims"] == 2
    ct = by_image["slices/CT_small.dcm"]
    assert (ct["dims"], ct["modality"], ct["shape"]) == (2, "CT", [128, 128])
    # the 5-file CT series is one volume, ordered along the slice normal (ImagePositionPatient z ascending)
    series = by_image["series"]
    assert (series["dims"], series["modality"], series["shape"]) == (3, "CT", [16, 16, 5])
    z = [float(pydicom.dcmread(mixed_folder / f).ImagePositionPatient[2]) for f in series["image"]]
    assert z == sorted(z) and len(set(z)) == 5
    # the 4D fMRI series is refused with its reason; the text file is ignored, not an error
    skipped = summary.skipped.skipped
    assert [(name.endswith("example4d.nii.gz"), "wrong dimensionality" in why) for name, why in skipped] == [
        (True, True)
    ]
    assert any(name.endswith("notes.txt") for name, _ in summary.ignored)
    assert (summary.volumes, summary.images) == (4, 3)


def test_bad_input_stops_without_skip(mixed_folder):
    with pytest.raises(BadInputError, match=r"example4d\.nii\.gz: wrong dimensionality"):
        build_datalist([mixed_folder])


def test_written_datalist_is_deterministic_relative_and_loads(mixed_folder, tmp_path, capsys):
    out1, out2 = tmp_path / "a" / "datalist.json", tmp_path / "b" / "datalist.json"
    text = build_datalist_command(str(mixed_folder), output=str(out1))
    build_datalist_command(str(mixed_folder), output=str(out2))
    assert "example4d.nii.gz" in text and "skipped" in capsys.readouterr().out
    first, second = json.loads(out1.read_text()), json.loads(out2.read_text())
    assert first == second  # same folder, same datalist, byte for byte
    assert not any(str(e["image"]).startswith("/") for e in first["training"])
    loaded = load_datalist(out1)
    series = next(e for e in loaded if isinstance(e["image"], list))
    assert all((mixed_folder / "ct_series").samefile(p.rsplit("/", 1)[0]) for p in series["image"])


def _copy_series(src, dst):
    shutil.copytree(src, dst)
    return sorted(dst.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def test_missing_slice_is_an_incomplete_series(pydicom_ct_series, tmp_path):
    files = _copy_series(pydicom_ct_series, tmp_path / "s")
    files[2].unlink()
    with pytest.raises(BadInputError, match=r"incomplete series: step of 5\.000 mm"):
        build_datalist([tmp_path / "s"])
    entries, summary = build_datalist([tmp_path / "s"], skip_bad_inputs=True)
    assert entries == [] and len(summary.skipped) == 4  # every file of the series listed with the reason


def test_a_series_given_by_hand_must_be_whole_and_in_slice_order(pydicom_ct_series, tmp_path):
    files = [str(f) for f in _copy_series(pydicom_ct_series, tmp_path / "s")]
    assert load_ssl_image(files, dims=3).shape[-1] == len(files)
    with pytest.raises(
        BadInputError, match=r"incomplete series: step of 5\.000 mm after .* slice is missing"
    ):
        load_ssl_image(files[:2] + files[3:], dims=3)  # a datalist entry that lost a file
    with pytest.raises(BadInputError, match=r"not in slice order"):
        load_ssl_image([files[1], files[0], *files[2:]], dims=3)


def test_different_rows_is_a_mixed_series(pydicom_ct_series, tmp_path):
    files = _copy_series(pydicom_ct_series, tmp_path / "s")
    ds = pydicom.dcmread(files[1])
    ds.Rows, ds.Columns = 8, 32
    ds.save_as(files[1])
    with pytest.raises(BadInputError, match=r"mixed series: slices have different Rows x Columns"):
        build_datalist([tmp_path / "s"])


def test_instance_number_orders_when_positions_are_missing(pydicom_ct_series, tmp_path):
    files = _copy_series(pydicom_ct_series, tmp_path / "s")
    numbers = []
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.InstanceNumber = 10 - i  # reverse of the spatial order
        numbers.append(10 - i)
        ds.save_as(f)
    (entry,), _ = build_datalist([tmp_path / "s"])
    got = [int(pydicom.dcmread(p).InstanceNumber) for p in entry["image"]]
    assert got == sorted(numbers) and np.all(np.diff(got) > 0)


def test_cli_datalist_command(pydicom_ct_series, tmp_path, capsys):
    from jointssl_monai.apps.cli import JointSSLCommands

    out = tmp_path / "out" / "datalist.json"
    JointSSLCommands().datalist(str(pydicom_ct_series), output=str(out), modality_map={"*": "MR"})
    (entry,) = json.loads(out.read_text())["training"]
    assert entry["modality"] == "CT"  # the DICOM tag wins over the mapping for non-DICOM files
    assert len(entry["image"]) == 5 and all(p.startswith("../") for p in entry["image"])
    assert "found 1 volume(s) and 0 2D image(s)" in capsys.readouterr().out


def test_invalid_number_of_frames_is_a_named_skip_not_a_crash(tmp_path):
    """pydicom's own badVR.dcm holds NumberOfFrames '1A': skipped with its reason, or refused by name."""
    source = Path(pydicom.__file__).parent / "data" / "test_files" / "badVR.dcm"
    shutil.copy(source, tmp_path / "badVR.dcm")
    entries, summary = build_datalist([tmp_path], skip_bad_inputs=True)
    assert entries == []
    assert "NumberOfFrames" in str(summary)
    with pytest.raises(BadInputError, match=r"badVR\.dcm.*NumberOfFrames"):
        build_datalist([tmp_path])


def test_label_maps_and_masks_are_told_apart_from_images_on_real_files(
    tmp_path, colin27_t1, colin27_aal, itk_t1, itk_t1_seg, itk_t1_slice_png
):
    """Atlases, segmentations and masks are not images to pretrain on: with ``skip_label_maps`` the scan
    leaves them out, naming each with its reason; the acquisitions stay."""
    import shutil

    import nibabel as nib
    import numpy as np

    folder = tmp_path / "mixed"
    folder.mkdir()
    for source in (colin27_t1, colin27_aal, itk_t1, itk_t1_seg, itk_t1_slice_png):
        shutil.copy(source, folder / source.name)
    brain = np.asarray(nib.load(str(colin27_t1)).dataobj)
    nib.save(nib.Nifti1Image((brain > 40).astype(np.uint8), np.eye(4)), str(folder / "mask.nii.gz"))
    every, _ = build_datalist([folder])
    images, summary = build_datalist([folder], skip_label_maps=True)
    names = lambda entries: sorted(Path(e["image"]).name for e in entries)  # noqa: E731
    assert len(every) == 6
    assert names(images) == sorted([colin27_t1.name, itk_t1.name, itk_t1_slice_png.name])
    reasons = {Path(name).name: reason for name, reason in summary.ignored}
    assert set(reasons) == {colin27_aal.name, itk_t1_seg.name, "mask.nii.gz"}
    assert reasons["mask.nii.gz"] == "label map or mask: only 2 distinct integer values"
    assert reasons[colin27_aal.name].startswith("label map: 117 integer values")
