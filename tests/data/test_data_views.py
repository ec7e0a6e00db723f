"""The two-view augmentations measured on images built to expose each transform: its range as documented,
its probability, and the contract of the views (plain float tensors, input dropped or kept, reproducible
seeding)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor

from jointssl_monai.data import ImageViewsd, VolumeViewsd


def _views(transform: str, image: torch.Tensor, count: int) -> list[torch.Tensor]:
    """``count`` views of ``image`` ``(1, S, H, W)`` by the one volume transform ``transform``."""
    make = VolumeViewsd(num_views=count, transforms=(transform,))
    return make({"image": image, "num_slices": image.shape[1]})["views"]


def _moments(plane: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Centroid and covariance of a non-negative plane, in pixels."""
    p = plane.double().clamp(min=0)
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in p.shape), indexing="ij")
    )
    mass = p.sum()
    mean = (grid * p).sum(dim=(1, 2)) / mass
    centred = grid - mean[:, None, None]
    cov = torch.einsum("ihw,jhw,hw->ij", centred, centred, p) / mass
    return mean.numpy(), cov.numpy()


def _blob(sigma: tuple[float, float], size: int = 64) -> torch.Tensor:
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.exp(
        -(axis[:, None] ** 2) / (2 * sigma[0] ** 2) - axis[None] ** 2 / (2 * sigma[1] ** 2)
    ).float()


def test_affine_views_rotate_up_to_15_degrees_scale_by_10_percent_and_shift_up_to_8_pixels():
    """Slice 0, a round blob, gives the per-axis scale and the shift; slice 1, an elongated blob, the
    rotation once the scale is divided out. Over many draws each parameter spans its documented range."""
    round_sigma = 4.0
    image = torch.stack([_blob((round_sigma, round_sigma)), _blob((6.0, 2.0))])[None]
    angles, scales, shifts = [], [], []
    for view in _views("affine", image, 80):
        centre, cov = _moments(view[0, 0])
        scale = round_sigma / np.sqrt(np.diag(cov))  # the output blob is the input one divided by the scale
        shifts.append((centre - 31.5) * scale)
        scales.append(scale)
        _, elongated = _moments(view[0, 1])
        unscaled = elongated * np.outer(scale, scale)
        major = np.linalg.eigh(unscaled)[1][:, -1]
        angle = math.degrees(math.atan2(major[1], major[0]))
        angles.append((angle + 90) % 180 - 90)
    angles, scales, shifts = np.abs(angles), np.asarray(scales), np.abs(shifts)
    assert angles.max() <= 15.3 and angles.max() >= 14.2, angles.max()
    assert scales.min() >= 0.9 - 0.01 and scales.max() <= 1.1 + 0.01
    assert scales.min() < 0.94 and scales.max() > 1.06
    assert (shifts.max(axis=0) <= 8.2).all() and (shifts.max(axis=0) >= 7.0).all(), shifts.max(axis=0)


def test_affine_views_pad_with_zeros():
    """What moves in from outside the image is zero, not a reflection of the image."""
    for view in _views("affine", torch.ones(1, 1, 32, 32), 10):
        assert float(view.min()) == 0.0 and float(view.max()) == pytest.approx(1.0, abs=1e-4)


def test_noise_views_add_gaussian_noise_of_std_up_to_0_05():
    image = torch.full((1, 4, 64, 64), 0.5)
    stds = []
    for view in _views("noise", image, 30):
        residual = view - image
        assert abs(float(residual.mean())) < 0.003
        stds.append(float(residual.std()))
    assert max(stds) <= 0.0505 and max(stds) > 0.045  # MONAI draws the std itself from [0, 0.05]


def _kernel_sigma(view: torch.Tensor) -> np.ndarray:
    """The standard deviation per in-plane axis of a blurred impulse (the sampled kernel adds 1/12)."""
    _, cov = _moments(view)
    return np.sqrt(np.diag(cov) - 1 / 12)


def test_blur_views_draw_each_axis_sigma_between_0_5_and_1_5():
    impulse = torch.zeros(1, 1, 33, 33)
    impulse[0, 0, 16, 16] = 1.0
    sigmas = np.array([_kernel_sigma(view[0, 0]) for view in _views("blur", impulse, 60)])
    assert sigmas.min() >= 0.47 and sigmas.max() <= 1.53, (sigmas.min(), sigmas.max())
    for axis in (0, 1):  # each axis drawn on its own over the whole range
        assert sigmas[:, axis].min() < 0.65 and sigmas[:, axis].max() > 1.35
    assert np.abs(sigmas[:, 0] - sigmas[:, 1]).max() > 0.3


