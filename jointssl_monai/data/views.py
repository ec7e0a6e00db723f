"""Two-view augmentation for volumes and 2D images (the global views ``s`` and ``t`` of the paper).

Volumes: every spatial transform acts **in-plane only** and identically on every slice (the slice sequence is
fed to MONAI's 2D transforms with the slices as channels), and the slice selection happened before the views
split (:class:`~jointssl_monai.data.transforms.SliceSequenced`). Hence slice position ``i`` of view ``s``
and of view ``t`` come from the same source slice, which the intra-level clustering relies on. Padded slices
stay zero.

As in the authors' code, each view of a volume gets *one* transform drawn from flip, affine, low resolution,
noise, blur, bias field and gamma (``policy="one"``); ``policy="compose"`` applies each with probability
``prob``.

2D images get SwAV-style views (Caron et al., NeurIPS 2020): random resized crops, flips, intensity jitter and
blur, plus optional small local crops (multi-crop).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrast,
    RandAffine,
    RandAxisFlip,
    RandBiasField,
    RandGaussianNoise,
    RandGaussianSmooth,
    Randomizable,
    RandScaleIntensity,
    RandShiftIntensity,
    RandSimulateLowResolution,
)

from jointssl_monai.utils.arguments import check_size

__all__ = ["VOLUME_VIEW_TRANSFORMS", "ImageViewsd", "VolumeViewsd"]

#: Names of the per-view volume transforms, as in the authors' augmentation list.
VOLUME_VIEW_TRANSFORMS = ("flip", "affine", "lowres", "noise", "blur", "bias", "gamma")


def _plain(x: Any) -> torch.Tensor:
    """A plain float tensor (MONAI transforms may return MetaTensors; the batch needs no metadata)."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return x.float()


def _volume_transform(name: str, prob: float) -> Randomizable:
    """One in-plane MONAI transform on a ``(slices, H, W)`` tensor (slices as channels): ``flip`` along a
    random in-plane axis; ``affine``: rotation up to 15 degrees, scale 0.9 to 1.1 per axis, shift up to 8
    pixels, zero padding; ``lowres``: down- and up-sampling at a zoom of 0.5 to 0.9; ``noise``: Gaussian
    noise of a standard deviation up to 0.05; ``blur``: Gaussian of sigma 0.5 to 1.5 per axis; ``bias``: a
    smooth multiplicative field (Legendre coefficients 0.2 to 0.4); ``gamma``: contrast gamma 0.7 to 1.5."""
    if name == "flip":
        return RandAxisFlip(prob=prob)
    if name == "affine":
        return RandAffine(
            prob=prob, rotate_range=(math.pi / 12,), scale_range=(0.1, 0.1), translate_range=(8, 8),
            padding_mode="zeros",
        )  # fmt: skip
    if name == "lowres":
        return RandSimulateLowResolution(prob=prob, zoom_range=(0.5, 0.9), upsample_mode="bilinear")
    if name == "noise":
        return RandGaussianNoise(prob=prob, std=0.05)
    if name == "blur":
        return RandGaussianSmooth(prob=prob, sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5))
    if name == "bias":
        return RandBiasField(prob=prob, coeff_range=(0.2, 0.4))
    if name == "gamma":
        return RandAdjustContrast(prob=prob, gamma=(0.7, 1.5))
    raise ValueError(f"unknown view transform {name!r}; choose from {VOLUME_VIEW_TRANSFORMS}")


class _ViewsBase(Randomizable, MapTransform):
    """Shares one random generator with the MONAI transforms it holds, so ``set_random_state`` reproduces."""

    _inner: Sequence[Randomizable] = ()

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        for t in self._inner:
            t.set_random_state(state=self.R)
        return self


