"""Exact resume: a pretraining run killed with SIGKILL at a random moment and resumed with ``--resume True``
ends with the same weights as an uninterrupted run of the same length (deterministic CPU settings).

What makes it exact: checkpoints at every epoch end hold the network, optimiser, schedule, trainer counters,
the DeepCluster-v2 banks/assignments/centroids and k-means counter (its seed is ``seed + clusterings``) and
the torch/NumPy/Python random state; the augmentations are reseeded from ``(seed, epoch, rank)`` at each epoch
start, so the epoch cut short by the kill is replayed identically.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "engines"))  # the bundle-run helpers live there
from pretrain_bundle_runs import bundle_command, run_bundle, small_real_datalist

pytestmark = pytest.mark.slow

MAX_EPOCHS = 4
SETTINGS = {"max_epochs": MAX_EPOCHS, "checkpoint_interval": 1, "cache": "memory", "num_workers": 0}
METHODS = {
    "deepcluster": {"intra_method": "deepcluster", "inter_method": "deepcluster", "intra_prototypes": 6},
    "swav": {"intra_method": "swav", "inter_method": "swav"},
}


def _final(root: Path) -> dict:
    return torch.load(root / "models" / "ssl" / "checkpoints" / "checkpoint_final.pt", weights_only=True)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sigkill_at_a_random_iteration_then_resume_gives_the_uninterrupted_weights(method, tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    run_bundle(reference, datalist=str(small_real_datalist(reference)), **SETTINGS, **METHODS[method])
    expected = _final(reference)
    epoch_length = expected["trainer"]["epoch_length"]
    assert expected["trainer"]["iteration"] == MAX_EPOCHS * epoch_length

    datalist = str(small_real_datalist(killed))
    checkpoints = killed / "models" / "ssl" / "checkpoints"
    command = bundle_command(killed, datalist=datalist, **SETTINGS, **METHODS[method])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    delay = random.Random().uniform(0.0, 1.0)  # after the first checkpoint: somewhere in epochs 2-3
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 240
        while not list(checkpoints.glob("checkpoint_iteration=*.pt")):
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 4 minutes"
            time.sleep(0.02)
        time.sleep(delay)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    if (checkpoints / "checkpoint_final.pt").exists():
        pytest.fail(f"the run finished within {delay:.2f} s after its first checkpoint: not interrupted")
    saved = sorted(int(p.stem.rsplit("=", 1)[1]) for p in checkpoints.glob("checkpoint_iteration=*.pt"))
    assert saved and all(i % epoch_length == 0 for i in saved), saved

    run_bundle(killed, datalist=datalist, resume=True, **SETTINGS, **METHODS[method])
    resumed = _final(killed)
    assert resumed["trainer"]["iteration"] == expected["trainer"]["iteration"]
    assert resumed["network"].keys() == expected["network"].keys()
    for key, value in expected["network"].items():
        torch.testing.assert_close(resumed["network"][key], value, rtol=0, atol=1e-6, msg=f"{key} ({saved})")
    # the clustering state too: DeepCluster-v2 banks, assignments, centroids; SwAV queues
    for key, value in expected["loss"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed["loss"][key], value, rtol=0, atol=1e-6, msg=key)
