"""Does the SSL encoder help? Dice on the ITK subject after the same short fine-tune from SSL and from random
initialisation, over several seeds (the authors' slice-wise protocol: 2D FlexibleUNet, train on Colin27).

The two initialisations are run interleaved per seed (SSL, random, SSL, random, ...) with identical data,
slice sampling and augmentation (same seed), so the paired difference isolates the initialisation.

    python scripts/bench_transfer.py --ssl-encoder models/ssl/encoder.pt --seeds 0 1 2 --steps 300

``--ssl-encoder random`` writes an untrained encoder and uses it as the "SSL" one: a smoke test of the script
(its numbers say nothing about pretraining).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import ResNetFeatures

from jointssl_monai.apps.slicewise import protocol_volumes, run_trials


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--ssl-encoder", required=True, help="exported encoder (.pt), or 'random' for a smoke test"
    )
    p.add_argument("--data", default="sample", help="'sample' (Colin27 -> ITK subject) or a datalist JSON")
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--pixdim", type=float, nargs=3, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="bench_results/transfer.json")
    return p


def _summary(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(min(values)),
            "max": float(max(values))}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    encoder = args.ssl_encoder
    if encoder == "random":
        torch.manual_seed(1234)
        encoder = str(Path(tempfile.mkdtemp()) / "random_encoder.pt")
        torch.save(ResNetFeatures(args.backbone, pretrained=False, spatial_dims=2).state_dict(), encoder)
    train, test, num_classes = protocol_volumes(args.data, pixdim=args.pixdim)
    common = dict(
        num_classes=num_classes, backbone=args.backbone, steps=args.steps, batch_size=args.batch_size,
        image_size=args.image_size, learning_rate=args.learning_rate, device=args.device,
    )  # fmt: skip
    runs: dict[str, list[dict]] = {"ssl": [], "random": []}
    for seed in args.seeds:  # interleaved: A B A B
        runs["ssl"].append(run_trials(train, test, seeds=[seed], encoder=encoder, **common)["trials"][0])
        runs["random"].append(run_trials(train, test, seeds=[seed], encoder=None, **common)["trials"][0])
    pairs = list(zip(runs["ssl"], runs["random"], strict=True))
    result = {
        "config": vars(args) | {"ssl_encoder_used": encoder, "train": [v.name for v in train],
                                "test": [v.name for v in test]},
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.machine(),
        "dice": {k: _summary([t["dice"] for t in v]) for k, v in runs.items()},
        "iou": {k: _summary([t["iou"] for t in v]) for k, v in runs.items()},
        "paired_dice_gain": _summary([a["dice"] - b["dice"] for a, b in pairs]),
        "seconds_per_run": _summary([t["seconds"] for v in runs.values() for t in v]),
        "runs": runs,
    }  # fmt: skip
    for init in ("ssl", "random"):
        d = result["dice"][init]
        spread = f"min {d['min']:.4f}, max {d['max']:.4f}"
        print(f"{init:>6} init: Dice {d['mean']:.4f} +/- {d['std']:.4f} ({spread}) over seeds {args.seeds}")
    gain = result["paired_dice_gain"]
    print(f"paired Dice gain (ssl - random): {gain['mean']:+.4f} +/- {gain['std']:.4f}")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"saved {output}")
    return result


if __name__ == "__main__":
    main()
