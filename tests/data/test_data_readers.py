"""Reader normalisations, each pinned on a real file (see jointssl_monai.data.io)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from jointssl_monai.data import load_ssl_image


def test_png_comes_back_as_rows_by_columns(itk_pd_slice_png):
    # MONAI's PIL reader gives (columns, rows); the loader restores the picture as PIL shows it
    expected = np.asarray(Image.open(itk_pd_slice_png).convert("L"), dtype=np.float32)
    got = load_ssl_image(itk_pd_slice_png, dims=2)
    assert got.shape == (1, 217, 181) == (1, *expected.shape)
    np.testing.assert_array_equal(got[0].numpy(), expected)
    # ITK (the fallback without Pillow) reads this PNG as 3 RGB components: same grey picture
    np.testing.assert_array_equal(
        load_ssl_image(itk_pd_slice_png, dims=2, reader="ITKReader").numpy(), got.numpy()
    )


def test_dicom_slice_equals_rescaled_pixel_array(pydicom_ct):
    ds = pydicom.dcmread(pydicom_ct)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(load_ssl_image(pydicom_ct, dims=2)[0].numpy(), expected)


def test_itk_2d_dicom_singleton_axis_is_squeezed(pydicom_ct):
    default = load_ssl_image(pydicom_ct, dims=2)
    itk = load_ssl_image(pydicom_ct, dims=2, reader="ITKReader")  # ITK reads it as (128, 128, 1)
    assert itk.shape == default.shape == (1, 128, 128)
    np.testing.assert_array_equal(itk.numpy(), default.numpy())


def test_monochrome1_x_ray_is_inverted(pydicom_cr_x_ray):
    ds = pydicom.dcmread(pydicom_cr_x_ray)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    got = load_ssl_image(pydicom_cr_x_ray, dims=2)[0].numpy()[::8, ::8].ravel()
    raw = ds.pixel_array.astype(np.float32)[::8, ::8].ravel()
    itk = load_ssl_image(pydicom_cr_x_ray, dims=2, reader="ITKReader")[0].numpy()[::8, ::8].ravel()
    assert np.corrcoef(got, raw)[0, 1] == pytest.approx(-1.0, abs=1e-6)  # the stored values are inverted
    assert np.corrcoef(got, itk)[0, 1] == pytest.approx(1.0, abs=1e-6)  # and agree with ITK/GDCM's display


def test_dicom_series_slices_follow_the_datalist_order(pydicom_ct_series):
    files = sorted(
        pydicom_ct_series.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    volume = load_ssl_image([str(f) for f in files], dims=3)
    assert volume.shape == (1, 16, 16, 5)
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(
            volume[0, :, :, i].numpy().T, expected
        )  # (x, y) = pixel array transposed
    # the affine steps +2.5 mm between slices along the series normal
    assert float(volume.affine[2, 2]) == pytest.approx(2.5, abs=1e-4)


def test_nifti_volume_keeps_its_affine(itk_t1):
    volume = load_ssl_image(itk_t1, dims=3)
    assert volume.shape == (1, 128, 128, 62)
    assert np.allclose(np.linalg.norm(volume.affine.numpy()[:3, :3], axis=0), [2, 2, 3])  # spacing in mm