def test_bias_field_views_multiply_by_exp_of_a_cubic_legendre_field_with_coefficients_in_0_2_to_0_4():
    """On a uniform image the log of a view is the field itself: a sum of products of Legendre polynomials
    (degrees i and j <= i <= 3) of the in-plane coordinates scaled to [-1, 1], with 10 coefficients drawn
    from [0.2, 0.4]."""
    h, w = 24, 20
    x, y = np.linspace(-1, 1, h), np.linspace(-1, 1, w)
    terms = [(i, j) for i in range(4) for j in range(i + 1)]  # MONAI's lower-triangular coefficients
    legendre = np.polynomial.legendre.legval
    basis = np.stack(
        [np.outer(legendre(x, np.eye(4)[i]), legendre(y, np.eye(4)[j])).ravel() for i, j in terms], axis=1
    )
    coefficients = []
    for view in _views("bias", torch.ones(1, 2, h, w), 10):
        torch.testing.assert_close(view[0, 0], view[0, 1])  # one field for every slice
        field = np.log(view[0, 0].double().numpy()).ravel()
        fit, *_ = np.linalg.lstsq(basis, field, rcond=None)
        assert np.abs(basis @ fit - field).max() < 1e-4
        coefficients.append(fit)
    coefficients = np.asarray(coefficients)
    assert coefficients.min() >= 0.2 - 1e-3 and coefficients.max() <= 0.4 + 1e-3
    assert coefficients.min() < 0.21 and coefficients.max() > 0.39


def _gamma(view: torch.Tensor, image: torch.Tensor) -> float:
    """The gamma of a contrast change of a ramp from 0 to 1: ``view = image ** gamma``."""
    inside = (image > 0.2) & (image < 0.8)
    return float((torch.log(view[inside]) / torch.log(image[inside])).double().median())


def _ramp(size: int = 16) -> torch.Tensor:
    return torch.linspace(0.0, 1.0, size * size).reshape(1, 1, size, size)


def test_gamma_views_draw_gamma_between_0_7_and_1_5():
    image = _ramp()
    gammas = np.array([_gamma(view, image) for view in _views("gamma", image, 60)])
    assert gammas.min() >= 0.7 - 1e-3 and gammas.max() <= 1.5 + 1e-3
    assert gammas.min() < 0.75 and gammas.max() > 1.45


def _rank(plane: torch.Tensor) -> int:
    singular = torch.linalg.svdvals(plane.double())
    return int((singular > 1e-5 * singular[0]).sum())


def test_low_resolution_views_keep_50_to_90_percent_of_the_resolution():
    """Down- then up-sampled, a random plane of 64 x 64 keeps the rank of its low-resolution copy:
    ``64 x zoom`` with the zoom drawn from [0.5, 0.9]."""
    image = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    ranks = np.array([_rank(view[0, 0]) for view in _views("lowres", image, 40)])
    assert ranks.min() >= 32 and ranks.max() <= 58, (ranks.min(), ranks.max())
    assert ranks.min() <= 36 and ranks.max() >= 54


def test_flip_views_always_flip_under_policy_one():
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    for view in _views("flip", image, 20):
        assert torch.equal(view, image.flip(2)) or torch.equal(view, image.flip(3))


@pytest.mark.parametrize("prob", [0.5, 0.2])
def test_compose_policy_applies_each_transform_with_its_probability(prob: float) -> None:
    """``compose`` (documented default ``prob=0.5``) flips a view with probability ``prob``."""
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    kwargs = {} if prob == 0.5 else {"prob": prob}
    make = VolumeViewsd(num_views=400, transforms=("flip",), policy="compose", **kwargs)
    views = make({"image": image, "num_slices": 1})["views"]
    flipped = np.mean([not torch.equal(view, image) for view in views])
    assert abs(flipped - prob) < 0.07, flipped


