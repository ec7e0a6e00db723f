"""The real offline images load through MONAI with their true shapes, spacings and labels.

If a reader breaks or a data package is missing, these fail loudly (under CI) instead of the rest of the suite
quietly training on nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import LoadImage

from jointssl_monai.apps.sample_data import SampleNotFoundError, find_sample


def load(path):
    image = LoadImage(image_only=True)(str(path))
    return image, np.asarray(image)


def test_colin27_t1_geometry(colin27_t1):
    image, array = load(colin27_t1)
    assert array.shape == (181, 217, 181)
    np.testing.assert_allclose(image.pixdim[:3], [1.0, 1.0, 1.0])
    assert array.max() > 100 and array.min() == 0


def test_colin27_brain_is_skull_stripped_t1(colin27_t1, colin27_brain):
    _, head = load(colin27_t1)
    _, brain = load(colin27_brain)
    assert brain.shape == head.shape
    brain_fraction = (brain > 0).mean()
    head_fraction = (head > 0).mean()
    # The brain is a strict, substantial part of the head.
    assert 0.1 < brain_fraction < head_fraction


def test_aal_atlas_has_116_regions(colin27_aal):
    _, atlas = load(colin27_aal)
    labels = np.unique(atlas)
    assert atlas.shape == (181, 217, 181)
    assert labels[0] == 0 and len(labels) == 117
    np.testing.assert_array_equal(labels, np.round(labels))


def test_itk_subject_t1_and_segmentation(itk_t1, itk_t1_seg, itk_t1_skullstrip):
    image, t1 = load(itk_t1)
    _, seg = load(itk_t1_seg)
    _, strip = load(itk_t1_skullstrip)
    assert t1.shape == seg.shape == strip.shape == (128, 128, 62)
    np.testing.assert_allclose(image.pixdim[:3], [2.0, 2.0, 3.0])
    np.testing.assert_array_equal(np.unique(seg), np.arange(7))
    assert set(np.unique(strip)) == {0, 4, 5, 6}


def test_itk_2d_slices(itk_pd_slice_png, itk_rat_lung_mha, itk_pd_3slices_mha):
    _, png = load(itk_pd_slice_png)
    assert sorted(png.shape) == [181, 217]
    _, lung = load(itk_rat_lung_mha)
    assert lung.shape == (128, 128)
    _, three = load(itk_pd_3slices_mha)
    assert three.shape == (181, 217, 3)


def test_pydicom_ct_and_mr(pydicom_ct, pydicom_mr):
    image, ct = load(pydicom_ct)
    assert ct.squeeze().shape == (128, 128)
    np.testing.assert_allclose(image.pixdim[:2], [0.661468, 0.661468], rtol=1e-5)
    _, mr = load(pydicom_mr)
    assert mr.squeeze().shape == (64, 64)


def test_pydicom_series_is_one_volume(pydicom_ct_series):
    files = sorted(p for p in pydicom_ct_series.iterdir() if p.is_file())
    assert len(files) == 5
    image, volume = load(pydicom_ct_series)
    assert volume.shape == (16, 16, 5)
    # Slice positions are 2.5 mm apart in this series.
    assert abs(float(image.pixdim[2]) - 2.5) < 1e-3


def test_pydicom_data_x_ray(pydicom_cr_x_ray):
    import pydicom

    dataset = pydicom.dcmread(pydicom_cr_x_ray, stop_before_pixels=True)
    assert dataset.Modality in {"CR", "DX"}
    _, xray = load(pydicom_cr_x_ray)
    assert xray.squeeze().ndim == 2


def test_nibabel_volumes(nibabel_anatomical, nibabel_4d):
    _, anat = load(nibabel_anatomical)
    assert anat.ndim == 3 and min(anat.shape) > 10
    _, series = load(nibabel_4d)
    assert series.ndim == 4 and series.shape[-1] > 1


def test_unknown_and_missing_samples_are_clear(monkeypatch):
    with pytest.raises(KeyError, match="unknown sample"):
        find_sample("no_such_image")
    from jointssl_monai.apps import sample_data

    monkeypatch.setattr(sample_data, "_debian_package_files", lambda package: ())
    with pytest.raises(SampleNotFoundError, match="apt-get install -y mricron-data"):
        find_sample("colin27_t1")
