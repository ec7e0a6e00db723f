"""Pretraining dataset and loader factories, callable from a bundle config by ``_target_``.

The pipeline per datalist item ``{"image", "dims", "modality", ...}``:

1. deterministic (cacheable): load (:class:`~jointssl_monai.data.io.LoadSSLImaged`), orientation (volumes, to
   RAS by default like the fine-tuning configs ``train.json``/``inference.json``) and optional resampling
   (volumes), intensity normalisation per modality, slice sequence (``center``/``stride`` policies), in-plane
   resize to ``H x W``;
2. random (after the cache): slice sequence with the ``random`` policy, then the two views (volume or 2D).

With ``cache="memory"`` (MONAI ``CacheDataset``) or ``cache="disk"`` (``PersistentDataset``) the first part is
computed once per item. Both parts are wrapped by a guard: a bad input raises a
:class:`~jointssl_monai.data.checks.BadInputError` naming the file, or, with ``skip_bad_inputs=True``,
turns into a marker that the collate function drops (and logs once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose, Orientationd, Randomizable, Spacingd, Transform
from torch.utils.data import DataLoader

from jointssl_monai.data.batching import SKIPPED_KEY, MixedBatchSampler, SampleKey, collate_joint_ssl
from jointssl_monai.data.checks import DEFAULT_MAX_VOXELS, BadInputError, SkipLog, describe_path
from jointssl_monai.data.datalist import load_datalist
from jointssl_monai.data.io import LoadSSLImaged
from jointssl_monai.data.transforms import (
    RANDOM_SLICE_POLICIES,
    ResizeInPlaned,
    ScaleIntensityByModalityd,
    SliceSequenced,
)
from jointssl_monai.data.views import VOLUME_VIEW_TRANSFORMS, ImageViewsd, VolumeViewsd
from jointssl_monai.utils.arguments import check_bool, check_choice, check_int, check_size

__all__ = [
    "GuardedTransform",
    "JointViewsd",
    "RequireFiniteViewsd",
    "SSLCacheDataset",
    "SSLDataset",
    "SSLPersistentDataset",
    "VolumeOnlyd",
    "build_pretrain_dataset",
    "build_pretrain_loader",
    "build_pretrain_transforms",
    "find_bad_input",
    "guard_pipeline",
    "pretrain_dataset",
    "pretrain_transform_lists",
    "transforms_digest",
]

logger = logging.getLogger(__name__)

#: Version of what the deterministic part outputs for given settings; part of the disk-cache names, so that a
#: cache written by an older layout is never read back (2: MONAI's in-plane axis order, volumes in RAS; 3: the
#: digest describes the listed transforms themselves).
CACHE_LAYOUT_VERSION = 3


def find_bad_input(err: BaseException | None) -> BadInputError | None:
    """The :class:`BadInputError` inside ``err``'s cause chain (MONAI wraps every transform error in a
    ``RuntimeError("applying transform ...")``), or ``None``."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, BadInputError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


class _UnwrapBadInput:
    """Dataset mixin: reseed the random transforms from a :class:`~jointssl_monai.data.batching.SampleKey`'s
    seed before the item; re-raise a bad input as the plain :class:`BadInputError` naming the file, instead of
    MONAI's generic ``RuntimeError("applying transform ...")``."""

    def __getitem__(self, index: Any):
        if isinstance(index, SampleKey):
            self.transform.set_random_state(seed=index.seed)
        return super().__getitem__(index)

    def _transform(self, index: int):
        try:
            return super()._transform(index)
        except RuntimeError as err:
            bad = find_bad_input(err)
            if bad is None:
                raise
            raise BadInputError(bad.path, bad.problem) from None

    def _load_cache_item(self, idx: int):
        try:
            return super()._load_cache_item(idx)
        except RuntimeError as err:
            bad = find_bad_input(err)
            if bad is None:
                raise
            raise BadInputError(bad.path, bad.problem) from None


