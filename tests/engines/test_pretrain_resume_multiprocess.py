"""Resuming pretraining after a kill, and the multi-process config (torchrun, gloo on CPU)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from pretrain_bundle_runs import CONFIGS, bundle_command, history, run_bundle, small_real_datalist

from jointssl_monai.utils.checkpoints import latest_checkpoint

pytestmark = pytest.mark.slow

DEEPCLUSTER = {"intra_method": "deepcluster", "inter_method": "deepcluster", "intra_prototypes": 6}


def test_resume_after_kill_continues_with_the_memory_bank(tmp_path, itk_t1):
    datalist = str(small_real_datalist(tmp_path))
    checkpoints = tmp_path / "models" / "ssl" / "checkpoints"
    command = bundle_command(tmp_path, datalist=datalist, max_epochs=4, **DEEPCLUSTER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while len(list(checkpoints.glob("checkpoint_iteration=*.pt"))) < 2:
            assert process.poll() is None, "the run ended before its second checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not (checkpoints / "checkpoint_final.pt").exists(), "the run was not interrupted"
    saved = torch.load(latest_checkpoint(checkpoints), weights_only=True)
    saved_epoch, partial = divmod(saved["trainer"]["iteration"], saved["trainer"]["epoch_length"])
    assert saved_epoch >= 2 and partial == 0
    saved_rows = int(saved["loss"]["intra_loss.written"].sum())
    assert saved_rows > 0

    resumed = run_bundle(tmp_path, datalist=datalist, max_epochs=4, resume=True, **DEEPCLUSTER)
    log = resumed.stdout + resumed.stderr
    # The bank came back from the checkpoint: no refill pass, and the first clustering uses the saved rows.
    assert "memory banks filled" not in log
    first_kmeans = re.search(r"DeepCluster-v2 intra: k-means on (\d+) rows .*\(epoch (\d+)\)", log)
    assert first_kmeans and int(first_kmeans.group(1)) == saved_rows
    assert int(first_kmeans.group(2)) == saved_epoch + 1
    final = torch.load(checkpoints / "checkpoint_final.pt", weights_only=True)
    epoch_length = final["trainer"]["epoch_length"]
    assert final["trainer"]["iteration"] == 4 * epoch_length
    assert [e["epoch"] for e in history(tmp_path)] == [1, 2, 3, 4]


def test_torchrun_two_processes_keep_prototypes_and_centroids_identical(tmp_path, itk_t1):
    datalist = str(small_real_datalist(tmp_path))
    dump = (
        "$torch.save({'state': {k: v for k, v in @network_def.state_dict().items() if 'prototypes' in k}, "
        "'centroids': @loss_function.intra_loss.centroids + @loss_function.inter_loss.centroids}, "
        "@output_dir + '/rank' + str(dist.get_rank()) + '.pt')"
    )
    extra = tmp_path / "dump_per_rank.json"
    extra.write_text(json.dumps({"run": ["$@train#trainer.attach_handlers(@train#run_handlers)",
                                         "$@train#trainer.run()", dump]}))  # fmt: skip
    command = bundle_command(
        tmp_path, [CONFIGS / "multi_gpu_pretrain.json", extra], datalist=datalist, max_epochs=2, **DEEPCLUSTER
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = torchrun + command[1:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    output = tmp_path / "runs" / "pretrain"
    rank0 = torch.load(output / "rank0.pt", weights_only=True)
    rank1 = torch.load(output / "rank1.pt", weights_only=True)
    assert rank0["state"].keys() == rank1["state"].keys() and len(rank0["state"]) == 3 + 3
    for key, value in rank0["state"].items():
        torch.testing.assert_close(value, rank1["state"][key], rtol=0, atol=0, msg=key)
    assert len(rank0["centroids"]) == 3 + 3
    for mine, theirs in zip(rank0["centroids"], rank1["centroids"], strict=True):
        assert mine.abs().sum() > 0
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    # Only rank 0 writes checkpoints, exports and the loss history.
    assert (tmp_path / "models" / "ssl" / "encoder.pt").is_file()
    assert len(history(tmp_path)) == 2


def test_resume_with_two_processes_restores_the_deepcluster_bank(tmp_path, itk_t1):
    """Pretrain one epoch in one process, then continue under torchrun with two (DeepCluster-v2 state is keyed
    by dataset index, so it does not depend on the number of processes)."""
    datalist = str(small_real_datalist(tmp_path))
    run_bundle(tmp_path, datalist=datalist, max_epochs=1, **DEEPCLUSTER)
    checkpoints = tmp_path / "models" / "ssl" / "checkpoints"
    single = torch.load(latest_checkpoint(checkpoints), weights_only=True)

    output = "@output_dir + '/rank' + str(dist.get_rank())"
    state = "{k: v.clone() for k, v in @loss_function.state_dict().items()}"
    extra = tmp_path / "dump_per_rank.json"
    # Runs on STARTED after the CheckpointLoader: the state each rank resumes from.
    on_start = f"lambda e: torch.save({state}, {output} + '_resumed.pt')"
    extra.write_text(json.dumps({"run": [
        "$@train#trainer.attach_handlers(@train#run_handlers)",
        f"$@train#trainer.add_event_handler(jointssl_monai.engines.trainer.Events.STARTED, {on_start})",
        "$@train#trainer.run()",
        f"$torch.save({state}, {output} + '_final.pt')",
    ]}))  # fmt: skip
    command = bundle_command(
        tmp_path, [CONFIGS / "multi_gpu_pretrain.json", extra], datalist=datalist, max_epochs=2, resume=True,
        **DEEPCLUSTER,
    )  # fmt: skip
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *command[1:],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    runs = tmp_path / "runs" / "pretrain"
    saved_loss = single["loss"]
    for rank in (0, 1):
        resumed = torch.load(runs / f"rank{rank}_resumed.pt", weights_only=True)
        for key in ("intra_loss.bank", "intra_loss.written", "intra_loss.assignments", "inter_loss.bank",
                    "inter_loss.assignments", "inter_loss.centroids_0"):  # fmt: skip
            torch.testing.assert_close(
                resumed[key], saved_loss[key], rtol=0, atol=0, msg=f"rank {rank} {key}"
            )
    final0 = torch.load(runs / "rank0_final.pt", weights_only=True)
    final1 = torch.load(runs / "rank1_final.pt", weights_only=True)
    for key, value in final0.items():
        torch.testing.assert_close(value, final1[key], rtol=0, atol=0, msg=key)
    assert int(final0["intra_loss.num_clusterings"]) == int(saved_loss["intra_loss.num_clusterings"]) + 1
    # One epoch of one process, then one epoch of the two-process length.
    saved = torch.load(checkpoints / "checkpoint_final.pt", weights_only=True)
    final = saved["trainer"]
    assert final["iteration"] == 2 * final["epoch_length"]
    # The per-iteration schedule moved to the new units with the trainer.
    assert saved["lr_scheduler"]["last_epoch"] == final["iteration"]
    assert [e["epoch"] for e in history(tmp_path)] == [1, 2]
