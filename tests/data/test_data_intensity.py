"""Per-modality intensity scaling against values computed by hand: CT by a fixed Hounsfield window, the other
modalities by their own percentiles, both clamped to [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jointssl_monai.data import BadInputError, ScaleIntensityByModalityd


def test_ct_uses_the_fixed_hounsfield_window_and_clamps():
    hu = torch.tensor([[-3000.0, -1000.0, -500.0, 0.0, 400.0, 1000.0, 3000.0]])
    out = ScaleIntensityByModalityd(ct_window=(-1000.0, 1000.0))({"image": hu, "modality": "ct"})["image"]
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.0, 0.25, 0.5, 0.7, 1.0, 1.0]]))
    # the window, not the image's own range: the same values scaled by 10 are not rescaled back
    out10 = ScaleIntensityByModalityd()({"image": hu / 10, "modality": "CT"})["image"]
    torch.testing.assert_close(out10, (hu / 10 + 1000) / 2000)


def test_other_modalities_use_their_percentiles_and_clamp():
    gen = torch.Generator().manual_seed(0)
    mr = torch.rand(1, 20, 20, 5, generator=gen) * 900 + 100
    mr[0, 0, 0, 0], mr[0, 1, 1, 1] = 1e5, -1e5  # outliers beyond the 1st/99th percentiles
    out = ScaleIntensityByModalityd(percentiles=(1.0, 99.0))({"image": mr, "modality": "MR"})["image"]
    low, high = np.percentile(mr.numpy(), [1.0, 99.0])
    expected = np.clip((mr.numpy() - low) / (high - low), 0.0, 1.0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    clamped = float(((out == 0) | (out == 1)).float().mean())
    assert 0.01 <= clamped <= 0.03  # about 1 % below the 1st and 1 % above the 99th percentile


def test_an_almost_constant_image_is_refused_by_name():
    with pytest.raises(BadInputError, match="no intensity range"):
        ScaleIntensityByModalityd()({"image": torch.ones(1, 4, 4, 4), "modality": "MR", "source": "flat.nii"})


def test_finite_extreme_values_give_finite_output():
    """A valid float32 volume whose values reach +/-3e38: the statistics must not overflow to inf/NaN."""
    gen = torch.Generator().manual_seed(0)
    img = torch.rand(1, 10, 10, 10, generator=gen)
    img[0, 0, 0, :5], img[0, 1, 1, :5] = 3e38, -3e38
    for percentiles in ((0.5, 99.5), (0.0, 100.0)):
        out = ScaleIntensityByModalityd(percentiles=percentiles)({"image": img, "modality": "MR"})["image"]
        assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # with the full range, the ordinary voxels sit at the middle, distinguishable only in float64
    assert float(out[0, 5, 5, 5]) == pytest.approx(0.5, abs=1e-6)


def test_scaling_equals_monais_own_transforms():
    """What MONAI computes for the same rule: a clipped fixed window for CT, clipped percentiles otherwise."""
    from monai.transforms import ScaleIntensityRange, ScaleIntensityRangePercentiles

    gen = torch.Generator().manual_seed(1)
    img = torch.randn(1, 16, 16, 8, generator=gen) * 600
    ct = ScaleIntensityByModalityd(ct_window=(-1000.0, 1000.0))({"image": img, "modality": "CT"})["image"]
    reference = ScaleIntensityRange(a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True)(img)
    torch.testing.assert_close(ct, torch.as_tensor(reference), rtol=1e-6, atol=1e-6)
    mr = ScaleIntensityByModalityd(percentiles=(0.5, 99.5))({"image": img, "modality": "MR"})["image"]
    reference = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(img)
    torch.testing.assert_close(mr, torch.as_tensor(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("entry", "name"), [({"source": "flat.nii"}, "flat.nii"), ({}, "image")])
def test_a_flat_image_is_named_by_its_source_or_else_its_key(entry: dict, name: str) -> None:
    """The error names the item's ``source`` (the file) and, without one, the image key."""
    item = {"image": torch.ones(1, 4, 4, 4), "modality": "MR", **entry}
    with pytest.raises(BadInputError, match=rf"^{name}: no intensity range .*\(almost constant image\)$"):
        ScaleIntensityByModalityd()(item)


def test_window_and_percentile_rules_at_their_boundaries() -> None:
    """A window needs low < high, percentiles 0 <= low < high <= 100; the error names both settings."""
    ScaleIntensityByModalityd(ct_window=(0.0, 1e-3), percentiles=(0.0, 100.0))
    ScaleIntensityByModalityd(percentiles=(50.0, 50.001))
    bad = [
        {"ct_window": (1.0, 1.0)},
        {"ct_window": (1.0, 0.0)},
        {"percentiles": (50.0, 50.0)},
        {"percentiles": (0.0, 100.5)},
        {"percentiles": (-0.5, 100.0)},
    ]
    for kwargs in bad:
        with pytest.raises(ValueError, match=r"invalid ct_window .* or percentiles"):
            ScaleIntensityByModalityd(**kwargs)


def test_a_missing_image_key_is_an_error_unless_allowed() -> None:
    """MONAI's ``allow_missing_keys`` contract: off by default (KeyError), on when asked."""
    with pytest.raises(KeyError):
        ScaleIntensityByModalityd()({"modality": "CT"})
    assert ScaleIntensityByModalityd(allow_missing_keys=True)({"modality": "CT"}) == {"modality": "CT"}


def test_an_item_without_modality_has_the_empty_modality() -> None:
    """No modality entry is the modality ``""``: it matches a window modality ``""`` and nothing else."""
    hu = torch.tensor([[-1000.0, 0.0, 500.0, 1000.0]])
    out = ScaleIntensityByModalityd(window_modalities=("",))({"image": hu})["image"]
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.5, 0.75, 1.0]]))
    by_percentiles = ScaleIntensityByModalityd(percentiles=(0.0, 100.0))({"image": hu / 10})["image"]
    torch.testing.assert_close(by_percentiles, (hu / 10 + 100) / 200)  # the image's own range


def test_floating_images_keep_their_dtype_and_integer_images_become_float32() -> None:
    """Scaled values are fractions: an int16 CT becomes float32, float64 stays float64."""
    hu = torch.tensor([[-1000, -500, 0, 200, 1000]], dtype=torch.int16)
    out = ScaleIntensityByModalityd()({"image": hu, "modality": "CT"})["image"]
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[0.0, 0.25, 0.5, 0.6, 1.0]]))
    out64 = ScaleIntensityByModalityd()({"image": hu.double(), "modality": "CT"})["image"]
    assert out64.dtype == torch.float64
    torch.testing.assert_close(out64, out.double())
