"""Benchmark: pretraining loader throughput (volumes/s, slices/s), 0, 1 and 2 workers, with and without cache.

Real volumes (Colin27 T1 and the ITK example subject) are copied a few times into a temporary folder to make a
dataset. Each configuration runs one warm-up epoch, then ``--repeats`` timed epochs; the median is reported.
``--step-seconds`` (the measured time of one pretraining step for the same configuration) adds the rate at
which training consumes volumes, so the table shows whether the loader keeps up.

    python scripts/bench_data.py --copies 3 --repeats 3 --output bench_results/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jointssl_monai.apps.sample_data import find_sample
from jointssl_monai.data import build_pretrain_dataset, build_pretrain_loader


def _dataset_folder(root: Path, copies: int) -> list[dict]:
    entries = []
    for name in ("colin27_t1", "itk_t1"):
        src = find_sample(name)
        for k in range(copies):
            dst = root / f"{name}_{k}.nii.gz"
            shutil.copy(src, dst)
            entries.append({"image": str(dst), "dims": 3, "modality": "MR"})
    return entries


def _run(entries, args, cache: str, workers: int, cache_dir: Path) -> dict:
    start = time.perf_counter()
    dataset = build_pretrain_dataset(
        entries, num_slices=args.num_slices, spatial_size=tuple(args.spatial_size), cache=cache,
        cache_dir=cache_dir, seed=0,
    )  # fmt: skip
    build_s = time.perf_counter() - start
    loader = build_pretrain_loader(
        dataset,
        volumes_per_batch=args.batch_volumes,
        num_workers=workers,
        persistent_workers=True,
        drop_last=False,
    )
    epochs = []
    volumes = slices = 0
    for epoch in range(args.repeats + 1):  # epoch 0 warms up (worker start, disk cache fill)
        loader.batch_sampler.set_epoch(epoch)
        start = time.perf_counter()
        volumes = slices = 0
        for batch in loader:
            volumes += int(batch["num_slices"].numel())
            slices += int(batch["num_slices"].sum())
        if epoch:
            epochs.append(time.perf_counter() - start)
    epoch_s = statistics.median(epochs)
    row = {
        "cache": cache,
        "workers": workers,
        "build_s": round(build_s, 3),
        "epoch_s": round(epoch_s, 3),
        "volumes_per_s": round(volumes / epoch_s, 3),
        "slices_per_s": round(slices / epoch_s, 1),
    }
    if args.step_seconds:  # what a training step of --batch-volumes volumes consumes
        consumed = args.batch_volumes / args.step_seconds
        row["step_consumes_volumes_per_s"] = round(consumed, 3)
        row["loader_over_consumption"] = round(row["volumes_per_s"] / consumed, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=3, help="copies of each real volume in the dataset")
    parser.add_argument("--num-slices", type=int, default=64)
    parser.add_argument("--spatial-size", type=int, nargs=2, default=(128, 128))
    parser.add_argument("--batch-volumes", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=(0, 1, 2))
    parser.add_argument("--caches", nargs="+", default=("none", "memory"), choices=("none", "memory", "disk"))
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument(
        "--step-seconds", type=float, default=None,
        help="seconds of one pretraining step on --batch-volumes volumes (adds a consumption column)",
    )  # fmt: skip
    parser.add_argument(
        "--torch-threads", type=int, default=None,
        help="intra-op threads of the main process (loader workers always use 1); default: torch's choice",
    )  # fmt: skip
    parser.add_argument("--output", default="bench_results/data.json")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        entries = _dataset_folder(Path(tmp), args.copies)
        for cache in args.caches:
            for workers in args.workers:
                row = _run(entries, args, cache, workers, Path(tmp) / f"cache_{workers}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    result = {
        "config": {
            "volumes": len(entries), "num_slices": args.num_slices, "spatial_size": list(args.spatial_size),
            "batch_volumes": args.batch_volumes, "repeats": args.repeats, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "step_seconds": args.step_seconds,
            "malloc": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        },
        "rows": rows,
    }  # fmt: skip
    print(f"\n{'cache':>7} {'workers':>7} {'build s':>8} {'epoch s':>8} {'volumes/s':>10} {'slices/s':>9}")
    for r in rows:
        cells = (r["cache"], r["workers"], r["build_s"], r["epoch_s"], r["volumes_per_s"], r["slices_per_s"])
        print(" ".join(f"{c:>{w}}" for c, w in zip(cells, (7, 7, 8, 8, 10, 9), strict=True)))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
