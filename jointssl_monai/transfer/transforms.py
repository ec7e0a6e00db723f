"""Transforms of the segmentation bundle."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from monai.transforms import Spacingd

__all__ = ["KeySafeSpacingd"]


class KeySafeSpacingd(Spacingd):
    """``Spacingd`` that leaves non-dictionary ``<key>_*`` entries alone.

    Since MONAI 1.6, ``Spacingd`` copies the resampled image's metadata into every entry whose name starts
    with ``"<key>_"``. MONAI Label puts the string ``image_path`` next to ``image``, so a stock ``Spacingd``
    on ``image`` fails there (``str`` has no ``update``) and every inference request returns HTTP 500. This
    transform hides such non-dictionary entries during the call and puts them back unchanged; resampling,
    metadata dictionaries and the inverse (``Invertd``) are those of ``Spacingd``.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{key}_" for key in self.keys)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], dict)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(hidden)
        return out