class SSLDataset(_UnwrapBadInput, Dataset):
    """MONAI ``Dataset`` whose bad inputs raise :class:`BadInputError` (naming the file) directly."""


class SSLCacheDataset(_UnwrapBadInput, CacheDataset):
    """MONAI ``CacheDataset`` whose bad inputs raise :class:`BadInputError` (naming the file) directly."""


class SSLPersistentDataset(_UnwrapBadInput, PersistentDataset):
    """MONAI ``PersistentDataset`` whose bad inputs raise :class:`BadInputError` naming the file."""


class GuardedTransform(Transform):
    """Run a transform; turn any failure into a :class:`BadInputError` naming the item's file, or, with
    ``skip_bad_inputs``, into a marker item ``{"skipped": reason, "index": ..., "source": ...}``.

    Marker items pass through later guards untouched and are dropped by
    :func:`~jointssl_monai.data.batching.collate_joint_ssl`. Each skipped input is logged once per process
    (without a cache the same bad file is met again every epoch) and counted in :attr:`skipped`.
    """

    def __init__(self, transform: Transform, skip_bad_inputs: bool = False) -> None:
        self.transform = transform
        self.skip_bad_inputs = skip_bad_inputs
        self.skipped = SkipLog()

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        if SKIPPED_KEY in data:
            return data
        source = data.get("source", describe_path(data.get("image")))
        try:
            return self.transform(data)
        except Exception as err:
            bad = find_bad_input(err)
            if bad is None:  # an unexpected failure: report its root cause with the file name
                root = err
                while root.__cause__ is not None:
                    root = root.__cause__
                bad = BadInputError(source, f"{type(root).__name__}: {root}")
            if not self.skip_bad_inputs:
                raise BadInputError(bad.path, bad.problem) from err
            if bad.path not in {name for name, _ in self.skipped.skipped}:
                self.skipped.add(bad.path, bad.problem)
                logger.warning("%d bad input(s) skipped so far in this process", len(self.skipped))
            return {SKIPPED_KEY: str(bad), "index": data.get("index", -1), "source": source}


class GuardedRandomTransform(GuardedTransform, Randomizable):
    """:class:`GuardedTransform` around a random transform (so MONAI caches stop before it)."""

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: Any) -> None:
        pass