class VolumeViewsd(_ViewsBase):
    """Make ``num_views`` augmented views of a ``(C, S, H, W)`` slice sequence into ``data[views_key]``.

    Args:
        keys: the slice-sequence key (one key).
        num_views: number of global views (2 in the paper).
        transforms: names from :data:`VOLUME_VIEW_TRANSFORMS`.
        policy: ``"one"``: one transform drawn uniformly per view (authors); ``"compose"``: each transform in
            turn with probability ``prob``.
        prob: probability of each transform under ``"compose"``.
        num_slices_key: valid-slice count; slices beyond it are reset to zero after the intensity transforms.
        views_key: output key, a list of tensors shaped like the input.
        keep_input: keep ``data[key]`` (dropped by default, to spare memory).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        num_views: int = 2,
        transforms: Sequence[str] = VOLUME_VIEW_TRANSFORMS,
        policy: str = "one",
        prob: float = 0.5,
        num_slices_key: str = "num_slices",
        views_key: str = "views",
        keep_input: bool = False,
    ) -> None:
        super().__init__(keys)
        if policy not in ("one", "compose"):
            raise ValueError(f"policy must be 'one' or 'compose', got {policy!r}")
        if num_views < 1 or not transforms:
            raise ValueError("need at least one view and one transform")
        self.num_views = num_views
        self.names = tuple(transforms)
        self.policy = policy
        self.num_slices_key = num_slices_key
        self.views_key = views_key
        self.keep_input = keep_input
        p = 1.0 if policy == "one" else prob
        self._inner = [_volume_transform(n, p) for n in self.names]
        self._choice: list[int] = []
        self.set_random_state(seed=0)

    def randomize(self, data: Any = None) -> None:
        self._choice = [int(self.R.randint(len(self._inner))) for _ in range(self.num_views)]

    def _view(self, planes: torch.Tensor, choice: int) -> torch.Tensor:
        if self.policy == "one":
            return self._inner[choice](planes)
        return Compose(self._inner)(planes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            c, s, h, w = img.shape
            valid = int(d.get(self.num_slices_key, s))
            planes = img.reshape(c * s, h, w)  # slices as channels: one in-plane transform for all slices
            views = []
            for choice in self._choice:
                out = _plain(self._view(planes, choice)).reshape(c, s, h, w).clone()
                out[:, valid:] = 0  # noise/bias must not leak into padding
                views.append(out.contiguous())
            d[self.views_key] = views
            if not self.keep_input:
                del d[key]
        return d


class ImageViewsd(_ViewsBase):
    """SwAV-style views of a ``(C, H, W)`` image into ``data[views_key]`` (and ``data[local_views_key]``).

    Args:
        keys: the image key (one key).
        spatial_size: size of the global views.
        num_views: number of global views.
        scale: area fraction range of the global random resized crops.
        ratio: aspect ratio range of the crops.
        num_local: number of extra small crops (multi-crop); 0 disables them.
        local_size: size of the local crops.
        local_scale: area fraction range of the local crops.
        flip_prob: probability of a flip per view.
        jitter_prob: probability of each intensity jitter per view: scale by 0.7 to 1.3, shift by up to 0.1,
            contrast gamma 0.7 to 1.5.
        blur_prob: probability of a blur per view (Gaussian, sigma 0.5 to 1.5 per axis).

    A new instance is seeded with 0 (``set_random_state(seed=0)``), as is :class:`VolumeViewsd`.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spatial_size: Sequence[int] = (128, 128),
        num_views: int = 2,
        scale: tuple[float, float] = (0.14, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        num_local: int = 0,
        local_size: Sequence[int] = (48, 48),
        local_scale: tuple[float, float] = (0.05, 0.14),
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        blur_prob: float = 0.5,
        views_key: str = "views",
        local_views_key: str = "local_views",
        keep_input: bool = False,
    ) -> None:
        super().__init__(keys)
        self.spatial_size = check_size("spatial_size", spatial_size)
        self.local_size = check_size("local_size", local_size)
        self.num_views = num_views
        self.num_local = num_local
        self.scale, self.local_scale, self.ratio = scale, local_scale, ratio
        self.views_key, self.local_views_key = views_key, local_views_key
        self.keep_input = keep_input
        self._inner = [
            RandAxisFlip(prob=flip_prob),
            RandScaleIntensity(factors=0.3, prob=jitter_prob),
            RandShiftIntensity(offsets=0.1, prob=jitter_prob),
            RandAdjustContrast(prob=jitter_prob, gamma=(0.7, 1.5)),
            RandGaussianSmooth(prob=blur_prob, sigma_x=(0.5, 1.5), sigma_y=(0.5, 1.5)),
        ]
        self._pipeline = Compose(self._inner)
        self.set_random_state(seed=0)

    def randomize(self, data: Any = None) -> None:  # the crops draw from self.R as they go
        pass

    def _crop(self, img: torch.Tensor, scale: tuple[float, float], size: tuple[int, ...]) -> torch.Tensor:
        _, h, w = img.shape
        area = h * w * self.R.uniform(*scale)
        aspect = math.exp(self.R.uniform(math.log(self.ratio[0]), math.log(self.ratio[1])))
        ch = int(min(h, max(1, round(math.sqrt(area / aspect)))))
        cw = int(min(w, max(1, round(math.sqrt(area * aspect)))))
        top = int(self.R.randint(h - ch + 1))
        left = int(self.R.randint(w - cw + 1))
        crop = img[None, :, top : top + ch, left : left + cw].float()
        return F.interpolate(crop, size=size, mode="bilinear", align_corners=False, antialias=True)[0]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = _plain(d[key])
            d[self.views_key] = [
                _plain(self._pipeline(self._crop(img, self.scale, self.spatial_size)))
                for _ in range(self.num_views)
            ]
            if self.num_local:
                d[self.local_views_key] = [
                    _plain(self._pipeline(self._crop(img, self.local_scale, self.local_size)))
                    for _ in range(self.num_local)
                ]
            if not self.keep_input:
                del d[key]
        return d
