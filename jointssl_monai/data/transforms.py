"""Deterministic and slice-level dictionary transforms: intensity normalisation per modality, slice sequences,
in-plane resizing.

Layout after :class:`SliceSequenced`: a volume is ``(C, S, H, W)`` (slices first, as the slice encoder
consumes them) with ``data["num_slices"]`` valid slices at the front and zero padding behind; a 2D image is
``(C, H, W)``. ``(H, W)`` is always MONAI's in-plane axis order: for axial slices of a ``(C, X, Y, Z)`` volume
``(H, W) = (X, Y)``, for a 2D image (columns, rows) as MONAI's readers give it (see
:mod:`jointssl_monai.data.io`), the same order as the fine-tuning networks see.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable, Resize, ResizeWithPadOrCrop

from jointssl_monai.data.checks import BadInputError
from jointssl_monai.utils.arguments import check_int, check_size

__all__ = [
    "RANDOM_SLICE_POLICIES",
    "SLICE_POLICIES",
    "ResizeInPlaned",
    "ScaleIntensityByModalityd",
    "SliceSequenced",
]

#: ``center``: centre crop (or zero-pad at the end) to S slices, as the authors' code does; ``random``: a
#: random contiguous window of S slices; ``stride``: S slices at a uniform stride over the whole volume;
#: ``random_stride``: the same comb of S slices over the whole volume, shifted by a random fraction of the
#: stride, so that every slice is drawn over the epochs and a step's slices are spread over the anatomy.
SLICE_POLICIES = ("center", "random", "stride", "random_stride")
#: The slice policies that draw at random: their slicing belongs to the random part of a pipeline (after the
#: cache, reseeded for every item), never to the cached deterministic part.
RANDOM_SLICE_POLICIES = ("random", "random_stride")


def _source(d: Mapping[Hashable, Any], key: Hashable) -> str:
    return str(d.get("source", key))


class ScaleIntensityByModalityd(MapTransform):
    """Scale intensities to ``[0, 1]`` by modality: CT by a fixed Hounsfield window, everything else (MR,
    X-ray, PNG...) by robust percentiles of the image itself, so that scanner-dependent MR/X-ray scales agree.

    Args:
        keys: image keys.
        modality_key: key of the modality string (DICOM ``Modality`` or the datalist's mapping); an item
            without it has the modality ``""``.
        ct_window: ``(low, high)`` Hounsfield window for ``window_modalities``.
        percentiles: ``(low, high)`` percentiles for the other modalities.
        window_modalities: modalities normalised by the fixed window.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        modality_key: str = "modality",
        ct_window: tuple[float, float] = (-1000.0, 1000.0),
        percentiles: tuple[float, float] = (0.5, 99.5),
        window_modalities: Sequence[str] = ("CT",),
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if ct_window[1] <= ct_window[0] or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ValueError(f"invalid ct_window {ct_window} or percentiles {percentiles}")
        self.modality_key = modality_key
        self.ct_window = ct_window
        self.percentiles = percentiles
        self.window_modalities = {m.upper() for m in window_modalities}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        modality = str(d.get(self.modality_key, "")).upper()
        for key in self.key_iterator(d):
            img = d[key]
            if modality in self.window_modalities:
                low, high = self.ct_window
            else:
                flat = img.reshape(-1).double()  # float64: finite extremes (+/-3e38) must not overflow
                if flat.numel() > 2**24:  # quantile limit of torch; a strided subsample estimates it well
                    flat = flat[:: flat.numel() // 2**23 + 1]
                q = torch.quantile(flat, torch.tensor([p / 100 for p in self.percentiles], dtype=flat.dtype))
                low, high = float(q[0]), float(q[1])
                if high <= low:
                    raise BadInputError(
                        _source(d, key),
                        f"no intensity range between the {self.percentiles} percentiles "
                        "(almost constant image)",
                    )
            scaled = (img.double() - low) / (high - low)  # float64: high - low may exceed float32's range
            d[key] = scaled.clamp(0.0, 1.0).to(img.dtype if img.is_floating_point() else torch.float32)
        return d


class SliceSequenced(Randomizable, MapTransform):
    """Turn a volume ``(C, X, Y, Z)`` into a sequence of ``num_slices`` slices ``(C, S, H, W)``.

    The slices are taken along ``slice_axis`` (0, 1, 2, or ``"auto"``: the axis with the largest voxel
    spacing, i.e. the acquisition direction of anisotropic scans). The in-plane axes keep MONAI's order
    (``H`` then ``W`` = the remaining axes in increasing order, e.g. ``(X, Y)`` for axial slices), which is
    the order in which a MONAI fine-tuning pipeline (``LoadImage``, ``EnsureChannelFirst``, ``Orientation``)
    hands the same plane to a 2D network, and in which a 2D kernel inflated to 3D with its new axis last
    (:func:`jointssl_monai.transfer.inflate_kernel`) meets it in a 3D network. The number of valid
    slices, ``min(depth, num_slices)``, goes to ``data[num_slices_key]``; padded slices are zeros at the end.
    2D images ``(C, H, W)`` pass through with ``num_slices = 1``. The outputs are plain tensors (a volume's
    affine does not describe its slice sequence).

    This transform must run *before* the two views are made, so that slice ``i`` of both views is the same
    source slice.

    Args:
        keys: image keys.
        num_slices: ``S``.
        policy: one of :data:`SLICE_POLICIES`.
        slice_axis: spatial axis of the slices, or ``"auto"``.
        num_slices_key: where to store the valid-slice count.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        num_slices: int = 64,
        policy: str = "center",
        slice_axis: int | str = 2,
        num_slices_key: str = "num_slices",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if policy not in SLICE_POLICIES:
            raise ValueError(f"policy must be one of {SLICE_POLICIES}, got {policy!r}")
        check_int("num_slices", num_slices, 1)
        if slice_axis not in (0, 1, 2, "auto"):
            raise ValueError(f"slice_axis must be 0, 1, 2 or 'auto', got {slice_axis!r}")
        self.num_slices = num_slices
        self.policy = policy
        self.slice_axis = slice_axis
        self.num_slices_key = num_slices_key
        self._start = 0.0

    def randomize(self, data: Any = None) -> None:
        self._start = float(self.R.uniform())

    def _axis(self, img: torch.Tensor) -> int:
        if self.slice_axis != "auto":
            return int(self.slice_axis)
        affine = getattr(img, "affine", None)
        if affine is None:
            return 2
        spacing = np.linalg.norm(np.asarray(affine)[:3, :3], axis=0)
        return int(np.argmax(spacing))

    def select(self, depth: int) -> np.ndarray:
        """Indices of the source slices kept, in order (at most ``num_slices``). Before the first draw, the
        random policies select as for a draw of 0: the first window, the comb from slice 0."""
        s = self.num_slices
        if depth <= s:
            return np.arange(depth)
        if self.policy == "center":
            start = (depth - s) // 2
        elif self.policy == "random":
            start = min(int(self._start * (depth - s + 1)), depth - s)
        elif self.policy == "random_stride":
            step = depth / s  # > 1, so the picks are distinct and increasing
            return np.minimum(((np.arange(s) + self._start) * step).astype(int), depth - 1)
        else:
            return np.round(np.linspace(0, depth - 1, s)).astype(int)
        return np.arange(start, start + s)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        for key in self.key_iterator(d):
            img = d[key]
            if img.ndim == 3:  # a 2D image: one slice
                d[key] = img.as_tensor() if hasattr(img, "as_tensor") else img
                d[self.num_slices_key] = 1
                continue
            if img.ndim != 4:
                raise BadInputError(
                    _source(d, key), f"expected (C, X, Y, Z) before slicing, got {tuple(img.shape)}"
                )
            axis = self._axis(img)
            plane = [a for a in (0, 1, 2) if a != axis]
            tensor = img.as_tensor() if hasattr(img, "as_tensor") else torch.as_tensor(img)
            # (C, X, Y, Z) -> (C, slice, H, W) with (H, W) = the in-plane axes in MONAI's order
            tensor = tensor.permute(0, 1 + axis, 1 + plane[0], 1 + plane[1])
            keep = self.select(tensor.shape[1])
            out = tensor.new_zeros((tensor.shape[0], self.num_slices, *tensor.shape[2:]))
            out[:, : len(keep)] = tensor[:, torch.as_tensor(keep)]
            d[key] = out
            d[self.num_slices_key] = len(keep)
        return d


class ResizeInPlaned(MapTransform):
    """Bring the in-plane size of ``(C, S, H, W)`` volumes and ``(C, H, W)`` images to ``spatial_size``.

    ``mode="resize"`` (default) rescales the whole plane (smaller images are upsampled, so nothing is ever too
    small); ``mode="crop_pad"`` centre-crops larger planes and zero-pads smaller ones. The slice axis is never
    touched.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        spatial_size: Sequence[int] = (128, 128),
        mode: str = "resize",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mode not in ("resize", "crop_pad"):
            raise ValueError(f"mode must be 'resize' or 'crop_pad', got {mode!r}")
        self.spatial_size = check_size("spatial_size", spatial_size)
        self.mode = mode

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            size = self.spatial_size if img.ndim == 3 else (-1, *self.spatial_size)
            if self.mode == "resize":
                # "area" averages when shrinking (no aliasing, no extra smoothing pass) and keeps depth as is
                op = Resize(size, mode="area")
            else:
                op = ResizeWithPadOrCrop(size if img.ndim == 3 else (img.shape[1], *self.spatial_size))
            out = op(img)
            d[key] = out.as_tensor() if hasattr(out, "as_tensor") else out
        return d
