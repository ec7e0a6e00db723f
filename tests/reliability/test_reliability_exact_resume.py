"""Exact resume: a pretraining run killed with SIGKILL in the middle of an epoch and resumed with
``--resume True`` ends with the same weights as an uninterrupted run of the same length (deterministic CPU
settings), and proves that it resumed: its ``runs/pretrain/provenance.json`` record names the checkpoint it
loaded, the iteration it started at and how many it ran (a resume that silently started over would end at
the same weights too, the runs being deterministic).

What makes it exact: checkpoints at every epoch end hold the network, optimiser, schedule, trainer counters,
the DeepCluster-v2 banks/assignments/centroids and k-means counter (its seed is ``seed + clusterings``) and
the torch/NumPy/Python random state; the augmentations are reseeded from ``(seed, epoch, rank)`` at each epoch
start, so the epoch cut short by the kill is replayed identically.

The kill is deterministic: a handler added by an extra config sends SIGKILL to its own process when a given
iteration in the middle of epoch 3 completes, so the run always dies after the checkpoints of epochs 1 and 2.

Mid-epoch resume: with iteration checkpoints (``checkpoint_iteration_interval``), 2 persistent loader workers
and a memory cache, the run is killed right after a checkpoint written inside epoch 3; the resumed run starts
at that iteration, draws the rest of the epoch's batches with the uninterrupted run's augmentations (every
item's seed comes with its index from the sampler), skips the clustering that opened the epoch, and ends at
the uninterrupted weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "engines"))  # the bundle-run helpers live there
from pretrain_bundle_runs import bundle_command, history, run_bundle, small_real_datalist

pytestmark = pytest.mark.slow

MAX_EPOCHS = 4
SETTINGS = {"max_epochs": MAX_EPOCHS, "checkpoint_interval": 1, "cache": "memory", "num_workers": 0}
DEEPCLUSTER = {"intra_method": "deepcluster", "inter_method": "deepcluster", "intra_prototypes": 6}
SWAV = {"intra_method": "swav", "inter_method": "swav"}
MID_EPOCH = {"checkpoint_iteration_interval": 2, "num_workers": 2, "persistent_workers": True}
CASES = {
    "deepcluster": {**SETTINGS, **DEEPCLUSTER},
    "swav": {**SETTINGS, **SWAV},
    # the default volume level (DeepCluster-v2) and slice level (SwAV), checkpoints inside the epoch, workers
    "mid_epoch_workers": {**SETTINGS, **MID_EPOCH},
}
KILL_HANDLER = """
import os
import signal

from ignite.engine import Events


class KillAt:
    \"\"\"SIGKILL of the own process when iteration ``iteration`` completes (no clean-up of any kind).\"\"\"

    def __init__(self, iteration):
        self.iteration = iteration

    def attach(self, engine):
        engine.add_event_handler(
            Events.ITERATION_COMPLETED(once=self.iteration), lambda _: os.kill(os.getpid(), signal.SIGKILL)
        )
"""


def _final(root: Path) -> dict:
    return torch.load(root / "models" / "ssl" / "checkpoints" / "checkpoint_final.pt", weights_only=True)


def _runs(root: Path) -> list[dict]:
    return json.loads((root / "runs" / "pretrain" / "provenance.json").read_text())["runs"]


def _killed_at(root: Path, iteration: int, datalist: str, case: str) -> int:
    """Run the bundle with a handler that kills it when ``iteration`` completes; return its exit status."""
    (root / "kill_at.py").write_text(KILL_HANDLER)
    extra = root / "kill_at.json"
    extra.write_text(json.dumps({
        "kill_at": {"_target_": "kill_at.KillAt", "iteration": iteration},
        "train#run_handlers": "$@train#handlers + @train#rank0_handlers + [@kill_at]",
    }))  # fmt: skip
    command = bundle_command(root, [extra], datalist=datalist, **CASES[case])
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert result.returncode == -signal.SIGKILL, result.stdout[-3000:] + result.stderr[-6000:]
    return result.returncode


@pytest.mark.parametrize("case", sorted(CASES))
def test_sigkill_mid_epoch_then_resume_loads_the_checkpoint_and_gives_the_uninterrupted_weights(
    case, tmp_path
):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    reference.mkdir(), killed.mkdir()
    run_bundle(reference, datalist=str(small_real_datalist(reference)), **CASES[case])
    expected = _final(reference)
    epoch_length = expected["trainer"]["epoch_length"]
    total = MAX_EPOCHS * epoch_length
    assert expected["trainer"]["iteration"] == total and epoch_length >= 2
    [fresh] = _runs(reference)
    assert fresh["resumed_from"] is None and fresh["start_iteration"] == 0
    assert fresh["iterations_run"] == fresh["end_iteration"] == total and fresh["completed"]

    # Killed in the middle of epoch 3: after the checkpoints of epochs 1 and 2, or (iteration checkpoints)
    # right after one written inside epoch 3.
    datalist = str(small_real_datalist(killed))
    checkpoints = killed / "models" / "ssl" / "checkpoints"
    every = CASES[case].get("checkpoint_iteration_interval", 0)
    kill = 2 * epoch_length + epoch_length // 2
    if every:
        kill = next(i for i in range(2 * epoch_length + 1, 3 * epoch_length) if i % every == 0)
    _killed_at(killed, kill, datalist, case)
    assert not (checkpoints / "checkpoint_final.pt").exists(), "the run was not interrupted"
    saved = sorted(int(p.stem.rsplit("=", 1)[1]) for p in checkpoints.glob("checkpoint_iteration=*.pt"))
    assert saved[-1] == (kill if every else 2 * epoch_length)
    assert every == 0 or saved[-1] % epoch_length, "the newest checkpoint must lie inside an epoch"
    assert [e["epoch"] for e in history(killed)] == [1, 2]
    [interrupted] = _runs(killed)
    assert interrupted["resumed_from"] is None and not interrupted["completed"]

    run_bundle(killed, datalist=datalist, resume=True, **CASES[case])
    # It resumed: loaded the newest checkpoint on disk, started at its iteration and ran only the rest.
    first, resumed_run = _runs(killed)
    assert first == interrupted
    start = saved[-1]
    assert resumed_run["resumed_from"] is not None
    assert (
        Path(resumed_run["resumed_from"]).resolve()
        == (checkpoints / f"checkpoint_iteration={start}.pt").resolve()
    )
    assert resumed_run["start_iteration"] == start > 0 and resumed_run["start_epoch"] == start // epoch_length
    assert resumed_run["iterations_run"] == total - start
    assert resumed_run["end_iteration"] == total and resumed_run["completed"]
    assert [e["epoch"] for e in history(killed)] == list(range(1, MAX_EPOCHS + 1))

    resumed = _final(killed)
    assert resumed["trainer"]["iteration"] == expected["trainer"]["iteration"]
    assert resumed["network"].keys() == expected["network"].keys()
    for key, value in expected["network"].items():
        torch.testing.assert_close(resumed["network"][key], value, rtol=0, atol=1e-6, msg=f"{key} ({saved})")
    # the clustering state too: DeepCluster-v2 banks, assignments, centroids; SwAV queues
    for key, value in expected["loss"].items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(resumed["loss"][key], value, rtol=0, atol=1e-6, msg=key)
