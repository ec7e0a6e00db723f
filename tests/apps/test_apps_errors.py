"""User errors end a command with one line and exit status 2: in the ``jointssl`` commands, in the bundle run
that ``jointssl pretrain`` starts (a bad file met by a loader worker in the middle of training), and as the
last line of ``python -m monai.bundle run``'s own output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jointssl_monai.apps.bundle_commands import find_bundle_dir, pretrain_command
from jointssl_monai.apps.cli import main
from jointssl_monai.apps.sample_data import demo_datalist
from jointssl_monai.data import BadInputError, build_pretrain_dataset, build_pretrain_loader
from jointssl_monai.utils.errors import error_summary

TINY_RUN = {
    "max_epochs": 1, "warmup_epochs": 0, "backbone": "resnet10", "num_slices": 4, "spatial_size": [32, 32],
    "d_model": 32, "num_layers": 1, "ff_dim": 32, "proj_hidden_dim": 32, "proj_dim": 16,
    "intra_prototypes": 8, "inter_prototypes": 2, "batch_size": 4, "num_workers": 2, "cache": "none",
}  # fmt: skip


@pytest.fixture(scope="module")
def truncated_datalist(tmp_path_factory) -> tuple[Path, Path]:
    """The demo's small real images plus a real NIfTI volume cut in half (its header reads, its data not)."""
    folder = tmp_path_factory.mktemp("errors")
    entries = [e for e in demo_datalist() if e["sample"] != "colin27_t1"]
    source = next(Path(e["image"]) for e in entries if str(e["image"]).endswith(".nii.gz"))
    truncated = folder / "truncated.nii.gz"
    truncated.write_bytes(source.read_bytes()[: source.stat().st_size // 2])
    path = folder / "datalist.json"
    path.write_text(
        json.dumps({"training": [*entries, {"image": str(truncated), "dims": 3, "modality": "MR"}]})
    )
    return path, truncated


def test_summary_digs_the_users_message_out_of_wrappers_and_workers(tmp_path):
    bad = BadInputError("a.nii.gz", "unreadable image (EOFError: ...)")
    try:
        try:
            raise bad
        except BadInputError as err:
            raise RuntimeError("Failed to instantiate component 'train#trainer'") from err
    except RuntimeError as wrapped:
        assert error_summary(wrapped) == (2, "error: a.nii.gz: unreadable image (EOFError: ...)")
    # a loader worker's error arrives as text (torch re-raises it as a RuntimeError)
    missing = tmp_path / "missing.nii.gz"
    dataset = build_pretrain_dataset([{"image": str(missing), "dims": 3}], num_slices=4, spatial_size=(8, 8))
    with pytest.raises(RuntimeError) as info:
        next(iter(build_pretrain_loader(dataset, volumes_per_batch=1, num_workers=1)))
    assert "Caught BadInputError in DataLoader worker" in str(info.value)
    code, line = error_summary(info.value)
    assert code == 2 and line.startswith(f"error: {missing}: ") and "\n" not in line
    # a bug is not dressed up as the user's mistake
    code, line = error_summary(ZeroDivisionError("division by zero"))
    assert code == 1 and line.startswith("internal error: ZeroDivisionError: division by zero")


def test_every_command_turns_a_user_error_into_one_line_and_status_2(tmp_path, capsys):
    cases = {
        ("datalist", str(tmp_path / "nowhere")): "does not exist",
        ("export", str(tmp_path / "none.pt")): "does not exist",
        ("pretrain", str(tmp_path / "extra.json")): f"config file {tmp_path / 'extra.json'} does not exist",
        ("report", str(tmp_path / "no_run")): "no_run",
        ("fetch_bundle", "file:///nonexistent.zip", str(tmp_path), "x"): "nonexistent.zip",
    }
    for argv, expected in cases.items():
        with pytest.raises(SystemExit) as info:
            main(list(argv))
        err = capsys.readouterr().err
        assert info.value.code == 2, (argv, err)
        assert err.startswith("jointssl: error: ") and expected in err and err.count("\n") == 1, (argv, err)
    with pytest.raises(FileNotFoundError):  # --debug: the error itself, with its traceback
        main(["export", str(tmp_path / "none.pt"), "--debug"])
    assert "JOINTSSL_DEBUG" not in os.environ  # for this command only


def _run(command: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})  # fmt: skip


@pytest.mark.slow
def test_a_bad_file_met_in_training_ends_jointssl_pretrain_with_one_line(truncated_datalist, tmp_path):
    datalist, truncated = truncated_datalist
    cli = [sys.executable, "-c", "from jointssl_monai.apps.cli import main; main()", "pretrain"]
    args = ["--datalist", str(datalist), "--bundle_root", str(tmp_path / "run")]
    args += [a for k, v in TINY_RUN.items() for a in (f"--{k}", json.dumps(v))]
    result = _run([*cli, *args])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jointssl: error: {truncated}: unreadable image"), last
    assert "Caught BadInputError" in result.stdout  # the run's log still says where it stopped, in one line

    debug = _run([*cli, *args, "--debug"])
    assert debug.returncode == 2 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == last


@pytest.mark.slow
def test_monai_bundle_run_keeps_its_output_and_ends_with_the_message(truncated_datalist, tmp_path):
    datalist, truncated = truncated_datalist
    command = pretrain_command(
        [find_bundle_dir() / "configs" / "pretrain.json"],
        {**TINY_RUN, "datalist": str(datalist), "bundle_root": str(tmp_path / "run")},
    )
    command[2] = "monai.bundle"  # the plain MONAI command line, as a user types it
    result = _run(command)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"jointssl: error: {truncated}: unreadable image"), last
