"""Two real processes (gloo on CPU): a batch in which every item was a skipped bad input, on one rank only,
makes every rank pass over that step together, exactly as if the step had not been in the data."""

from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from test_engines_trainer import SLICES, batch, tiny_net

from jointssl_monai.engines import JointSSLTrainer, build_optimizer
from jointssl_monai.losses import JointSSLLoss

pytestmark = pytest.mark.multiprocess

EMPTY = dict.fromkeys(batch(0))  # what the collate function gives when every item was skipped


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world: int, port: int, loaders: list[list[dict]], folder: str, name: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=60),  # a rank left waiting fails the test instead of hanging it
    )  # fmt: skip
    try:
        net = tiny_net()
        trainer = JointSSLTrainer(
            device="cpu", max_epochs=1, train_data_loader=loaders[rank],
            network=DistributedDataParallel(net, find_unused_parameters=True),
            optimizer=build_optimizer(net, "sgd", lr=0.1), loss_function=JointSSLLoss(),
            slices_per_sample=SLICES,
        )  # fmt: skip
        trainer.run()
        result = {"iteration": trainer.state.iteration, "skipped": trainer.state.skipped_steps,
                  "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
                  "parameters": [name for name, _ in net.named_parameters()]}  # fmt: skip
        torch.save(result, Path(folder) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run(loaders: list[list[dict]], folder: Path, name: str) -> list[dict]:
    mp.spawn(_train, args=(len(loaders), _free_port(), loaders, str(folder), name), nprocs=len(loaders))
    return [torch.load(folder / f"{name}_rank{r}.pt", weights_only=True) for r in range(len(loaders))]


def test_an_all_bad_batch_on_one_rank_is_skipped_by_every_rank(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with_empty = _run([[batch(0), batch(1), batch(2)], [batch(3), EMPTY, batch(4)]], tmp_path, "empty")
    without = _run([[batch(0), batch(2)], [batch(3), batch(4)]], tmp_path, "without")
    initial = tiny_net().state_dict()
    for rank, result in enumerate(with_empty):
        assert result["iteration"] == 3 and result["skipped"] == 1, rank
        assert without[rank]["skipped"] == 0
        for key, value in result["state"].items():
            # the skipped step left no trace (rank 0 did not train on batch(1) alone), in weights and in the
            # BatchNorm statistics of each rank's own batches; the ranks' weights agree
            torch.testing.assert_close(value, without[rank]["state"][key], rtol=0, atol=1e-7, msg=key)
            if key in result["parameters"]:
                torch.testing.assert_close(value, with_empty[0]["state"][key], rtol=0, atol=0, msg=key)
    moved = max(float((with_empty[0]["state"][k] - v).abs().max()) for k, v in initial.items())
    assert moved > 1e-3  # the two real steps trained
