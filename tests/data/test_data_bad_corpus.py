"""A bad-input corpus generated into ``tmp_path``: every case either loads deliberately (with its values
checked) or is refused with a :class:`BadInputError` naming the input and the problem; none hangs or crashes.

Complements ``test_data_bad_inputs.py`` (truncated gzip, garbage, absurd headers, NaN/Inf, constant, 4D,
missing files, DICOM without pixels / lying / truncated).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from jointssl_monai.data import (
    BadInputError,
    build_datalist,
    load_datalist,
    load_ssl_image,
    pretrain_datalist,
)

RNG = np.random.default_rng(0)


def _nifti(path: Path, array, affine=None, dtype=None) -> Path:
    image = nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine, dtype=dtype)
    nib.save(image, str(path))
    return path


def _ct_slice(path: Path, position: float | None = None, rows: int | None = None) -> Path:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm", download=False))
    if position is not None:
        ds.ImagePositionPatient = [0.0, 0.0, float(position)]
        ds.InstanceNumber = int(position) + 1
    if rows is not None:  # a smaller image: keep the pixel bytes consistent with the header
        ds.PixelData = ds.pixel_array[:rows].tobytes()
        ds.Rows = rows
    ds.save_as(path)
    return path


# ---- single files given to the loader: refused with a message naming the file ------------------------------


def _fake_gzip(d: Path) -> Path:
    plain = _nifti(d / "plain.nii", RNG.random((8, 8, 4)).astype(np.float32))
    return Path(shutil.move(plain, d / "fake.nii.gz"))


def _zero_bytes(suffix: str):
    def make(d: Path) -> Path:
        path = d / f"empty{suffix}"
        path.touch()
        return path

    return make


def _zero_pixdim(d: Path) -> Path:
    """Zero voxel sizes and no sform/qform, written byte by byte (nibabel would fix pixdim when saving)."""
    image = nib.Nifti1Image(RNG.random((8, 8, 4)).astype(np.float32), None)
    image.header.set_sform(None, code=0)
    image.header.set_qform(None, code=0)
    nib.save(image, str(d / "zero_pixdim.nii"))
    data = bytearray((d / "zero_pixdim.nii").read_bytes())
    data[80:92] = struct.pack("<3f", 0, 0, 0)  # pixdim[1:4] of the NIfTI-1 header
    (d / "zero_pixdim.nii").write_bytes(bytes(data))
    return d / "zero_pixdim.nii"


def _zero_affine(d: Path) -> Path:
    image = nib.Nifti1Image(RNG.random((8, 8, 4)).astype(np.float32), None)
    image.header.set_qform(None, code=0)
    image.header.set_sform(np.zeros((4, 4)), code=2)  # an sform (which wins) of all zeros
    nib.save(image, str(d / "zero_affine.nii.gz"))
    return d / "zero_affine.nii.gz"


def _complex(d: Path) -> Path:
    return _nifti(d / "complex.nii.gz", (RNG.random((8, 8, 4)) + 1j).astype(np.complex64))


def _one_pixel_png(d: Path) -> Path:
    Image.fromarray(np.array([[200]], np.uint8)).save(d / "one_pixel.png")
    return d / "one_pixel.png"


def _one_voxel_volume(d: Path) -> Path:
    return _nifti(d / "one_voxel.nii.gz", np.ones((1, 1, 1), np.float32))


def _truncated_jpeg(d: Path) -> Path:
    Image.fromarray((RNG.random((64, 48)) * 255).astype(np.uint8)).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    return d / "truncated.jpg"


def _detached_header(suffix: str, text: str):
    def make(d: Path) -> Path:
        path = d / f"volume{suffix}"
        path.write_text(text)
        return path

    return make


_NHDR = (
    "NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 4\nencoding: raw\nendian: little\ndata file: gone.raw\n"
)
_MHD = (
    "ObjectType = Image\nNDims = 3\nDimSize = 8 8 4\nElementType = MET_FLOAT\n"
    "ElementByteOrderMSB = False\nElementDataFile = gone.raw\n"
)


def _analyze_without_img(d: Path) -> Path:
    nib.save(nib.AnalyzeImage(RNG.random((8, 8, 4)).astype(np.float32), np.eye(4)), str(d / "pair.hdr"))
    (d / "pair.img").unlink()
    return d / "pair.hdr"


def _folder(d: Path) -> Path:
    (d / "folder.nii.gz").mkdir()
    return d / "folder.nii.gz"


def _symlink_loop(d: Path) -> Path:
    os.symlink(d / "loop_b.nii.gz", d / "loop_a.nii.gz")
    os.symlink(d / "loop_a.nii.gz", d / "loop_b.nii.gz")
    return d / "loop_a.nii.gz"


def _dangling_symlink(d: Path) -> Path:
    os.symlink(d / "nowhere.nii.gz", d / "dangling.nii.gz")
    return d / "dangling.nii.gz"


def _series_of_two_sizes(d: Path) -> list[Path]:
    return [_ct_slice(d / "s0.dcm", 0), _ct_slice(d / "s1.dcm", 1, rows=64)]


REFUSED = {
    "fake_gzip": (_fake_gzip, 3, r"named \.gz but is not gzip-compressed"),
    "zero_bytes_nifti": (_zero_bytes(".nii"), 3, r"empty file \(0 bytes\)"),
    "zero_bytes_png": (_zero_bytes(".png"), 2, r"empty file \(0 bytes\)"),
    "zero_bytes_dicom": (_zero_bytes(".dcm"), 2, r"empty file \(0 bytes\)"),
    "zero_bytes_mha": (_zero_bytes(".mha"), 3, r"empty file \(0 bytes\)"),
    "zero_affine": (_zero_affine, 3, r"singular affine"),
    "complex64": (_complex, 3, r"pixel type complex64.*not supported"),
    "one_pixel_png": (_one_pixel_png, 2, r"image of shape \(1, 1\) is too small"),
    "one_voxel_volume": (_one_voxel_volume, 3, r"too small|single slice"),
    "truncated_jpeg": (_truncated_jpeg, 2, r"unreadable image.*truncated"),
    "nrrd_missing_raw": (_detached_header(".nhdr", _NHDR), 3, r"data file .*gone\.raw does not exist"),
    "mhd_missing_raw": (_detached_header(".mhd", _MHD), 3, r"data file .*gone\.raw does not exist"),
    "analyze_missing_img": (_analyze_without_img, 3, r"data file .*pair\.img does not exist"),
    "directory": (_folder, 3, r"is a folder, not an image file"),
    "symlink_loop": (_symlink_loop, 3, r"symbolic link loop"),
    "dangling_symlink": (_dangling_symlink, 3, r"broken symbolic link"),
    "dicom_series_two_sizes": (_series_of_two_sizes, 3, r"mixed series: .*s1\.dcm has shape"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_loader_refuses_bad_file_naming_it(case, tmp_path):
    make, dims, pattern = REFUSED[case]
    image = make(tmp_path)
    with pytest.raises(BadInputError, match=pattern) as info:
        load_ssl_image([str(p) for p in image] if isinstance(image, list) else image, dims=dims)
    named = image[0].parent if isinstance(image, list) else image
    assert str(named) in str(info.value)


def test_skip_lists_every_refused_file_of_a_folder(tmp_path):
    """The same files met by a folder scan with ``skip_bad_inputs``: each is skipped with its reason."""
    for case in ("fake_gzip", "zero_bytes_nifti", "zero_bytes_png", "zero_affine", "complex64", "directory",
                 "symlink_loop", "dangling_symlink", "nrrd_missing_raw", "mhd_missing_raw"):  # fmt: skip
        REFUSED[case][0](tmp_path)
    _nifti(tmp_path / "good.nii.gz", RNG.random((8, 8, 4)).astype(np.float32))
    entries, summary = build_datalist([tmp_path], skip_bad_inputs=True)
    reasons = {Path(name).name: why for name, why in summary.skipped.skipped}
    assert [Path(e["image"]).name for e in entries] == ["good.nii.gz"]
    assert "not gzip-compressed" in reasons["fake.nii.gz"]
    assert "empty file" in reasons["empty.nii"] and "empty file" in reasons["empty.png"]
    assert "singular affine" in reasons["zero_affine.nii.gz"]
    assert "complex64" in reasons["complex.nii.gz"]
    assert "symbolic link loop" in reasons["loop_a.nii.gz"] and "broken" in reasons["dangling.nii.gz"]
    assert "gone.raw" in reasons["volume.nhdr"] and "gone.raw" in reasons["volume.mhd"]
    assert "folder.nii.gz" not in reasons  # a folder is scanned (it is empty), not read as an image
    assert len(summary.skipped) == 10  # 9 cases, the link loop being two files


def test_folder_scan_does_not_follow_a_directory_symlink_loop(tmp_path):
    (tmp_path / "a").mkdir()
    os.symlink(tmp_path / "a", tmp_path / "a" / "back")  # a/back -> a: following it never ends
    _nifti(tmp_path / "a" / "good.nii.gz", RNG.random((8, 8, 4)).astype(np.float32))
    entries, _ = build_datalist([tmp_path])
    assert [Path(e["image"]).name for e in entries] == ["good.nii.gz"]


def test_zero_voxel_sizes_without_sform_or_qform_are_read_as_one_millimetre(tmp_path, caplog):
    """nibabel replaces a zero ``pixdim`` by 1 (and logs it) when no sform/qform overrides it: the volume is
    usable, with unit voxels, unlike a zero sform (refused above as a singular affine)."""
    path = _zero_pixdim(tmp_path)
    assert np.all(np.frombuffer(path.read_bytes()[80:92], "<f4") == 0)
    volume = load_ssl_image(path, dims=3)
    np.testing.assert_allclose(np.abs(np.diag(volume.affine.numpy()))[:3], 1.0)


# ---- odd pixel types that are accepted, each read deliberately ---------------------------------------------


def test_rgb_and_rgba_png_become_the_mean_of_red_green_blue(tmp_path):
    rgb = (RNG.random((20, 16, 3)) * 255).astype(np.uint8)
    alpha = np.full((20, 16, 1), 17, np.uint8)  # the alpha channel is ignored
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.concatenate([rgb, alpha], -1)).save(tmp_path / "rgba.png")
    expected = rgb.astype(np.float32).mean(-1)
    for name in ("rgb.png", "rgba.png"):
        image = load_ssl_image(tmp_path / name, dims=2)
        assert image.shape == (1, 16, 20)  # (columns, rows): MONAI's reader order
        np.testing.assert_allclose(image[0].numpy(), expected.T, rtol=0, atol=1e-4)


def test_16_bit_png_is_read_faithfully(tmp_path):
    values = RNG.integers(0, 65535, (20, 16)).astype(np.uint16)
    values[0, 0], values[-1, -1] = 0, 65535
    Image.fromarray(values).save(tmp_path / "sixteen.png")
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    image = load_ssl_image(tmp_path / "sixteen.png", dims=2)
    np.testing.assert_array_equal(image[0].numpy(), values.astype(np.float32).T)  # (columns, rows)


def test_one_bit_png_reads_as_zero_and_one(tmp_path):
    mask = RNG.random((20, 16)) > 0.5
    Image.fromarray(mask).save(tmp_path / "bits.png")
    assert Image.open(tmp_path / "bits.png").mode == "1"
    image = load_ssl_image(tmp_path / "bits.png", dims=2)
    np.testing.assert_array_equal(image[0].numpy(), mask.astype(np.float32).T)  # (columns, rows)


@pytest.mark.parametrize("dtype", [np.int64, np.uint16, np.int8, np.float64])
def test_integer_and_double_volumes_are_read_exactly(dtype, tmp_path):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    low, high = (max(int(info.min), -(2**24)), min(int(info.max), 2**24)) if info else (-1e3, 1e3)
    values = RNG.uniform(low, high, (8, 8, 4)).astype(dtype)
    path = _nifti(tmp_path / "typed.nii.gz", values, dtype=dtype)
    assert nib.load(path).get_data_dtype() == np.dtype(dtype)
    volume = load_ssl_image(path, dims=3)
    np.testing.assert_array_equal(volume[0].numpy(), values.astype(np.float32))


# ---- DICOM series met by a folder scan ---------------------------------------------------------------------


def _series_missing_slice(d: Path) -> None:
    for position in (0, 1, 2, 4, 5):  # slice 3 is missing
        _ct_slice(d / f"slice{position}.dcm", position)


def _series_repeated_slice(d: Path) -> None:
    for position in (0, 1, 2):
        _ct_slice(d / f"slice{position}.dcm", position)
    _ct_slice(d / "again.dcm", 1)


def _series_two_sizes_scanned(d: Path) -> None:
    _series_of_two_sizes(d)


SERIES = {
    "missing_slice": (_series_missing_slice, r"incomplete series: step of 2\.000 mm after slice2\.dcm"),
    "repeated_slice": (_series_repeated_slice, r"mixed series: .*again\.dcm.* share slice position"),
    "two_sizes": (_series_two_sizes_scanned, r"mixed series: slices have different Rows x Columns"),
}


@pytest.mark.parametrize("case", sorted(SERIES))
def test_broken_series_is_refused_or_skipped_as_a_whole(case, tmp_path):
    make, pattern = SERIES[case]
    make(tmp_path)
    with pytest.raises(BadInputError, match=pattern) as info:
        build_datalist([tmp_path])
    assert f"DICOM series of {len(list(tmp_path.iterdir()))} files in {tmp_path}" in str(info.value)
    entries, summary = build_datalist([tmp_path], skip_bad_inputs=True)
    assert entries == [] and len(summary.skipped) == len(list(tmp_path.iterdir()))


# ---- datalist files ----------------------------------------------------------------------------------------


def _write(d: Path, content) -> Path:
    path = d / "datalist.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _good_entry(d: Path, name: str = "good.nii.gz") -> dict:
    _nifti(d / name, RNG.random((8, 8, 4)).astype(np.float32))
    return {"image": name, "dims": 3, "modality": "MR"}


def _dl_missing_path(d):
    return {"training": [_good_entry(d), {"image": "sub/absent.nii.gz", "dims": 3}]}


def _dl_directory(d):
    (d / "scans").mkdir()
    return {"training": [_good_entry(d), {"image": "scans", "dims": 3}]}


def _dl_symlink_loop(d):
    _symlink_loop(d)
    return {"training": [_good_entry(d), {"image": "loop_a.nii.gz", "dims": 3}]}


def _dl_duplicate(d):
    return {"training": [_good_entry(d), {"image": "./good.nii.gz", "dims": 3}]}


def _dl_no_image(d):
    return {"training": [_good_entry(d), {"dims": 3, "modality": "CT"}]}


def _dl_no_dims(d):
    return {"training": [_good_entry(d), {"image": "good.nii.gz"}]}


def _dl_dims_text(d):
    return {"training": [_good_entry(d), {"image": "good.nii.gz", "dims": "three"}]}


def _dl_image_number(d):
    return {"training": [_good_entry(d), {"image": 5, "dims": 3}]}


def _dl_series_with_number(d):
    return {"training": [_good_entry(d), {"image": ["good.nii.gz", None], "dims": 3}]}


def _dl_entry_not_object(d):
    return {"training": [_good_entry(d), "good.nii.gz"]}


def _dl_top_level_list(d):
    return [_good_entry(d)]


def _dl_no_key(d):
    return {"validation": [_good_entry(d)]}


def _dl_key_not_list(d):
    return {"training": _good_entry(d)}


def _dl_invalid_json(d):
    return '{"training": [{"image": "good.nii.gz", "dims": 3},]}'


def _dl_empty(d):
    return {"training": []}


def _dl_modality_number(d):
    return {"training": [{**_good_entry(d), "modality": 7}]}


DATALISTS = {
    "missing_path": (_dl_missing_path, r"entry 1: image .*sub/absent\.nii\.gz does not exist"),
    "directory": (_dl_directory, r"entry 1: image .*scans is a folder"),
    "symlink_loop": (_dl_symlink_loop, r"entry 1: image .*loop_a\.nii\.gz is a symbolic link loop"),
    "duplicate": (_dl_duplicate, r"entry 1: image .*good\.nii\.gz is listed again \(entry 0\)"),
    "no_image": (_dl_no_image, r"entry 1: missing key 'image'"),
    "no_dims": (_dl_no_dims, r"entry 1: missing key 'dims'"),
    "dims_text": (_dl_dims_text, r"entry 1: 'dims' must be 2 or 3, got 'three'"),
    "image_number": (_dl_image_number, r"entry 1: 'image' must be a path or a list of paths, got int 5"),
    "series_with_null": (_dl_series_with_number, r"entry 1: 'image' must be a path or a list of paths"),
    "entry_not_object": (_dl_entry_not_object, r"entry 1: expected an object .*got str"),
    "top_level_list": (_dl_top_level_list, r"expected a JSON object with a 'training' list, got a list"),
    "no_key": (_dl_no_key, r"has no 'training' list \(keys: validation\)"),
    "key_not_list": (_dl_key_not_list, r"'training' must be a list of entries, got dict"),
    "invalid_json": (_dl_invalid_json, r"not valid JSON \(line 1"),
    "empty": (_dl_empty, r"no pretraining image found"),
    "modality_number": (_dl_modality_number, r"entry 0: 'modality' must be a string, got int 7"),
}

#: Cases where the datalist is readable and only some entries are bad: ``skip_bad_inputs`` keeps the rest.
SKIPPABLE = {"missing_path", "directory", "symlink_loop", "duplicate", "no_image", "no_dims", "dims_text",
             "image_number", "series_with_null", "entry_not_object"}  # fmt: skip


@pytest.mark.parametrize("case", sorted(DATALISTS))
def test_bad_datalist_is_refused_naming_the_file_and_entry(case, tmp_path):
    make, pattern = DATALISTS[case]
    path = _write(tmp_path, make(tmp_path))
    with pytest.raises(BadInputError, match=pattern) as info:
        pretrain_datalist(str(path))
    assert str(path) in str(info.value)
    if case in SKIPPABLE:
        entries = pretrain_datalist(str(path), skip_bad_inputs=True)
        assert [Path(e["image"]).name for e in entries] == ["good.nii.gz"]
        assert Path(entries[0]["image"]).is_absolute()


def test_skipped_datalist_entries_are_logged_and_counted(tmp_path, caplog):
    entries = [_good_entry(tmp_path), {"image": "absent.nii.gz", "dims": 3}, {"image": 5, "dims": 3}]
    path = _write(tmp_path, {"training": entries})
    with caplog.at_level("WARNING"):
        kept = load_datalist(path, skip_bad_inputs=True)
    assert len(kept) == 1
    assert "2 datalist entr" in caplog.text and "absent.nii.gz does not exist" in caplog.text


def test_paths_upward_of_the_datalist_folder_are_allowed(tmp_path):
    """MONAI datalists often point outside their folder (``../images/x.nii.gz``): resolved and accepted."""
    (tmp_path / "images").mkdir()
    (tmp_path / "lists").mkdir()
    _nifti(tmp_path / "images" / "x.nii.gz", RNG.random((8, 8, 4)).astype(np.float32))
    path = _write(tmp_path / "lists", {"training": [{"image": "../images/x.nii.gz", "dims": 3}]})
    (entry,) = load_datalist(path)
    assert entry["image"] == str(tmp_path / "images" / "x.nii.gz")  # normalised: no '..' left