class RequireFiniteViewsd(Transform):
    """Refuse an item whose views hold NaN/Inf (a :class:`BadInputError` naming its file).

    The last step of the guarded random pipeline, so that ``skip_bad_inputs`` skips such an item like any
    other bad input; the collate function's own check would stop the run.
    """

    def __init__(self, keys: Sequence[str] = ("views", "local_views")) -> None:
        self.keys = tuple(keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        for key in self.keys:
            if not all(bool(torch.isfinite(view).all()) for view in data.get(key) or ()):
                source = data.get("source", describe_path(data.get("image")))
                raise BadInputError(source, f"the {key} hold NaN/Inf values after the transforms")
        return data


class VolumeOnlyd(Transform):
    """Apply a dictionary transform to volumes (``dims == 3``) only; 2D images pass through."""

    def __init__(self, transform: Transform, dims_key: str = "dims") -> None:
        self.transform = transform
        self.dims_key = dims_key

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        return self.transform(data) if int(data.get(self.dims_key, 3)) == 3 else data


class JointViewsd(Randomizable, Transform):
    """Dispatch to :class:`VolumeViewsd` for slice sequences ``(C, S, H, W)`` and :class:`ImageViewsd` for
    2D images ``(C, H, W)``."""

    def __init__(self, volume_views: VolumeViewsd, image_views: ImageViewsd, key: str = "image") -> None:
        self.volume_views, self.image_views, self.key = volume_views, image_views, key

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.volume_views.set_random_state(state=self.R)
        self.image_views.set_random_state(state=self.R)
        return self

    def randomize(self, data: Any) -> None:
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> Any:
        return (self.volume_views if data[self.key].ndim == 4 else self.image_views)(data)


def pretrain_transform_lists(
    num_slices: int = 64,
    spatial_size: Sequence[int] = (128, 128),
    slice_policy: str = "center",
    slice_axis: int | str = 2,
    axcodes: str | None = "RAS",
    pixdim: Sequence[float] | None = None,
    ct_window: tuple[float, float] = (-1000.0, 1000.0),
    percentiles: tuple[float, float] = (0.5, 99.5),
    in_plane_mode: str = "resize",
    view_transforms: Sequence[str] = VOLUME_VIEW_TRANSFORMS,
    view_policy: str = "one",
    image_scale: tuple[float, float] = (0.14, 1.0),
    num_local_crops: int = 0,
    local_size: Sequence[int] = (48, 48),
    reader: str | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> tuple[list[Transform], list[Transform]]:
    """The ``(deterministic, random)`` transform lists, from settings, that ``pretrain.json`` writes out as
    ``train#deterministic_transforms`` and ``train#random_transforms`` (arguments: see
    :func:`build_pretrain_dataset`). The slicing is deterministic, hence cached, unless the ``slice_policy``
    draws at random (:data:`~jointssl_monai.data.transforms.RANDOM_SLICE_POLICIES`)."""
    deterministic: list[Transform] = [LoadSSLImaged("image", reader=reader, max_voxels=max_voxels)]
    if axcodes:
        deterministic.append(
            VolumeOnlyd(Orientationd("image", axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
        )
    if pixdim is not None:
        deterministic.append(VolumeOnlyd(Spacingd("image", pixdim=tuple(pixdim), mode="bilinear")))
    deterministic.append(ScaleIntensityByModalityd("image", ct_window=ct_window, percentiles=percentiles))
    slicer = SliceSequenced("image", num_slices=num_slices, policy=slice_policy, slice_axis=slice_axis)
    image_views = ImageViewsd(
        "image",
        spatial_size=spatial_size,
        scale=image_scale,
        num_local=num_local_crops,
        local_size=local_size,
    )
    # 2D images keep their full size here: their random resized crops bring them to spatial_size
    to_slices = [slicer, VolumeOnlyd(ResizeInPlaned("image", spatial_size, mode=in_plane_mode))]
    random: list[Transform] = to_slices if slice_policy in RANDOM_SLICE_POLICIES else []
    if slice_policy not in RANDOM_SLICE_POLICIES:
        deterministic += to_slices
    random.append(
        JointViewsd(VolumeViewsd("image", transforms=view_transforms, policy=view_policy), image_views)
    )
    return deterministic, random


def guard_pipeline(
    deterministic: Sequence[Transform],
    random: Sequence[Transform],
    skip_bad_inputs: bool = False,
    seed: int = 0,
) -> tuple[Compose, Compose]:
    """Wrap the two parts in guards (:class:`GuardedTransform`): a failure becomes a :class:`BadInputError`
    naming the file, or with ``skip_bad_inputs`` a marker the collate function drops. The random part ends
    with :class:`RequireFiniteViewsd`, so that non-finite views are a bad input like any other."""
    det = Compose([GuardedTransform(Compose(list(deterministic)), skip_bad_inputs)])
    rnd = Compose([GuardedRandomTransform(Compose([*random, RequireFiniteViewsd()]), skip_bad_inputs)])
    rnd.set_random_state(seed=seed)
    return det, rnd


def build_pretrain_transforms(
    skip_bad_inputs: bool = False, seed: int = 0, **settings: Any
) -> tuple[Compose, Compose]:
    """The guarded ``(deterministic, random)`` pipelines: :func:`pretrain_transform_lists` of ``settings``
    through :func:`guard_pipeline`."""
    return guard_pipeline(*pretrain_transform_lists(**settings), skip_bad_inputs=skip_bad_inputs, seed=seed)


def pretrain_dataset(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    deterministic_transforms: Sequence[Transform],
    random_transforms: Sequence[Transform],
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    cache_num_workers: int = 0,
    skip_bad_inputs: bool = False,
    seed: int = 0,
) -> Dataset:
    """The pretraining dataset from listed transforms (what ``pretrain.json`` builds): every datalist item
    becomes ``{"views": [s, t], "num_slices", "index", ...}``.

    Args:
        datalist: a datalist JSON file (see :mod:`jointssl_monai.data.datalist`) or its list of entries.
        deterministic_transforms: the cacheable part (load, orient, scale and, unless the slice policy is
            random, slice and resize in-plane), giving ``(C, S, H, W)`` slice sequences and ``(C, H, W)``
            images.
        random_transforms: the part run at every draw (random slicing, the two views).
        cache: ``"none"``, ``"memory"`` (``CacheDataset``) or ``"disk"`` (``PersistentDataset`` in
            ``cache_dir``); only the deterministic part is cached, views stay random every epoch.
        cache_dir: folder of the disk cache. Its file names carry :func:`transforms_digest` of the
            deterministic part: entries written under other settings or an older layout are never read back.
        cache_num_workers: workers that fill the memory cache.
        skip_bad_inputs: skip (log, and drop in collate) bad inputs instead of raising.
        seed: seed of the random transforms (the loader's keys reseed them for every item).

    Returns:
        A MONAI ``Dataset``, ``CacheDataset`` or ``PersistentDataset``; ``dataset.data[i]["dims"]`` tells
        volumes from images (the batch sampler uses it) and ``"index"`` is the position in the datalist.
    """
    check_bool("skip_bad_inputs", skip_bad_inputs)
    check_int("seed", seed, 0)
    check_choice("cache", cache, ("none", "memory", "disk"))
    entries = load_datalist(datalist) if isinstance(datalist, (str, os.PathLike)) else list(datalist)
    data = []
    for i, entry in enumerate(entries):
        if "image" not in entry or "dims" not in entry:
            raise BadInputError(f"datalist entry {i}", "needs 'image' and 'dims' fields")
        data.append({**entry, "index": i, "modality": entry.get("modality", "OT")})
    det, rnd = guard_pipeline(deterministic_transforms, random_transforms, skip_bad_inputs, seed)
    transform = Compose([*det.transforms, *rnd.transforms])
    transform.set_random_state(seed=seed)  # Compose() reseeds its children from MONAI's global seed
    if cache == "none":
        return SSLDataset(data, transform)
    if cache == "memory":
        return SSLCacheDataset(data, transform, num_workers=cache_num_workers, progress=False)
    if cache_dir is None:
        raise ValueError("cache='disk' needs a cache_dir")
    digest = transforms_digest(deterministic_transforms, skip_bad_inputs=skip_bad_inputs).encode("utf-8")
    return SSLPersistentDataset(data, transform, cache_dir=str(cache_dir), hash_transform=lambda _: digest)


def build_pretrain_dataset(
    datalist: str | os.PathLike | Sequence[Mapping[str, Any]],
    num_slices: int = 64,
    spatial_size: Sequence[int] = (128, 128),
    cache: str = "none",
    cache_dir: str | os.PathLike | None = None,
    cache_num_workers: int = 0,
    skip_bad_inputs: bool = False,
    seed: int = 0,
    **transform_kwargs: Any,
) -> Dataset:
    """The pretraining dataset from settings: :func:`pretrain_dataset` of :func:`pretrain_transform_lists`.

    Args:
        datalist: a datalist JSON file or its list of entries.
        num_slices: slices per volume, ``S`` (authors: 64).
        spatial_size: in-plane size ``(H, W)`` in MONAI's axis order (``(X, Y)`` for axial slices, ``(columns,
            rows)`` for 2D images; authors: 128 x 128).
        cache: ``"none"``, ``"memory"`` or ``"disk"`` (see :func:`pretrain_dataset`).
        cache_dir: folder of the disk cache.
        cache_num_workers: workers that fill the memory cache.
        skip_bad_inputs: skip (log, and drop in collate) bad inputs instead of raising.
        seed: seed of the random transforms.
        transform_kwargs: passed to :func:`pretrain_transform_lists` (``slice_policy``, ``slice_axis``,
            ``axcodes``, ``pixdim``, ``ct_window``, ``percentiles``, ``in_plane_mode``, ``view_transforms``,
            ``view_policy``, ``image_scale``, ``num_local_crops``, ``local_size``, ``reader``,
            ``max_voxels``). ``axcodes`` (default ``"RAS"``, ``None``: keep the file's axes) orients volumes
            before slicing; keep it equal to the ``Orientationd`` of the fine-tuning pipeline, so that the
            slices the encoder learns from are the planes the fine-tuned network meets, in the same axis order
            and direction.
    """
    check_int("num_slices", num_slices, 1)
    check_size("spatial_size", spatial_size)
    deterministic, random = pretrain_transform_lists(num_slices, spatial_size, **transform_kwargs)
    return pretrain_dataset(
        datalist,
        deterministic,
        random,
        cache=cache,
        cache_dir=cache_dir,
        cache_num_workers=cache_num_workers,
        skip_bad_inputs=skip_bad_inputs,
        seed=seed,
    )


def _settings(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a transform's settings: its class and public attributes, recursively."""
    if isinstance(obj, (bool, int, float, str, type(None))):
        return obj
    if isinstance(obj, np.ndarray) and obj.size <= 64:
        return obj.tolist()
    if isinstance(obj, (list, tuple)):
        return [_settings(v, depth + 1) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): _settings(v, depth + 1) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if depth < 8 and hasattr(obj, "__dict__") and not isinstance(obj, np.random.RandomState):
        state = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "R"}
        return {"class": type(obj).__qualname__, **_settings(state, depth + 1)}
    return type(obj).__qualname__


def transforms_digest(transforms: Sequence[Transform], **extra: Any) -> str:
    """A digest of what a list of deterministic transforms computes: each transform's class and settings
    (public attributes, recursively), :data:`CACHE_LAYOUT_VERSION` and ``extra``. The disk cache's file names
    carry it (MONAI's default ``hash_transform`` hashes class names only), so a changed setting never reads
    an entry written under the old one."""
    description = {"layout": CACHE_LAYOUT_VERSION, "transforms": _settings(list(transforms)), **extra}
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.md5(text.encode("utf-8"), usedforsecurity=False).hexdigest()


def build_pretrain_loader(
    dataset: Dataset,
    volumes_per_batch: int = 2,
    images_per_batch: int = 0,
    num_workers: int = 0,
    shuffle: bool = True,
    seed: int = 0,
    num_replicas: int | None = None,
    rank: int | None = None,
    drop_last: bool = True,
    pin_memory: bool = False,
    persistent_workers: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over ``dataset`` with :class:`MixedBatchSampler` and :func:`collate_joint_ssl`.

    ``num_replicas``/``rank`` default to the torch.distributed world, so every rank sees a disjoint share.
    :func:`split_batch` turns a config's ``batch_size`` and ``image_fraction`` into the two counts.
    Call ``loader.batch_sampler.set_epoch(epoch)`` each epoch (the trainer does) for a new, rank-consistent
    shuffle. The sampler's keys carry a seed per item, from which the dataset reseeds its random transforms
    (:class:`~jointssl_monai.data.batching.SampleKey`), so an epoch's batches and augmentations do not depend
    on what ran before, on the workers, or on where a run resumed: resuming is exact, also mid-epoch. The
    loader draws its workers' base seed from its own generator, not from torch's global one, which the
    checkpoints restore.
    """
    dims = [int(item["dims"]) for item in dataset.data]
    sampler = MixedBatchSampler(
        dims, volumes_per_batch, images_per_batch, shuffle=shuffle, seed=seed,
        num_replicas=num_replicas, rank=rank, drop_last=drop_last,
    )  # fmt: skip
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_joint_ssl,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
