"""The authors' downstream protocol on user data or on the real sample data.

2D U-Net (MONAI ``FlexibleUNet``, ``spatial_dims=2``) with the pretrained slice encoder, trained on the slices
of the training volumes; predictions stacked into volumes; 3D IoU per foreground class; N trials (seeds); mean
and standard deviation (Nguyen et al., AAAI 2023). See ``jointssl_monai.apps.slicewise`` for the layouts.

Examples::

    # BraTS folder (<case>/<case>_flair.nii.gz, <case>_seg.nii.gz), whole tumour, 5 trials
    python scripts/eval_slicewise.py --data /data/BraTS2021 --encoder models/ssl/encoder.pt
    # MMWHS-CT (ct_train/ct_train_1001_image.nii.gz + _label), the 7 structures
    python scripts/eval_slicewise.py --data /data/MMWHS --layout mmwhs --encoder models/ssl/encoder.pt
    # a datalist JSON with "training" and "test" lists
    python scripts/eval_slicewise.py --data datalist.json --encoder models/ssl/encoder.pt
    # the offline sample: brain extraction, train on Colin27, test on the ITK subject
    python scripts/eval_slicewise.py --data sample --encoder models/ssl/encoder.pt --trials 3 --steps 200
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from jointssl_monai.apps.slicewise import protocol_volumes, run_trials


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="BraTS or MMWHS folder, datalist JSON, or 'sample'")
    p.add_argument("--layout", default="auto", choices=["auto", "brats", "mmwhs", "datalist"])
    p.add_argument("--modalities", default="flair", help="BraTS input channels, comma separated")
    p.add_argument("--label-values", default=None, help="label values -> classes 1..K (default: MMWHS or >0)")
    p.add_argument(
        "--encoder", default=None, help="exported SSL encoder (.pt); omit for random initialisation"
    )
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--image-size", type=int, default=128, help="slices are resized to this square (authors: 128)"
    )
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--pixdim", type=float, nargs=3, default=None, help="resample volumes first (mm)")
    p.add_argument("--slice-axis", type=int, default=2, help="spatial axis of the slices in RAS (2: axial)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="for folders: share of cases held out")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--max-cases", type=int, default=None, help="use at most this many cases (quick runs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", default="bench_results/eval_slicewise.json")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    train, test, num_classes = protocol_volumes(
        args.data, layout=args.layout, modalities=args.modalities.split(","),
        label_values=[int(v) for v in args.label_values.split(",")] if args.label_values else None,
        pixdim=args.pixdim, test_fraction=args.test_fraction, split_seed=args.split_seed,
        max_cases=args.max_cases,
    )  # fmt: skip
    result = run_trials(
        train, test, num_classes=num_classes, seeds=list(range(args.trials)), encoder=args.encoder,
        backbone=args.backbone, steps=args.steps, batch_size=args.batch_size, image_size=args.image_size,
        learning_rate=args.learning_rate, slice_axis=args.slice_axis, device=args.device,
    )  # fmt: skip
    result["config"] = vars(args) | {
        "train_cases": [v.name for v in train],
        "test_cases": [v.name for v in test],
    }
    print(
        f"3D IoU {100 * result['iou_mean']:.2f} +/- {100 * result['iou_std']:.2f}, "
        f"Dice {100 * result['dice_mean']:.2f} +/- {100 * result['dice_std']:.2f} "
        f"over {args.trials} trials (encoder: {args.encoder or 'random initialisation'})"
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"saved {output}")
    return result


if __name__ == "__main__":
    main()
