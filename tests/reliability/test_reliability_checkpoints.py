"""Checkpoints survive kills mid-write, refuse code-running or damaged content, resume from the newest."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import jointssl_monai
from jointssl_monai.utils.checkpoints import atomic_save, latest_checkpoint, safe_load, temp_files_of

REPO_ROOT = str(Path(jointssl_monai.__file__).resolve().parents[1])
NUMEL = 4 * 1024 * 1024  # 16 MiB of float32 per checkpoint: long enough writes for kills to land inside them


def _content(version: int) -> dict:
    return {"version": version, "weight": torch.full((NUMEL,), float(version))}


def _assert_complete(path: Path) -> int:
    """The file at ``path`` loads and is one complete version (every value equals its version number)."""
    loaded = safe_load(path)
    version = loaded["version"]
    assert loaded["weight"].shape == (NUMEL,)
    assert torch.equal(loaded["weight"], torch.full((NUMEL,), float(version))), f"mixed content in {path}"
    return version


def _start_child(script: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, env=env, text=True
    )


def _wait_for_line(child: subprocess.Popen, expected: str) -> None:
    line = child.stdout.readline()  # printed right after the child's imports; "" if it died
    if line.strip() != expected:
        child.kill()
        child.wait()
        raise AssertionError(f"child did not report {expected!r} (got {line!r}, rc={child.poll()})")


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def test_kill_at_random_moments_leaves_a_complete_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    atomic_save(_content(0), path)
    rng = random.Random(20230201)
    versions = [0]
    for _ in range(3):
        start = versions[-1] + 1
        child = _start_child(
            f"""
            import torch
            torch.set_num_threads(1)
            from jointssl_monai.utils.checkpoints import atomic_save
            print("ready", flush=True)
            version = {start}
            while True:
                weight = torch.full(({NUMEL},), float(version))
                atomic_save({{"version": version, "weight": weight}}, {str(path)!r})
                version += 1
            """
        )
        _wait_for_line(child, "ready")
        time.sleep(rng.uniform(0.05, 1.0))
        _kill(child)
        version = _assert_complete(path)
        assert version >= versions[-1], "a kill must never bring back an older checkpoint"
        versions.append(version)
        assert len(temp_files_of(path)) <= 1, "at most the one interrupted write is left behind"
    atomic_save(_content(versions[-1] + 1), path)
    assert _assert_complete(path) == versions[-1] + 1
    assert temp_files_of(path) == [], "a successful save removes leftovers of killed saves"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_kill_in_the_middle_of_a_write_keeps_the_old_file(tmp_path):
    """Deterministic variant: the child stops after writing half of the new checkpoint and is killed there."""
    path = tmp_path / "model_epoch=3.pt"
    atomic_save(_content(3), path)
    child = _start_child(
        f"""
        import io, time
        import torch
        from jointssl_monai.utils import checkpoints

        real_save = torch.save

        def half_save(obj, handle):
            buffer = io.BytesIO()
            real_save(obj, buffer)
            handle.write(buffer.getvalue()[: buffer.tell() // 2])
            handle.flush()
            print("half", flush=True)
            time.sleep(120)

        checkpoints.torch.save = half_save
        checkpoints.atomic_save({{"version": 4, "weight": torch.full(({NUMEL},), 4.0)}}, {str(path)!r})
        """
    )
    _wait_for_line(child, "half")
    leftovers = temp_files_of(path)
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > NUMEL  # the half-written new checkpoint
    _kill(child)
    assert _assert_complete(path) == 3
    assert latest_checkpoint(tmp_path) == str(path)
    with pytest.raises(RuntimeError, match=leftovers[0].name):  # the leftover itself is unusable
        safe_load(leftovers[0])
    atomic_save(_content(5), path)
    assert temp_files_of(path) == []


class _TouchOnLoad:
    """Unpickling an instance calls ``Path.touch(marker)``: stands for any code a malicious file would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["torch_zip", "plain_pickle"])
def test_checkpoint_that_would_run_code_is_refused(tmp_path, container):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"weight": torch.zeros(2)}, "extra": _TouchOnLoad(marker)}
    if container == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(RuntimeError, match=r"evil\.pt") as err:
        safe_load(path)
    assert "weights_only" in str(err.value)
    assert not marker.exists(), "safe_load ran code from the checkpoint"
    if container == "torch_zip":  # proof that the file really runs code when loaded unsafely
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_empty_checkpoint_is_refused_with_its_name(tmp_path):
    path = tmp_path / "empty_epoch=7.pt"
    path.touch()
    with pytest.raises(RuntimeError, match=r"empty_epoch=7\.pt is empty \(0 bytes\)"):
        safe_load(path)
    assert latest_checkpoint(tmp_path) is None


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_or_garbage_checkpoint_is_refused_with_its_name(tmp_path, keep):
    path = tmp_path / "cut.pt"
    torch.save({"weight": torch.arange(10000.0)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(RuntimeError, match=r"cut\.pt"):
        safe_load(path)
    path.write_text("not a checkpoint at all")
    with pytest.raises(RuntimeError, match=r"cut\.pt"):
        safe_load(path)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        safe_load(tmp_path / "missing.pt")


def test_latest_checkpoint_picks_the_highest_number_and_ignores_temp_files(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    for name in ["checkpoint_epoch=2.pt", "checkpoint_epoch=10.pt", "checkpoint_epoch=9.pt"]:
        atomic_save({"name": name}, tmp_path / name)
    (tmp_path / ".checkpoint_epoch=11.pt.x1y2.tmp").write_bytes(b"half")  # killed write
    (tmp_path / "checkpoint_epoch=12.pt.tmp").write_bytes(b"half")  # someone else's temp naming
    (tmp_path / "checkpoint_epoch=13.pt").touch()  # empty: never a resume candidate
    assert Path(latest_checkpoint(tmp_path)).name == "checkpoint_epoch=10.pt"
    assert Path(latest_checkpoint(tmp_path, pattern="*")).name == "checkpoint_epoch=10.pt"
    assert safe_load(latest_checkpoint(tmp_path)) == {"name": "checkpoint_epoch=10.pt"}
