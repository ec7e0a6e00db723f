"""Output problems are found before training starts: unwritable folder, too little disk for a checkpoint."""

from __future__ import annotations

import io
import shutil
from collections import namedtuple

import pytest
import torch

from jointssl_monai.utils import preflight
from jointssl_monai.utils.checkpoints import atomic_save
from jointssl_monai.utils.preflight import PreflightError, check_output_dir, estimate_checkpoint_bytes
from jointssl_monai.utils.random_state import RandomState


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 32, 3),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3),
        torch.nn.BatchNorm2d(64),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 12 * 12, 10),
    )


def _trained(optimizer_cls) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = _model()
    optimizer = optimizer_cls(model.parameters(), lr=0.1)
    model(torch.randn(2, 1, 16, 16)).sum().backward()
    optimizer.step()  # the optimizer has its moments now
    return model, optimizer


def test_creates_the_folder_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "runs" / "ssl" / "checkpoints"
    assert check_output_dir(out, need_bytes=1024) == out
    assert out.is_dir() and list(out.iterdir()) == []


def test_folder_that_cannot_be_created_is_named(tmp_path):
    blocker = tmp_path / "models"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(PreflightError, match=r"output folder .*models/ssl cannot be created"):
        check_output_dir(blocker / "ssl")
    with pytest.raises(PreflightError, match=r"output folder .*models exists and is not a folder"):
        check_output_dir(blocker)


def test_unwritable_folder_is_named(tmp_path, monkeypatch):
    """A read-only mount cannot be made here (tests may run as root, where chmod does not stop writes),
    so the probe's file creation fails the way a read-only file system makes it fail."""

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(preflight.tempfile, "mkstemp", read_only)
    with pytest.raises(PreflightError, match=r"output folder .*out is not writable: .*Read-only file system"):
        check_output_dir(tmp_path / "out")


def test_too_little_free_disk_names_folder_and_numbers(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(
        PreflightError, match=rf"has .*\({free} bytes\) free, but at least .*\({free + 2**30} bytes\)"
    ):
        check_output_dir(tmp_path, need_bytes=free + 2**30)  # the real disk, asked for 1 GiB more than it has

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda _path: usage(10 * 2**30, 10 * 2**30 - 5000, 5000)
    )
    model, optimizer = _trained(torch.optim.Adam)
    need = estimate_checkpoint_bytes(model, optimizer=optimizer)
    with pytest.raises(PreflightError) as err:
        check_output_dir(tmp_path / "ckpt", need_bytes=need)
    message = str(err.value)
    assert "ckpt has 0.00 GiB (5000 bytes) free" in message
    assert f"({need} bytes) are needed (short by" in message and f"({need - 5000} bytes)" in message
    check_output_dir(tmp_path / "ckpt", need_bytes=5000)  # exactly enough is enough


@pytest.mark.parametrize("optimizer_cls", [torch.optim.SGD, torch.optim.Adam])
def test_estimate_bounds_the_real_checkpoint_size(tmp_path, optimizer_cls):
    model, optimizer = _trained(optimizer_cls)
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": RandomState().state_dict(),
    }
    actual_bytes = atomic_save(checkpoint, tmp_path / "c.pt").stat().st_size
    estimate = estimate_checkpoint_bytes(model, RandomState(), optimizer=optimizer)
    assert actual_bytes <= estimate <= 1.5 * actual_bytes + 2**20
    model_only = estimate_checkpoint_bytes(model)
    if optimizer_cls is torch.optim.Adam:  # two moments per parameter
        assert estimate - model_only > 1.9 * sum(p.numel() * 4 for p in model.parameters())


def test_estimate_counts_each_storage_once_and_whole():
    weight = torch.zeros(1000, 1000)
    tied = {"encoder.weight": weight, "decoder.weight": weight}  # tied weights: stored once
    assert estimate_checkpoint_bytes(tied) == estimate_checkpoint_bytes({"w": weight})
    view = {"first_row": weight[0]}  # torch.save writes the whole storage of a view
    assert estimate_checkpoint_bytes(view) >= weight.numel() * 4
    many_small = {f"bn{i}.running_mean": torch.zeros(1) for i in range(5000)}
    buffer = io.BytesIO()
    torch.save(many_small, buffer)
    assert buffer.tell() <= estimate_checkpoint_bytes(many_small, overhead_bytes=0)
