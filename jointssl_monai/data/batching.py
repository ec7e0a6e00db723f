"""Mixed 2D/3D batches: a distributed-aware batch sampler and the collate function of the pretraining loader.

The collate function returns exactly the keys of :data:`jointssl_monai.outputs.BATCH_KEYS`. Every item is
checked *before* anything is stacked, so that a bad item gives an error naming its file instead of a shape
error deep inside ``torch.stack``; items a guarded pipeline marked as skipped (``skip_bad_inputs``) are
dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from jointssl_monai.data.checks import BadInputError
from jointssl_monai.outputs import BATCH_KEYS
from jointssl_monai.utils.arguments import check_int, check_number

__all__ = [
    "SKIPPED_KEY",
    "MixedBatchSampler",
    "SampleKey",
    "collate_joint_ssl",
    "item_seed",
    "split_batch",
    "validate_item",
]

#: Key of the marker an item carries when a guarded pipeline skipped it (the value is the reason).
SKIPPED_KEY = "skipped"

logger = logging.getLogger(__name__)


def item_seed(*parts: int) -> int:
    """A 32-bit seed mixed from non-negative integers (NumPy's ``SeedSequence``: nearby inputs, unrelated
    seeds)."""
    return int(np.random.SeedSequence([int(p) % 2**63 for p in parts]).generate_state(1)[0])


class SampleKey(int):
    """A dataset index that carries the seed of its item's augmentations.

    :class:`MixedBatchSampler` yields these; the pretraining datasets reseed their random transforms from
    :attr:`seed` before they transform the item. An item's views then depend on its place in the epoch only,
    not on the loader worker that draws it, on what that worker drew before, or on where a run was resumed.
    Plain ``int`` everywhere else (``dataset.data[key]`` works), and it pickles into loader workers.
    """

    seed: int

    def __new__(cls, index: int, seed: int) -> SampleKey:
        key = super().__new__(cls, index)
        key.seed = int(seed)
        return key

    def __reduce__(self) -> tuple:
        return SampleKey, (int(self), self.seed)

    def __repr__(self) -> str:
        return f"SampleKey({int(self)}, seed={self.seed})"


class MixedBatchSampler(Sampler[list[int]]):
    """Batches that hold ``volumes_per_batch`` volumes and ``images_per_batch`` 2D images, as dataset indices.

    Each epoch permutes the volume and the image indices (seeded by ``seed + epoch``, so every rank draws the
    same permutation), gives every rank a disjoint, equally long share of each (``rank::num_replicas``, padded
    by wrapping around so all ranks run the same number of steps), and cuts batches. The epoch lasts until the
    longer stream is used up; the shorter one restarts with a fresh permutation (its items are then seen more
    than once). Call :meth:`set_epoch` at every epoch, as with ``DistributedSampler``.

    The indices are :class:`SampleKey` s: each carries the seed of its item's augmentations, mixed from
    ``(seed, epoch, kind, position in the epoch's stream)``. The views of an epoch are therefore the same with
    any number of loader workers, with persistent workers, and in a run resumed in the middle of the epoch
    (``set_epoch(epoch, start_batch)``).

    Args:
        dims: ``dims`` (2 or 3) of every dataset item, in dataset order.
        volumes_per_batch: volumes per batch and rank (0 for none).
        images_per_batch: 2D images per batch and rank (0 for none).
        shuffle: permute (``False``: dataset order, still sharded).
        seed: base seed, shared by all ranks.
        num_replicas: number of ranks; default: the torch.distributed world size, else 1.
        rank: this rank; default: the torch.distributed rank, else 0.
        drop_last: drop a last incomplete batch.
    """

    def __init__(
        self,
        dims: Sequence[int],
        volumes_per_batch: int = 2,
        images_per_batch: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = True,
    ) -> None:
        if num_replicas is None or rank is None:
            dist = torch.distributed
            initialised = dist.is_available() and dist.is_initialized()
            num_replicas = (
                num_replicas if num_replicas is not None else (dist.get_world_size() if initialised else 1)
            )
            rank = rank if rank is not None else (dist.get_rank() if initialised else 0)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        dims = [int(v) for v in dims]
        self.volumes = [i for i, v in enumerate(dims) if v == 3]
        self.images = [i for i, v in enumerate(dims) if v == 2]
        if len(self.volumes) + len(self.images) != len(dims):
            raise ValueError("every 'dims' must be 2 or 3")
        self.per_batch = {"volumes": volumes_per_batch if self.volumes else 0,
                          "images": images_per_batch if self.images else 0}  # fmt: skip
        if self.per_batch["volumes"] + self.per_batch["images"] <= 0:
            raise ValueError(
                f"empty batches: {len(self.volumes)} volume(s) with volumes_per_batch={volumes_per_batch}, "
                f"{len(self.images)} image(s) with images_per_batch={images_per_batch}"
            )
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Set the epoch (it seeds the permutation and the augmentations); the next iteration over the
        sampler yields the epoch's batches from number ``start_batch`` on (a run resumed mid-epoch)."""
        check_int("start_batch", start_batch, 0)
        self.epoch, self.start_batch = epoch, start_batch

    def _share(self, indices: list[int]) -> int:
        return math.ceil(len(indices) / self.num_replicas)

    def _num_batches(self, kind: str, indices: list[int]) -> float:
        per = self.per_batch[kind]
        if per == 0:
            return 0
        share = self._share(indices)
        return share // per if self.drop_last else math.ceil(share / per)

    def __len__(self) -> int:
        return int(max(self._num_batches("volumes", self.volumes), self._num_batches("images", self.images)))

    def _stream(self, indices: list[int], rng: np.random.Generator) -> Iterator[tuple[int, int]]:
        """This rank's share of ``indices``, repeated with fresh permutations forever, as ``(index,
        position)``; the position counts every rank's items of the stream, so it is the same whatever the
        number of processes."""
        start = 0
        while True:
            order = [indices[i] for i in rng.permutation(len(indices))] if self.shuffle else list(indices)
            total = self._share(indices) * self.num_replicas
            order = (order * (total // max(len(order), 1) + 1))[:total]  # wrap to equal shares
            for position in range(self.rank, total, self.num_replicas):
                yield order[position], start + position
            start += total

    def __iter__(self) -> Iterator[list[SampleKey]]:
        rng = np.random.default_rng(self.seed + self.epoch)
        streams = {"volumes": self._stream(self.volumes, rng), "images": self._stream(self.images, rng)}
        for number in range(len(self)):
            batch: list[SampleKey] = []
            for kind_id, kind in enumerate(("volumes", "images")):
                for _ in range(self.per_batch[kind]):
                    index, position = next(streams[kind])
                    batch.append(SampleKey(index, item_seed(self.seed, self.epoch, kind_id, position)))
            if number >= self.start_batch:  # earlier batches are drawn all the same: the streams stay in step
                yield batch


def validate_item(item: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Check one pipeline output before collation; raise :class:`BadInputError` naming its file.

    Args:
        item: the transformed dict (``views``, ``num_slices``, ``index``, ``dims``, ``source``).
        expected: per kind (``"volume"``/``"image"``), the view shape the first item of the batch had.
    """
    source = item.get("source", f"dataset item {item.get('index', '?')}")
    views = item.get("views")
    if not isinstance(views, (list, tuple)) or len(views) < 2:
        raise BadInputError(
            source, "transformed item has no list of (at least 2) views; check the transforms"
        )
    if "index" not in item:
        raise BadInputError(source, "transformed item has no dataset 'index'")
    shape = tuple(views[0].shape)
    kind = "volume" if len(shape) == 4 else "image" if len(shape) == 3 else None
    if kind is None:
        raise BadInputError(source, f"view of shape {shape}: expected (C, S, H, W) or (C, H, W)")
    for v in views:
        if tuple(v.shape) != shape:
            raise BadInputError(source, f"views differ in shape: {shape} vs {tuple(v.shape)}")
        if not torch.isfinite(v).all():
            raise BadInputError(source, "a view holds NaN/Inf values after the transforms")
    if expected and kind in expected and expected[kind] != shape:
        raise BadInputError(
            source,
            f"{kind} views of shape {shape} do not match the batch's {expected[kind]}; set one spatial_size",
        )
    if kind == "volume" and not 1 <= int(item.get("num_slices", 0)) <= shape[1]:
        raise BadInputError(source, f"num_slices={item.get('num_slices')} outside [1, {shape[1]}]")


def collate_joint_ssl(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate transformed items into the :data:`~jointssl_monai.outputs.BATCH_KEYS` dict.

    Volumes (views ``(C, S, H, W)``) and 2D images (views ``(C, H, W)``) are split by their view rank; absent
    parts are ``None``. Items carrying :data:`SKIPPED_KEY` are dropped and listed as ``(file, reason)`` in
    ``skipped_inputs``; when none is left, every other value is ``None`` (an empty batch the trainer passes
    over).

    Raises:
        BadInputError: an item is malformed (the message names its file).
    """
    kept = [it for it in items if SKIPPED_KEY not in it]
    skipped = [(str(it.get("source")), str(it[SKIPPED_KEY])) for it in items if SKIPPED_KEY in it]
    if not kept:  # every item was a skipped bad input: an empty batch, for the trainer to pass over
        logger.warning(
            "every item of a batch was skipped as bad input: %s", [source for source, _ in skipped]
        )
        return {**dict.fromkeys(BATCH_KEYS), "skipped_inputs": skipped}
    expected: dict[str, tuple[int, ...]] = {}
    volumes, images = [], []
    for it in kept:
        validate_item(it, expected)
        shape = tuple(it["views"][0].shape)
        kind = "volume" if len(shape) == 4 else "image"
        expected.setdefault(kind, shape)
        (volumes if kind == "volume" else images).append(it)

    def views(group: list[Mapping[str, Any]], key: str = "views") -> list[torch.Tensor] | None:
        if not group:
            return None
        n = min(len(it[key]) for it in group)
        return [torch.stack([it[key][v] for it in group]) for v in range(n)]

    def index(group: list[Mapping[str, Any]]) -> torch.Tensor | None:
        return torch.as_tensor([int(it["index"]) for it in group], dtype=torch.long) if group else None

    local = None
    if images and all(it.get("local_views") for it in images):
        local = views(images, "local_views")
    batch = {
        "volume_views": views(volumes),
        "num_slices": torch.as_tensor([int(it["num_slices"]) for it in volumes]) if volumes else None,
        "volume_index": index(volumes),
        "image_views": views(images),
        "image_index": index(images),
        "image_local_views": local,
        "skipped_inputs": skipped,
    }
    assert tuple(batch) == BATCH_KEYS  # the contract with the networks and the trainer
    return batch


def split_batch(batch_size: int, image_fraction: float) -> tuple[int, int]:
    """Volumes and 2D images per step for a ``batch_size`` of which ``image_fraction`` are images.

    At least one volume per step (the volume level and masked modelling need one); the images are the
    rounded rest of the fraction.

    Returns:
        ``(volumes_per_batch, images_per_batch)``.
    """
    check_int("batch_size", batch_size, 1)
    check_number("image_fraction", image_fraction, 0, 1)
    return max(1, round(batch_size * (1 - image_fraction))), round(batch_size * image_fraction)
