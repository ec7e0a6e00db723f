"""Does the pretraining help? Pretrain on every offline real image, then probe and fine-tune on held-out data.

Pretrains the bundle once per objective of the paper's ablation (``intra``, ``intra+mask``, ``joint``) for a
wall-clock budget each, then scores every encoder against the same network from random initialisation with
paired seeds, beside the trivial baselines (an intensity rule fitted on the same labelled slices; raw-pixel
retrieval). Fine-tuning runs until the training loss stops falling (``LossPlateau``), not for a fixed number
of steps. Every seed's number goes to ``bench_results/ssl_value.json`` as soon as it is measured; at the end
the script prints the table of paired gains with 95 % confidence intervals, the ablation and how each
fine-tuning run ended (see ``jointssl_monai.apps.ssl_value``). On a CUDA GPU the evaluation runs there.

    python scripts/bench_ssl_value.py                           # 2 CPU cores: 10 minutes per objective
    python scripts/bench_ssl_value.py --budget_minutes 120 --settings '{"backbone": "resnet50",
        "spatial_size": [128, 128], "num_slices": 64, "d_model": 640, "batch_size": 32}'   # a GPU
    python scripts/bench_ssl_value.py --datalist my_unlabelled.json    # pretrain on your own images
    python scripts/bench_ssl_value.py --reuse_pretraining             # evaluate the encoders again

Your own labelled task: build a ``SliceTask`` (``jointssl_monai.apps.ssl_value``: a labelled training volume,
test volumes, the number of classes) from your volumes and pass it to :func:`probe_rows` and
:func:`finetune_rows` with the encoders this script wrote under ``--workdir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import monai
import torch

from jointssl_monai.apps.ssl_value import (
    CPU_SETTINGS,
    OBJECTIVES,
    ProbeFeatures,
    SliceTask,
    brain_extraction_task,
    evaluation_device,
    finetune_dice,
    frozen_encoder,
    intensity_rule,
    linear_probe,
    lobes_task,
    pixel_embedding,
    pooled_embedding,
    position_retrieval,
    pretrain_encoder,
    value_datalist,
)
from jointssl_monai.apps.value_report import ablation_table, markdown_table, training_table

#: The probes' encoders and the fine-tuning run here (pretraining picks its device in the bundle).
DEVICE = evaluation_device()


def _sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "monai": monai.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }


Record = Callable[..., None]  # record(task, setting, init, seed, score, **extra): one row of the results


def probe_rows(
    task: SliceTask, encoders: dict[str, str], backbone: str, seeds: list[int], counts: list[int], size: int,
    record: Record,
) -> None:  # fmt: skip
    """Linear probes of every encoder and of frozen random encoders, and the intensity rule, on one task."""
    for init, path in encoders.items():
        features = ProbeFeatures(task, frozen_encoder(backbone, path, 0, DEVICE), size)
        for count in counts:
            for seed in seeds:
                record(task.name, f"probe, {count} slices", init, seed, linear_probe(features, count, seed))
        del features
    for seed in seeds:  # a frozen random encoder per seed: the probe's control
        features = ProbeFeatures(task, frozen_encoder(backbone, None, 1000 + seed, DEVICE), size)
        for count in counts:
            record(task.name, f"probe, {count} slices", "random", seed, linear_probe(features, count, seed))
        del features
    for count in counts:
        for seed in seeds:
            record(
                task.name,
                f"probe, {count} slices",
                "intensity",
                seed,
                intensity_rule(task, count, seed, size),
            )


def finetune_rows(
    task: SliceTask,
    encoder: str,
    backbone: str,
    seeds: list[int],
    counts: list[int],
    size: int,
    record: Record,
) -> None:
    """Fine-tuning to convergence from the joint encoder and from random initialisation, paired by seed, with
    the intensity rule beside them."""
    for count in counts:
        for seed in seeds:
            setting = f"fine-tune, {count} slices"
            record(task.name, setting, "intensity", seed, intensity_rule(task, count, seed, size))
            for init, path in (("ssl", encoder), ("random", None)):
                result = finetune_dice(task, backbone, path, count, seed, size, device=DEVICE)
                record(task.name, setting, init, seed, result.pop("score"), **result)


def retrieval_rows(
    task: SliceTask, encoders: dict[str, str], backbone: str, seeds: list[int], size: int, record: Record
) -> None:
    """Slice retrieval by brain position, Colin27 as the reference, the held-out subject as the query."""
    query = task.test[0]
    for seed in seeds:
        scores = {}
        for init, path in encoders.items():
            embed = pooled_embedding(frozen_encoder(backbone, path, 0, DEVICE))
            scores[init] = position_retrieval(task.train, query, embed, size)
        scores["random"] = position_retrieval(
            task.train, query, pooled_embedding(frozen_encoder(backbone, None, 1000 + seed, DEVICE)), size
        )
        scores["pixels"] = position_retrieval(task.train, query, pixel_embedding, size)
        for init, score in scores.items():
            record("slice position retrieval (ITK subject)", "1-NN, frozen", init, seed, score)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget_minutes", type=float, default=10.0, help="pretraining time per objective")
    parser.add_argument(
        "--objectives", default="joint,intra,intra+mask", help="subset of " + ",".join(OBJECTIVES)
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--label_counts", default="1,2,5")
    parser.add_argument("--size", type=int, default=64, help="slice size of the evaluation (pixels)")
    parser.add_argument("--settings", default="{}", help="JSON overrides of the pretraining settings")
    parser.add_argument(
        "--datalist", default=None, help="your own pretraining datalist (default: offline images)"
    )
    parser.add_argument("--workdir", default="runs/ssl_value")
    parser.add_argument("--output", default="bench_results/ssl_value.json")
    parser.add_argument("--no_finetune", action="store_true", help="probes and retrieval only")
    parser.add_argument(
        "--reuse_pretraining",
        action="store_true",
        help="evaluate the encoders an earlier run of this command left in --workdir instead of pretraining",
    )
    args = parser.parse_args()

    workdir = Path(args.workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    settings = {**CPU_SETTINGS, **json.loads(args.settings)}
    seeds, counts = list(range(args.seeds)), [int(c) for c in args.label_counts.split(",")]
    started = time.perf_counter()
    if args.datalist:
        datalist, data_info = Path(args.datalist).absolute(), {"datalist": args.datalist}
    else:
        datalist, data_info = value_datalist(workdir / "datalist.json")
    print(
        f"pretraining data: {json.dumps({k: v for k, v in data_info.items() if k != 'left_out'})}", flush=True
    )

    runs, encoders = {}, {}
    for objective in args.objectives.split(","):
        run_file = workdir / objective / "value_run.json"
        if args.reuse_pretraining and run_file.exists():
            run = json.loads(run_file.read_text())
            print(f"reusing the '{objective}' encoder of {run_file}", flush=True)
        else:
            print(f"pretraining '{objective}' for {args.budget_minutes} minutes ...", flush=True)
            run = pretrain_encoder(
                workdir / objective, datalist, args.budget_minutes * 60, {**settings, **OBJECTIVES[objective]}
            )
            run["last_epoch"] = run.pop("history")[-1]
            run["sha256"] = _sha256(run["encoder"])
            run_file.write_text(json.dumps(run, indent=2))
        if _sha256(run["encoder"]) != run["sha256"]:
            raise SystemExit(f"{run['encoder']} changed since {run_file} was written; pretrain again")
        runs[objective] = run
        encoders["ssl" if objective == "joint" else f"ssl {objective}"] = run["encoder"]
        print(
            f"  {run['epochs']} epochs, {run['seconds'] / 60:.1f} min; last epoch {run['last_epoch']}",
            flush=True,
        )

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "metric": "3D Dice over the held-out volume (retrieval: 1 - mean position error)",
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": _machine(),
        "budget_minutes": args.budget_minutes,
        "settings": settings,
        "data": data_info,
        "pretraining": runs,
        "rows": [],
    }

    def record(task: str, setting: str, init: str, seed: int, score: float, **extra) -> None:
        # saved after every row: a run stopped early keeps everything it measured
        result["rows"].append(
            {"task": task, "setting": setting, "init": init, "seed": seed, "score": score, **extra}
        )
        result["minutes"] = (time.perf_counter() - started) / 60
        output.write_text(json.dumps(result, indent=2))
        print(f"  {task} | {setting} | {init} | seed {seed}: {score:.4f}", flush=True)

    backbone = settings["backbone"]
    brain, lobes = brain_extraction_task(workdir), lobes_task()
    # the cheap frozen-feature rows of every task first, then fine-tuning (the long part)
    for task in (brain, lobes):
        probe_rows(task, encoders, backbone, seeds, counts, args.size, record)
    retrieval_rows(brain, encoders, backbone, seeds, args.size, record)
    if "ssl" in encoders and not args.no_finetune:
        for task in (brain, lobes):
            finetune_rows(task, encoders["ssl"], backbone, seeds, counts, args.size, record)
    rows = result["rows"]
    tables = [
        markdown_table(rows),
        "The paper's ablation, paired gain over random initialisation with its 95 % interval:",
        ablation_table(rows, list(encoders)),
        "How the fine-tuning runs ended:",
        training_table(rows),
    ]
    output.with_suffix(".md").write_text("\n\n".join(tables) + "\n")
    print("\n\n".join(tables))
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