def test_volume_view_defaults_one_of_every_transform_per_view_and_the_input_dropped():
    """Defaults: the ``image`` key, 2 views by ``one`` transform each of the seven, input dropped, all
    slices valid when no count is given; views are plain float tensors."""
    make = VolumeViewsd()
    image = MetaTensor(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    out = make({"image": image})
    assert set(out) == {"views"} and len(out["views"]) == 2
    for view in out["views"]:
        assert type(view) is torch.Tensor and view.dtype == torch.float32 and view.shape == (1, 3, 8, 8)
        assert not torch.equal(view, image.as_tensor())  # every view is transformed
        assert torch.count_nonzero(view[:, 2]) > 0  # the last slice is valid, not reset
    kept = VolumeViewsd(keep_input=True)({"image": image, "num_slices": 2})
    assert torch.equal(kept["image"], image) and torch.count_nonzero(kept["views"][0][:, 2]) == 0


def test_fresh_view_transforms_are_seeded_with_zero():
    """A new instance draws as one seeded with 0, so two builds give the same views."""
    volume = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(0))
    image = volume[:, 0]
    for build, item in ((VolumeViewsd, {"image": volume}), (ImageViewsd, {"image": image})):
        kwargs = {"spatial_size": (8, 8)} if build is ImageViewsd else {}
        fresh = build(**kwargs)(dict(item))["views"]
        seeded = build(**kwargs).set_random_state(seed=0)(dict(item))["views"]
        assert all(torch.equal(a, b) for a, b in zip(fresh, seeded, strict=True))


def test_volume_view_argument_rules():
    VolumeViewsd(num_views=1, transforms=("noise",))
    with pytest.raises(ValueError, match=r"^need at least one view and one transform$"):
        VolumeViewsd(num_views=0)
    with pytest.raises(ValueError, match=r"^need at least one view and one transform$"):
        VolumeViewsd(transforms=())
    with pytest.raises(ValueError, match="policy must be 'one' or 'compose'"):
        VolumeViewsd(policy="all")
    with pytest.raises(ValueError, match=r"unknown view transform 'warp'; choose from \('flip'"):
        VolumeViewsd(transforms=("warp",))


def _coordinates(size: int) -> torch.Tensor:
    """Channel 0 holds the row index, channel 1 the column index."""
    rows = torch.arange(size, dtype=torch.float32)[:, None].expand(size, size)
    return torch.stack([rows, rows.T])


