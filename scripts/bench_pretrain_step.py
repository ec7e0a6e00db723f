"""Benchmark one full pretraining step of the trainer: forward, joint loss, backward, optimiser step.

Runs :class:`jointssl_monai.engines.JointSSLTrainer` on a fixed synthetic batch of the configured shape (data
loading excluded; see ``scripts/bench_data.py`` for the loader) under each autocast setting, and reports the
median step time after a warm-up, the final loss components (all must be finite) and peak GPU memory.

    python scripts/bench_pretrain_step.py --device cuda --config paper --amp none bf16 fp16
    python scripts/bench_pretrain_step.py --device cpu --config small --amp none bf16
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
from ignite.engine import Events

from jointssl_monai.engines import JointSSLTrainer, build_optimizer, iteration_output
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks import JointSSLNet

# "paper" is the authors' model: ResNet-50, 64 slices of 128x128, d_model 640, 4 layers.
CONFIGS = {
    "paper": {
        "backbone": "resnet50", "d_model": 640, "num_layers": 4, "ff_dim": 720, "slices": 64, "size": 128,
        "volumes": 1, "images": 2, "proj_hidden_dim": 2048, "prototypes": 3000,
    },
    "small": {
        "backbone": "resnet18", "d_model": 128, "num_layers": 2, "ff_dim": 256, "slices": 16, "size": 64,
        "volumes": 2, "images": 2, "proj_hidden_dim": 256, "prototypes": 64,
    },
}  # fmt: skip


def synthetic_batch(cfg: dict, generator: torch.Generator) -> dict:
    b, s, hw = cfg["volumes"], cfg["slices"], cfg["size"]
    volume = torch.rand(b, 1, s, hw, hw, generator=generator)
    images = torch.rand(cfg["images"], 1, hw, hw, generator=generator)
    return {
        "volume_views": [volume, volume.flip(-1)],
        "num_slices": torch.full((b,), s, dtype=torch.long),
        "volume_index": torch.arange(b),
        "image_views": [images, images.flip(-2)] if cfg["images"] else None,
        "image_index": torch.arange(b, b + cfg["images"]) if cfg["images"] else None,
        "image_local_views": None,
    }


def run_case(cfg: dict, amp: str, device: torch.device, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    net = JointSSLNet.from_settings(
        backbone=cfg["backbone"], d_model=cfg["d_model"], num_layers=cfg["num_layers"], ff_dim=cfg["ff_dim"],
        proj_hidden_dim=cfg["proj_hidden_dim"], intra_prototypes=cfg["prototypes"],
        inter_prototypes=cfg["prototypes"],
    ).to(device)  # fmt: skip
    loss = JointSSLLoss("swav", "swav")
    batch = synthetic_batch(cfg, torch.Generator().manual_seed(0))
    trainer = JointSSLTrainer(
        device=device, max_epochs=1, train_data_loader=[batch] * (warmup + steps), network=net,
        optimizer=build_optimizer(net, "lars"), loss_function=loss, slices_per_sample=cfg["slices"], amp=amp,
    )  # fmt: skip
    times: list[float] = []
    start = [0.0]

    def tick(engine):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start[0] = time.perf_counter()

    def tock(engine):
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start[0])

    trainer.add_event_handler(Events.ITERATION_STARTED, tick)
    trainer.add_event_handler(Events.ITERATION_COMPLETED, tock)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    output = iteration_output(trainer)
    losses = {k: float(v) for k, v in output.items() if k == "loss" or k.startswith("loss_")}
    result = {
        "amp": amp,
        "median_step_s": statistics.median(times[warmup:]),
        "steps_timed": len(times[warmup:]),
        "volumes_per_s": cfg["volumes"] / statistics.median(times[warmup:]),
        "losses": losses,
        "all_finite": all(math.isfinite(v) for v in losses.values()),
    }
    if device.type == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--amp", nargs="+", default=["none", "bf16"], choices=["none", "bf16", "fp16"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output", default="bench_results/pretrain_step.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = CONFIGS[args.config]
    info = {"config": args.config, **cfg, "device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["threads"] = torch.get_num_threads()
    results = [run_case(cfg, amp, device, args.steps, args.warmup) for amp in args.amp]
    for r in results:
        print(f"{args.config} {device} amp={r['amp']}: {r['median_step_s']:.3f} s/step "
              f"({r['volumes_per_s']:.2f} volumes/s), finite={r['all_finite']}, "
              f"peak={r.get('peak_gpu_memory_gib', float('nan')):.2f} GiB, losses={r['losses']}")  # fmt: skip
    path = Path(args.output)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"info": info, "results": results}, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
