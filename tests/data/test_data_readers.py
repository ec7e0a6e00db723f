"""Reader normalisations, each pinned on a real file (see jointssl_monai.data.io).

2D images come out in MONAI's reader order ``(1, columns, rows)``, the transpose of the picture array of
PIL/pydicom, whatever the reader, exactly as ``LoadImage`` + ``EnsureChannelFirst`` give them to fine-tuning.
"""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage
from PIL import Image

from jointssl_monai.data import load_ssl_image


def _monai(path, reader=None) -> np.ndarray:
    """What a MONAI fine-tuning pipeline gets: LoadImage + EnsureChannelFirst."""
    kwargs = {"reader": reader} if reader else {}
    return np.asarray(LoadImage(image_only=True, ensure_channel_first=True, **kwargs)(str(path)))


def test_png_comes_back_in_monai_reader_order(itk_pd_slice_png):
    # the picture is 181 columns wide and 217 rows high; MONAI's PIL reader gives (columns, rows), kept as is
    picture = np.asarray(Image.open(itk_pd_slice_png).convert("L"), dtype=np.float32)
    assert picture.shape == (217, 181)
    got = load_ssl_image(itk_pd_slice_png, dims=2)
    assert got.shape == (1, 181, 217)
    np.testing.assert_array_equal(got[0].numpy(), picture.T)
    np.testing.assert_array_equal(got.numpy(), _monai(itk_pd_slice_png))
    # ITK (the fallback without Pillow) reads this PNG as 3 RGB components: same grey picture
    np.testing.assert_array_equal(
        load_ssl_image(itk_pd_slice_png, dims=2, reader="ITKReader").numpy(), got.numpy()
    )


def test_dicom_slice_equals_rescaled_pixel_array_in_monai_order(pydicom_ct):
    ds = pydicom.dcmread(pydicom_ct)
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    got = load_ssl_image(pydicom_ct, dims=2)
    np.testing.assert_array_equal(got[0].numpy(), expected.T)  # (columns, rows)
    np.testing.assert_array_equal(got.numpy(), _monai(pydicom_ct, "PydicomReader"))


def test_itk_2d_dicom_singleton_axis_is_squeezed(pydicom_ct):
    default = load_ssl_image(pydicom_ct, dims=2)
    itk = load_ssl_image(pydicom_ct, dims=2, reader="ITKReader")  # ITK reads it as (128, 128, 1)
    assert itk.shape == default.shape == (1, 128, 128)
    np.testing.assert_array_equal(itk.numpy(), default.numpy())


def test_monochrome1_x_ray_is_inverted(pydicom_cr_x_ray):
    ds = pydicom.dcmread(pydicom_cr_x_ray)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert (ds.Columns, ds.Rows) == (1841, 1955)
    got = load_ssl_image(pydicom_cr_x_ray, dims=2)
    itk = load_ssl_image(pydicom_cr_x_ray, dims=2, reader="ITKReader")
    assert got.shape == itk.shape == (1, 1841, 1955)  # (columns, rows) from both readers
    got = got[0].numpy()[::8, ::8].ravel()
    raw = ds.pixel_array.astype(np.float32).T[::8, ::8].ravel()
    itk = itk[0].numpy()[::8, ::8].ravel()
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