def _crop_box(view: torch.Tensor) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of the crop behind a view of ``_coordinates`` no smaller than the crop:
    bilinear upsampling keeps a linear ramp linear, with slope ``crop / view`` inside."""
    n = view.shape[-1]
    mid = n // 2
    box = []
    for c in (0, 1):
        line = view[c, mid, :] if c == 1 else view[c, :, mid]
        extent = float(line[mid] - line[mid - 1]) * n
        start = float(line[mid]) - (mid + 0.5) * extent / n + 0.5
        box.append((round(start), round(extent)))
    return box[0][0], box[1][0], box[0][1], box[1][1]


def _plain_views(**kwargs) -> ImageViewsd:
    """Image views without flips and intensity transforms (unless asked): the crop alone."""
    return ImageViewsd(**{"flip_prob": 0.0, "jitter_prob": 0.0, "blur_prob": 0.0, **kwargs})


def test_image_crops_cover_the_area_and_aspect_ranges_inside_the_image():
    make = _plain_views(spatial_size=(64, 64), scale=(0.2, 0.6), ratio=(0.5, 2.0))  # views never shrink
    make.set_random_state(seed=0)
    size = 64
    image = _coordinates(size)
    areas, aspects = [], []
    for _ in range(60):
        (view,) = make({"image": image})["views"][:1]
        top, left, height, width = _crop_box(view)
        assert top >= 0 and top + height <= size and left >= 0 and left + width <= size
        areas.append(height * width / size**2)
        aspects.append(width / height)
    assert 0.19 <= min(areas) < 0.25 and 0.55 < max(areas) <= 0.62, (min(areas), max(areas))
    assert 0.48 <= min(aspects) < 0.6 and 1.7 < max(aspects) <= 2.1, (min(aspects), max(aspects))


def test_a_full_crop_is_the_whole_image_resized_with_antialiasing():
    """Scale 1 and aspect 1: the whole image; halving it averages 4 x 4 pixels with weights 1, 3, 3, 1
    per axis (a triangle filter twice as wide), as antialiased bilinear resizing does."""
    image = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    make = _plain_views(spatial_size=(8, 8), scale=(1.0, 1.0), ratio=(1.0, 1.0))
    weights = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    padded = F.pad(image[None], (1, 1, 1, 1))[0]
    windows = padded.unfold(1, 4, 2).unfold(2, 4, 2)  # (1, 8, 8, 4, 4)
    expected = torch.einsum("chwij,i,j->chw", windows, weights, weights)
    for _ in range(4):
        for view in make({"image": image})["views"]:  # inside: the border taps are renormalised
            torch.testing.assert_close(view[:, 1:-1, 1:-1], expected[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def test_a_crop_of_one_pixel_is_possible():
    """A tiny area fraction gives a one-pixel crop: the view is that pixel, spread over the view."""
    image = torch.arange(100.0).reshape(1, 10, 10)
    make = _plain_views(spatial_size=(4, 4), scale=(0.01, 0.015), ratio=(1.0, 1.0))
    for view in make({"image": image})["views"]:
        assert torch.all(view == view[0, 0, 0])


def _jitter(view: torch.Tensor, image: torch.Tensor) -> tuple[float, float, float]:
    """Scale, shift and gamma of ``view = contrast(image * scale + shift)``: the contrast change keeps
    the minimum and the maximum."""
    low, high = float(view.min()), float(view.max())
    scale = (high - low) / float(image.max() - image.min())
    shift = low - scale * float(image.min())
    relative = (view - low) / (high - low)
    return scale, shift, _gamma(relative, (image - image.min()) / (image.max() - image.min()))


def test_image_intensity_jitter_scales_by_30_percent_shifts_by_0_1_and_changes_gamma_0_7_to_1_5():
    image = _ramp(16)[0] + 1.0  # from 1 to 2
    make = _plain_views(spatial_size=(16, 16), scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_prob=1.0)
    draws = np.array([_jitter(view, image) for _ in range(40) for view in make({"image": image})["views"]])
    scales, shifts, gammas = draws.T
    assert 0.7 - 1e-4 <= scales.min() < 0.75 and 1.25 < scales.max() <= 1.3 + 1e-4
    assert -0.1 - 1e-4 <= shifts.min() < -0.08 and 0.08 < shifts.max() <= 0.1 + 1e-4
    assert 0.7 - 1e-3 <= gammas.min() < 0.75 and 1.45 < gammas.max() <= 1.5 + 1e-3


def test_image_view_defaults_flip_half_jitter_80_percent_blur_half_and_no_local_crops():
    """Documented defaults, measured over many views of the whole image (crop of scale 1): flips about 1/2,
    each intensity jitter about 4/5, blur about 1/2; no local views; the input dropped."""
    image = _ramp(8)[0] + 1.0
    whole = {"spatial_size": (8, 8), "scale": (1.0, 1.0), "ratio": (1.0, 1.0)}
    flips = ImageViewsd(jitter_prob=0.0, blur_prob=0.0, **whole)
    jitters = ImageViewsd(flip_prob=0.0, blur_prob=0.0, **whole)
    blurs = ImageViewsd(flip_prob=0.0, jitter_prob=0.0, **whole)
    flipped, jittered, blurred = [], [], []
    for _ in range(100):
        out = flips({"image": image})
        assert set(out) == {"views"}
        flipped += [not torch.equal(v, image) for v in out["views"]]
        jittered += [abs(_jitter(v, image)[0] - 1) > 1e-6 for v in jitters({"image": image})["views"]]
        blurred += [not torch.allclose(v, image) for v in blurs({"image": image})["views"]]
    assert abs(np.mean(flipped) - 0.5) < 0.1 and abs(np.mean(jittered) - 0.8) < 0.1
    assert abs(np.mean(blurred) - 0.5) < 0.1


def test_image_blur_draws_each_axis_sigma_between_0_5_and_1_5():
    impulse = torch.zeros(1, 33, 33)
    impulse[0, 16, 16] = 1.0
    make = _plain_views(spatial_size=(33, 33), scale=(1.0, 1.0), ratio=(1.0, 1.0), blur_prob=1.0)
    sigmas = np.array([_kernel_sigma(v[0]) for _ in range(30) for v in make({"image": impulse})["views"]])
    assert sigmas.min() >= 0.47 and sigmas.max() <= 1.53
    for axis in (0, 1):
        assert sigmas[:, axis].min() < 0.65 and sigmas[:, axis].max() > 1.35


def test_image_views_are_plain_tensors_and_the_input_can_be_kept():
    image = MetaTensor(torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(0)))
    out = ImageViewsd(spatial_size=(8, 8), num_local=2, local_size=(4, 4), keep_input=True)({"image": image})
    assert torch.equal(out["image"], image)
    assert all(type(v) is torch.Tensor for v in out["views"] + out["local_views"])
    with pytest.raises(ValueError, match="spatial_size must be an integer >= 1"):
        ImageViewsd(spatial_size=(0, 8))
    with pytest.raises(ValueError, match="local_size must be an integer >= 1"):
        ImageViewsd(local_size=(8, 0))
