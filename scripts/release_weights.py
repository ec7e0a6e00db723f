"""Make the weights the bundle ships: the SSL slice encoder and the brain-extraction model fine-tuned from it.

Every released file comes from this script, in four stages (each reads what the one before wrote under
``--workdir``, so a stage can be run again alone):

1. ``pretrain``: the joint objective (slice level, volume level, masked slices) on every real image found
   offline (the value benchmark's data: the held-out ITK subject left out) with the value benchmark's CPU
   model and a ResNet-10 slice encoder (ResNet-10 and ResNet-50 models export to TorchScript, ResNet-18 ones
   do not), for ``--budget_minutes``.
2. ``finetune``: ``configs/train.json`` twice with the same seed: from the SSL encoder (``ssl_pretrained``)
   and from random initialisation, the comparison the model card reports.
3. ``evaluate``: ``configs/evaluate.json`` on both: Dice on the ITK subject, on its original grid.
4. ``record``: copies the encoder (``models/ssl/encoder.pt`` and its card) and the SSL-initialised model
   (``models/model.pt``, stored in float16 to halve its size; loading casts it back) into the bundle, writes
   their sha256 into ``large_files.yml`` with URLs under ``--base_url`` and the measured Dice into
   ``configs/metadata.json``.

    python scripts/release_weights.py                      # all four stages, 2 CPU cores: about 45 min
    python scripts/release_weights.py --stages record --base_url https://huggingface.co/<owner>/<repo>/resolve/main
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from jointssl_monai.apps.bundle_commands import find_bundle_dir, pretrain_command, run_bundle_process
from jointssl_monai.apps.ssl_value import CPU_SETTINGS, pretrain_encoder, value_datalist

#: The released slice encoder: the value benchmark's CPU model with a ResNet-10 (TorchScript-exportable).
RELEASE_SETTINGS = {**CPU_SETTINGS, "backbone": "resnet10"}
#: The files the bundle ships, relative to the bundle root.
ENCODER, ENCODER_CARD, MODEL = "models/ssl/encoder.pt", "models/ssl/encoder.json", "models/model.pt"
STAGES = ("pretrain", "finetune", "evaluate", "record")
#: The project's GitHub releases, one tag per bundle version (``metadata.json``'s ``version``).
RELEASES = "https://github.com/jointssl-monai/jointssl_monai/releases/download"


def _bundle_run(run_id: str, configs: list[Path], overrides: dict[str, Any]) -> float:
    """Run one bundle workflow in a child process; returns its wall time in seconds."""
    start = time.perf_counter()
    run_bundle_process(pretrain_command(configs, overrides, run_id=run_id))
    return time.perf_counter() - start


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mean_dice(eval_dir: Path) -> float:
    """The mean Dice that MONAI's ``MetricsSaver`` wrote to ``metrics.csv`` (``val_mean_dice,value``)."""
    with open(eval_dir / "metrics.csv") as handle:
        rows = {row[0]: float(row[1]) for row in csv.reader(handle) if len(row) == 2}
    return rows["val_mean_dice"]


def pretrain(workdir: Path, budget_minutes: float) -> dict:
    datalist, data = value_datalist(workdir / "datalist.json")
    run = pretrain_encoder(workdir / "pretrain", datalist, budget_minutes * 60, RELEASE_SETTINGS)
    run["last_epoch"] = run.pop("history")[-1]
    run["data"] = {key: value for key, value in data.items() if key != "left_out"}
    return run


def finetune(workdir: Path, bundle: Path, encoder: Path) -> dict:
    """``train.json`` in a copy of the bundle per initialisation (its ``bundle_root``, with the configs)."""
    runs = {}
    for init in ("ssl", "random"):
        root = workdir / f"finetune_{init}"
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(bundle / "configs", root / "configs")
        overrides = {"bundle_root": str(root), "ssl_pretrained": init == "ssl", "ssl_encoder": str(encoder)}
        runs[init] = {"seconds": _bundle_run("training", [root / "configs" / "train.json"], overrides)}
    return runs


