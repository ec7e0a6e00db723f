"""multi_gpu_train.json with two real processes (torchrun, gloo on CPU) on different volumes against one
process trained on the same global batches: every key of the final state_dict agrees (the gradients are
averaged)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
# Helpers that run inside the bundle runs (freeze_batchnorm_statistics, seed_augmentation_per_item, ...).
HELPERS = ROOT / "tests" / "engines"
SMALL = [
    "--backbone", "resnet10", "--roi_size", "[32,32,32]", "--train#trainer#max_epochs", "2",
    "--val_interval", "2", "--validate#inferer#overlap", "0", "--ssl_pretrained", "False",
    # AdamW's first steps are g / (|g| + eps): the float rounding of near-zero gradients becomes steps of up
    # to the learning rate (measured: 7e-6 apart after 2 steps of 3e-4, 1 % of the step). SGD's step is linear
    # in the gradient.
    "--optimizer#_target_", "torch.optim.SGD", "--learning_rate", "0.3",
    # Two training volumes (Colin27 and the ITK subject): with two processes each rank gets one of them.
    "--train#dataset#data",
    "$brain_extraction_datalist('train', @dataset_dir) + brain_extraction_datalist('test', @dataset_dir)",
]  # fmt: skip
# In both runs: BatchNorm on its running statistics (SyncBatchNorm refuses CPU tensors, and per-process batch
# statistics depend on how the batch is split), the random crops and augmentations seeded per volume and epoch
# instead of drawn one after another from each process's stream, and per process the state_dict (start and
# end) and the files and crops of every step saved.
WEIGHTS_RUN = {
    "+imports": ["$import pretrain_bundle_runs"],
    "run": [
        "$pretrain_bundle_runs.freeze_batchnorm_statistics(@network_def)",
        "$pretrain_bundle_runs.seed_augmentation_per_item(@train#dataset, "
        "lambda: @train#trainer.state.epoch)",
        "$pretrain_bundle_runs.save_state_at_end(@train#trainer, @network_def, @bundle_root + '/weights', "
        "pretrain_bundle_runs.supervised_batch_items)",
        "$@train#trainer.run()",
    ],
    "training": "%run",
}
# One process sums every gradient in another order than two processes and an all-reduce. Most keys agree to
# 1e-6 or better; the output bias, whose gradient is a mean of 130k nearly cancelling voxel terms, comes out
# about 2e-4 of its step apart (measured 7e-6 at this learning rate). Hence: 1e-5 plus 0.1 % of how far the
# key moved in training.
ATOL, OF_STEP = 1e-5, 1e-3

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _run(cmd: list[str], cwd: Path) -> str:
    path = os.pathsep.join(filter(None, [str(ROOT), str(HELPERS), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _prefix(text: str):
    return lambda message: f"{text}: {message}"


# torchrun's own entry point, which ships with torch: no console script on PATH needed, so never a skip.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def test_two_process_training_on_different_volumes_matches_single_process(
    tmp_path, colin27_t1, colin27_brain, itk_t1, itk_t1_skullstrip
):
    single, multi = tmp_path / "single", tmp_path / "multi"
    for root in (single, multi):  # each run's bundle_root is a copy of the bundle (configs/common.json)
        shutil.copytree(CONFIGS, root / "configs")
    extra = tmp_path / "weights_run.json"
    extra.write_text(json.dumps(WEIGHTS_RUN))
    # One process: both volumes in one batch (2 random crops each); two processes: one volume (2 crops) per
    # rank and step, from DistributedSampler. One step an epoch either way.
    configs = f"['{CONFIGS / 'train.json'}','{extra}']"
    _run([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs,
          "--bundle_root", str(single), *SMALL, "--train#dataloader#batch_size", "2"],
         cwd=tmp_path)  # fmt: skip
    configs = f"['{CONFIGS / 'train.json'}','{CONFIGS / 'multi_gpu_train.json'}','{extra}']"
    log = _run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
                "--config_file", configs, "--bundle_root", str(multi), *SMALL], cwd=tmp_path)  # fmt: skip
    assert log.count("Train completed, saved final checkpoint") == 1  # only rank 0 saves

    one = torch.load(single / "weights" / "single.pt", weights_only=True)
    ranks = [torch.load(multi / "weights" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # Every step, the ranks crop different volumes, and together what the single process crops.
    assert len(one["batches"]) == len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2
    for step, (whole, mine, theirs) in enumerate(
        zip(one["batches"], *(r["batches"] for r in ranks), strict=True)
    ):
        assert len(set(mine["files"])) == len(set(theirs["files"])) == 1, step
        assert set(mine["files"]) != set(theirs["files"]), f"step {step}: both ranks crop {mine['files']}"
        crops = sorted(
            zip(mine["files"] + theirs["files"], mine["crop_sums"] + theirs["crop_sums"], strict=True)
        )
        expected = sorted(zip(whole["files"], whole["crop_sums"], strict=True))
        assert [f for f, _ in crops] == [f for f, _ in expected], step
        torch.testing.assert_close([s for _, s in crops], [s for _, s in expected], msg=f"step {step}: crops")

    state = one["state"]
    assert state.keys() == ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        # both ranks apply the same all-reduced gradients: equal bit for bit
        torch.testing.assert_close(
            ranks[1]["state"][key], value, rtol=0, atol=0, msg=_prefix(f"rank 1 vs 0: {key}")
        )
        moved = float((state[key] - one["initial"][key]).abs().max())
        torch.testing.assert_close(
            value,
            state[key],
            rtol=0,
            atol=ATOL + OF_STEP * moved,
            msg=_prefix(f"two processes vs one: {key}"),
        )
    # Rank 0's final checkpoint is the state compared here.
    saved = torch.load(multi / "models" / "model.pt", weights_only=True)
    assert saved.keys() == state.keys()
    for key, value in saved.items():
        torch.testing.assert_close(value, ranks[0]["state"][key], rtol=0, atol=0, msg=key)
    # Not equal by default: every part moved by far more than the tolerance.
    for part in ("encoder.", "decoder.", "segmentation_head."):
        moved = max(
            float((v - one["initial"][k]).abs().max()) for k, v in state.items() if k.startswith(part)
        )
        assert moved > 10 * ATOL, part
