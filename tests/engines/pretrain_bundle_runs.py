"""Helpers of the bundle pretraining tests: a small real data set and a tiny model configuration."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from jointssl_monai.data.sources import demo_datalist
from jointssl_monai.workflows import find_bundle_dir, pretrain_command

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


__all__ = ["CONFIGS", "TINY", "bundle_command", "history", "run_bundle", "small_real_datalist"]
