"""Two pretraining processes (torchrun, gloo on CPU, multi_gpu_pretrain.json) on different data end with the
weights of one process trained on the same global batches, in every key of the state_dict: the gradients are
averaged (prototypes and clustering buffers alone would agree anyway, set from the shared DeepCluster-v2
bank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pretrain_bundle_runs import CONFIGS, bundle_command, small_real_datalist

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

HERE = Path(__file__).resolve().parent

# Whatever would make one process differ from two for reasons other than gradient averaging is switched off
# or made per item here; no key is left out of the comparison.
SETTINGS = {
    "intra_method": "swav",  # Sinkhorn is all-reduced: the codes of the global batch
    "inter_method": "deepcluster",  # one bank and one k-means for all processes
    "intra_queue_length": 0,  # the SwAV queue is per process (as in SwAV)
    "w_mask": 0.0,  # masks come from each process's torch generator, drawn per batch shape
    "network_def#aggregator#dropout": 0.0,  # likewise
    # Every loss is a mean over this process's rows and DDP averages those means, so one process gives the
    # same gradient only with as many rows in every process. The shortest volumes have 3 and 5 slices (with 6,
    # a step of 3 + 1 rows on one rank and 5 + 1 on the other left the weights about 1 % of their step apart).
    "num_slices": 3,
    # AdamW's first steps are g / (|g| + eps): the float rounding of near-zero gradients (weights that only
    # see zero padding) becomes steps of the order of the learning rate (1e-4 apart after 6 steps). SGD's step
    # is linear in the gradient, so the comparison stays at the rounding level.
    "optimizer": "sgd",
    "lr": 0.05,
    "max_epochs": 2,
    # float32: bf16 autocast (the default where the CPU has it) rounds each process's smaller batch
    # differently, which is precision, not the distributed logic this test checks
    "amp": "none",
}
# In both runs: BatchNorm on its running statistics (SyncBatchNorm refuses CPU tensors, and per-process
# batch statistics depend on how the batch is split), augmentations seeded per item instead of per rank, and
# the state_dict (at the start and the end) and the dataset indices of every step saved per process.
WEIGHTS_RUN = {
    "+imports": ["$import pretrain_bundle_runs"],
    "run": [
        "$pretrain_bundle_runs.freeze_batchnorm_statistics(@network_def)",
        "$pretrain_bundle_runs.seed_augmentation_per_item(@train#dataset, "
        "lambda: @train#dataloader.batch_sampler.epoch)",
        "$@train#trainer.attach_handlers(@train#run_handlers)",
        "$pretrain_bundle_runs.save_state_at_end(@train#trainer, @network_def, @output_dir, "
        "pretrain_bundle_runs.pretrain_batch_items)",
        "$@train#trainer.run()",
    ],
}
# Measured: at most 5e-7 between one process and two (float32 sums in another order); weights move by 1e-3
# or more.
ATOL = 1e-5


def _prefix(text: str):
    return lambda message: f"{text}: {message}"


def _run(command: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(HERE), os.environ.get("PYTHONPATH")]))}  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


def test_two_processes_on_different_data_end_with_the_single_process_weights(tmp_path, itk_t1):
    datalist = str(small_real_datalist(tmp_path))
    extra = tmp_path / "weights_run.json"
    extra.write_text(json.dumps(WEIGHTS_RUN))
    single, multi = tmp_path / "single", tmp_path / "multi"
    # 4 volumes and 6 images: 1 volume and 1 image per process and step with two processes, 2 and 2 with one.
    # The batch sampler draws its permutations from seed + epoch whatever the number of processes and deals
    # them out rank::world_size, so step k of the single process loads the items of step k of ranks 0 and 1
    # together (asserted below); 3 steps an epoch either way.
    _run(bundle_command(single, [extra], datalist=datalist, batch_size=4, **SETTINGS))
    command = bundle_command(
        multi, [CONFIGS / "multi_gpu_pretrain.json", extra], datalist=datalist, batch_size=2, **SETTINGS
    )
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *command[1:]])

    one = torch.load(single / "runs" / "pretrain" / "single.pt", weights_only=True)
    ranks = [torch.load(multi / "runs" / "pretrain" / f"rank{r}.pt", weights_only=True) for r in (0, 1)]

    # The ranks load different items at every step, together the items of the single process's step.
    assert len(one["batches"]) == len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == 2 * 3
    for step, (whole, mine, theirs) in enumerate(
        zip(one["batches"], *(r["batches"] for r in ranks), strict=True)
    ):
        for kind in ("volume", "image"):
            assert len(mine[kind]) == len(theirs[kind]) == 1, (step, kind)
            assert not set(mine[kind]) & set(theirs[kind]), (
                f"step {step}: both ranks load {kind} {mine[kind]}"
            )
            assert sorted(mine[kind] + theirs[kind]) == sorted(whole[kind]), (step, kind)

    state = one["state"]
    assert state.keys() == ranks[0]["state"].keys() == ranks[1]["state"].keys()
    for key, value in ranks[0]["state"].items():
        # both ranks apply the same all-reduced gradients: equal bit for bit
        torch.testing.assert_close(
            ranks[1]["state"][key], value, rtol=0, atol=0, msg=_prefix(f"rank 1 vs 0: {key}")
        )
        torch.testing.assert_close(
            value, state[key], rtol=0, atol=ATOL, msg=_prefix(f"two processes vs one: {key}")
        )
    # Not equal by default: every trained part moved by far more than the tolerance.
    for part in (
        "encoder.",
        "aggregator.",
        "intra_head.",
        "inter_head.",
        "intra_prototypes.",
        "inter_prototypes.",
    ):
        moved = max(
            float((v - one["initial"][k]).abs().max()) for k, v in state.items() if k.startswith(part)
        )
        assert moved > 100 * ATOL, part
