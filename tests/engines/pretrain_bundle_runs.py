"""Helpers of the bundle pretraining tests: a small real data set and a tiny model configuration.

The last helpers run *inside* bundle runs (``"+imports": ["$import pretrain_bundle_runs"]`` in an extra
config, with this folder on ``PYTHONPATH``); they make the weights of runs with different numbers of processes
comparable (see ``test_pretrain_multiprocess_weights.py`` and ``tests/transfer/test_transfer_multigpu.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from jointssl_monai.apps.bundle_commands import find_bundle_dir, pretrain_command
from jointssl_monai.apps.sample_data import demo_datalist

CONFIGS = find_bundle_dir() / "configs"

# A tiny network and few small slices: a pretraining epoch on the real images takes about a second.
TINY = {
    "backbone": "resnet10",
    "d_model": 32,
    "num_layers": 1,
    "ff_dim": 32,
    "attention_heads": 2,
    "attention_head_dim": 16,
    "proj_hidden_dim": 32,
    "proj_dim": 16,
    "intra_prototypes": 8,
    "inter_prototypes": 2,
    "num_slices": 6,
    "spatial_size": [32, 32],
    "batch_size": 4,
    "warmup_epochs": 1,
    "freeze_prototypes_iterations": 2,
    "optimizer": "adamw",
    "lr": 0.002,
    "weight_decay": 0.0001,
    "cache": "memory",
    "num_workers": 0,
    "log_interval": 1,
}


def small_real_datalist(folder: Path) -> Path:
    """The demo's real images without the large Colin27 volume (4 volumes, 6 images), as a datalist file."""
    entries = [e for e in demo_datalist() if e["sample"] != "colin27_t1"]
    path = folder / "datalist.json"
    path.write_text(json.dumps({"training": entries}))
    return path


def bundle_command(root: Path, extra_configs=(), **overrides) -> list[str]:
    settings = {**TINY, "bundle_root": str(root), **overrides}
    return pretrain_command([CONFIGS / "pretrain.json", *extra_configs], settings)


def run_bundle(
    root: Path, extra_configs=(), timeout: float = 300, **overrides
) -> subprocess.CompletedProcess:
    """Run bundle pretraining in a subprocess; fail with its output if it fails."""
    command = bundle_command(root, extra_configs, **overrides)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    assert result.returncode == 0, f"bundle run failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def history(root: Path) -> list[dict]:
    return json.loads((root / "runs" / "pretrain" / "history.json").read_text())["epochs"]


def freeze_batchnorm_statistics(network: torch.nn.Module) -> None:
    """Make every BatchNorm layer normalise with its running statistics, which then stay at their values.

    For comparisons across process counts only: SyncBatchNorm refuses CPU tensors, and per-process batch
    statistics make the forward pass depend on how the global batch is split. The BatchNorm weights and biases
    still train; the running statistics keep their initial values (and can still be compared).
    """
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # runs inside the module's own call, after every .train() of the trainer; returns None: same input
            module.register_forward_pre_hook(lambda bn, _inputs: setattr(bn, "training", False))


def seed_augmentation_per_item(dataset: Any, epoch: Callable[[], int]) -> None:
    """Seed the dataset's random transforms from (dataset index, epoch) before every item.

    The library seeds one augmentation stream per (epoch, rank) and draws from it item after item, so the
    augmentations of an item depend on the rank that loads it and on what that rank loaded before; this makes
    them a function of the item alone, so that two processes and one process draw the same views.
    """
    transform_item = dataset._transform

    def seeded(index: int) -> Any:
        dataset.transform.set_random_state(seed=(int(epoch()) * 1_000_003 + int(index)) % 2**32)
        return transform_item(index)

    dataset._transform = seeded


def pretrain_batch_items(batch: dict) -> dict:
    """The dataset indices of a collated pretraining batch."""
    return {kind: [] if batch[f"{kind}_index"] is None else batch[f"{kind}_index"].tolist()
            for kind in ("volume", "image")}  # fmt: skip


def supervised_batch_items(batch: dict) -> dict:
    """The files and a fingerprint of the crops of a collated supervised batch."""
    image = batch["image"]
    return {"files": [str(f) for f in image.meta["filename_or_obj"]],
            "crop_sums": image.flatten(1).sum(1).tolist()}  # fmt: skip


def save_state_at_end(trainer: Any, network: torch.nn.Module, folder: str, describe: Callable) -> None:
    """Record the network's state_dict when the run starts and what every iteration loads; when the run
    completes, save both with the final state_dict as ``rank<r>.pt`` (``single.pt`` without a process group)
    in ``folder``."""
    from ignite.engine import Events

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}

    record: dict[str, Any] = {"batches": []}
    trainer.add_event_handler(Events.STARTED, lambda e: record.update(initial=snapshot()))
    trainer.add_event_handler(
        Events.ITERATION_STARTED, lambda e: record["batches"].append(describe(e.state.batch))
    )

    def save(engine: Any) -> None:
        name = f"rank{dist.get_rank()}" if dist.is_available() and dist.is_initialized() else "single"
        Path(folder).mkdir(parents=True, exist_ok=True)
        torch.save({**record, "state": snapshot()}, Path(folder) / f"{name}.pt")

    trainer.add_event_handler(Events.COMPLETED, save)


__all__ = [
    "CONFIGS",
    "TINY",
    "bundle_command",
    "freeze_batchnorm_statistics",
    "history",
    "pretrain_batch_items",
    "run_bundle",
    "save_state_at_end",
    "seed_augmentation_per_item",
    "small_real_datalist",
    "supervised_batch_items",
]
