"""Pretraining loader throughput on real volumes (Colin27 T1 and the ITK example subject, copied a few times),
without cache, with the memory cache and with the disk cache, next to what a training step consumes."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from jointssl_monai.apps.sample_data import find_sample
from jointssl_monai.data import build_pretrain_dataset, build_pretrain_loader

__all__ = ["bench_loader", "copy_sample_volumes"]


def copy_sample_volumes(root: Path, copies: int) -> list[dict[str, Any]]:
    """A datalist of ``copies`` copies of each real sample volume, written under ``root``."""
    entries = []
    for name in ("colin27_t1", "itk_t1"):
        source = find_sample(name)
        for k in range(copies):
            target = Path(root) / f"{name}_{k}.nii.gz"
            shutil.copy(source, target)
            entries.append({"image": str(target), "dims": 3, "modality": "MR"})
    return entries


def bench_loader(
    entries: list[dict[str, Any]], num_slices: int, size: int, volumes_per_batch: int, cache: str,
    workers: int, cache_dir: Path, epochs: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Volumes and slices per second over ``epochs`` timed epochs (median) after one warm-up epoch (worker
    start, cache fill)."""
    dataset = build_pretrain_dataset(
        entries, num_slices=num_slices, spatial_size=(size, size), cache=cache, cache_dir=cache_dir, seed=0
    )
    loader = build_pretrain_loader(
        dataset, volumes_per_batch=volumes_per_batch, num_workers=workers, persistent_workers=workers > 0,
        drop_last=False,
    )  # fmt: skip
    times = []
    volumes = slices = 0
    for epoch in range(epochs + 1):
        loader.batch_sampler.set_epoch(epoch)
        start = time.perf_counter()
        volumes = slices = 0
        for batch in loader:
            volumes += int(batch["num_slices"].numel())
            slices += int(batch["num_slices"].sum())
        if epoch:
            times.append(time.perf_counter() - start)
    epoch_s = statistics.median(times)
    return {
        "cache": cache, "workers": workers, "epoch_s": epoch_s, "volumes_per_s": volumes / epoch_s,
        "slices_per_s": slices / epoch_s,
    }  # fmt: skip