def evaluate(workdir: Path) -> dict:
    scores = {}
    for init in ("ssl", "random"):
        root = workdir / f"finetune_{init}"
        configs = [root / "configs" / "train.json", root / "configs" / "evaluate.json"]
        _bundle_run("evaluating", configs, {"bundle_root": str(root), "ssl_pretrained": False})
        scores[init] = _mean_dice(root / "eval")
    return scores


def record(workdir: Path, bundle: Path, base_url: str, summary: dict) -> dict:
    """Copy the weights into the bundle, list them in ``large_files.yml``, write the metrics."""
    source = workdir / "pretrain"
    (bundle / "models" / "ssl").mkdir(parents=True, exist_ok=True)
    for name in (ENCODER, ENCODER_CARD):
        shutil.copyfile(source / name, bundle / name)
    state = torch.load(workdir / "finetune_ssl" / MODEL, map_location="cpu", weights_only=True)
    half = {key: value.half() if value.is_floating_point() else value for key, value in state.items()}
    torch.save(half, bundle / MODEL)
    entries = [
        {"path": name, "url": f"{base_url.rstrip('/')}/{Path(name).name}", "hash_val": _sha256(bundle / name),
         "hash_type": "sha256"}
        for name in (MODEL, ENCODER)
    ]  # fmt: skip
    listing = bundle / "large_files.yml"
    header = "".join(line for line in listing.read_text().splitlines(keepends=True) if line.startswith("#"))
    listing.write_text(header + yaml.safe_dump({"large_files": entries}, sort_keys=False))
    metadata_file = bundle / "configs" / "metadata.json"
    metadata = json.loads(metadata_file.read_text())
    dice = summary["evaluate"]
    metadata["eval_metrics"] = {
        "mean_dice": round(dice["ssl"], 4),
        "mean_dice_random_init": round(dice["random"], 4),
    }
    metadata["eval_metrics_command"] = (
        "python scripts/release_weights.py (evaluate stage: configs/evaluate.json on the ITK example "
        "subject, Dice of the brain on its original grid; mean_dice_random_init: the same training from "
        "random weights)"
    )
    metadata_file.write_text(json.dumps(metadata, indent=4) + "\n")
    return {name: {"bytes": (bundle / name).stat().st_size, "sha256": _sha256(bundle / name)} for name in
            (MODEL, ENCODER, ENCODER_CARD)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/release", help="where every run writes")
    parser.add_argument("--bundle_dir", default=None, help="the bundle that receives the weights")
    parser.add_argument("--budget_minutes", type=float, default=25.0, help="pretraining wall-clock budget")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    parser.add_argument(
        "--base_url",
        default=None,
        help=f"where the release's files are published (large_files.yml URLs); default {RELEASES}/<version>",
    )
    args = parser.parse_args()
    workdir, bundle = Path(args.workdir).absolute(), find_bundle_dir(args.bundle_dir)
    version = json.loads((bundle / "configs" / "metadata.json").read_text())["version"]
    args.base_url = args.base_url or f"{RELEASES}/{version}"
    workdir.mkdir(parents=True, exist_ok=True)
    summary_file = workdir / "release.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    for stage in args.stages.split(","):
        print(f"--- {stage} ---", flush=True)
        if stage == "pretrain":
            summary[stage] = pretrain(workdir, args.budget_minutes)
        elif stage == "finetune":
            summary[stage] = finetune(workdir, bundle, workdir / "pretrain" / ENCODER)
        elif stage == "evaluate":
            summary[stage] = evaluate(workdir)
        elif stage == "record":
            summary[stage] = record(workdir, bundle, args.base_url, summary)
        else:
            parser.error(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")
        summary_file.write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary[stage], indent=2)[:4000], flush=True)


if __name__ == "__main__":
    main()
