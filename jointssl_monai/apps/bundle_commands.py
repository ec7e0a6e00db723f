"""Command-line workflows around the bundle: pretraining, and the demo on real images from packages."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jointssl_monai.apps.sample_data import demo_datalist
from jointssl_monai.utils.errors import BRIEF_ENV, ERROR_FILE_ENV

__all__ = [
    "DEMO_OVERRIDES",
    "BundleRunError",
    "export_encoder",
    "find_bundle_dir",
    "pretrain_command",
    "run_bundle_process",
    "run_demo",
]

#: A small configuration of the paper's model that pretrains on the demo images in a few minutes on 2 CPU
#: cores. Everything else (objectives, masking ratio, temperatures, Sinkhorn settings, queues) keeps the
#: defaults of ``bundle/configs/pretrain.json``. Sized to the data: 16 slice prototypes for about 90 slice
#: rows, the volume level's k-means 3 x 2 for 5 volumes, and slices spread over each volume
#: (``random_stride``), so that a step's slices are not near-copies of their neighbours.
DEMO_OVERRIDES: dict[str, Any] = {
    "backbone": "resnet18",
    "d_model": 128,
    "num_layers": 2,
    "ff_dim": 256,
    "proj_hidden_dim": 256,
    "proj_dim": 64,
    "intra_prototypes": 16,
    "inter_prototypes": 2,
    "num_slices": 16,
    "slice_policy": "random_stride",
    "spatial_size": [64, 64],
    "batch_size": 4,
    "max_epochs": 30,
    "warmup_epochs": 1,
    "freeze_prototypes_iterations": 6,
    "cache": "memory",
    "num_workers": 1,
    "log_interval": 3,
}


def find_bundle_dir(bundle_dir: str | os.PathLike | None = None) -> Path:
    """The bundle folder: ``bundle_dir`` if given, else the ``bundle/`` beside the package source."""
    candidate = Path(bundle_dir) if bundle_dir else Path(__file__).resolve().parents[2] / "bundle"
    if not (candidate / "configs" / "pretrain.json").is_file():
        raise FileNotFoundError(
            f"no bundle with configs/pretrain.json at {candidate}; "
            "pass --bundle_dir (the repository's bundle/ folder)"
        )
    return candidate


def _cli_value(value: Any) -> str:
    # MONAI's bundle CLI parses values with python-fire: Python literals, not JSON (``True``, not ``true``).
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, type(None))):
        return str(value)
    return json.dumps(value)


def pretrain_command(
    config_files: Sequence[str | os.PathLike],
    overrides: dict[str, Any],
    tracking: str | None = None,
    run_id: str = "training",
) -> list[str]:
    """The ``python -m monai.bundle run <run_id> ...`` command line for these configs and overrides (through
    :mod:`jointssl_monai.apps.bundle_run`, which adds the one-line error summary); any bundle config and run
    id, ``training`` by default."""
    files = [str(f) for f in config_files]
    command = [sys.executable, "-m", "jointssl_monai.apps.bundle_run", "run", run_id]
    command += ["--config_file", files[0] if len(files) == 1 else json.dumps(files)]
    for key, value in overrides.items():
        command += [f"--{key}", _cli_value(value)]
    if tracking:
        command += ["--tracking", tracking]
    return command


class BundleRunError(RuntimeError):
    """A bundle run failed; :attr:`exit_code` is 2 for a user error (its message says which and why)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_bundle_process(command: Sequence[str]) -> None:
    """Run a bundle command line; raise :class:`BundleRunError` with the run's one-line summary if it fails.

    The run prints no traceback (``JOINTSSL_BRIEF_ERRORS``) unless ``JOINTSSL_DEBUG`` is set, and leaves the
    summary of its error in a temporary file (see :mod:`jointssl_monai.utils.errors`).
    """
    with tempfile.TemporaryDirectory(prefix="jointssl-run-") as folder:
        error_file = Path(folder) / "error.json"
        env = {**os.environ, BRIEF_ENV: "1", ERROR_FILE_ENV: str(error_file)}
        returncode = subprocess.run(list(command), env=env, check=False).returncode
        if returncode == 0:
            return
        if error_file.is_file():
            summary = json.loads(error_file.read_text())
            raise BundleRunError(summary["message"], int(summary["exit_code"]))
    how = f"was killed by signal {-returncode}" if returncode < 0 else f"failed with exit status {returncode}"
    hint = " (out of memory?)" if returncode == -signal.SIGKILL else ""
    raise BundleRunError(f"error: the bundle run {how}{hint}; its output is above", 1)


def run_demo(
    output_dir: str | os.PathLike = "runs/demo",
    bundle_dir: str | os.PathLike | None = None,
    max_epochs: int | None = None,
    report: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Pretrain the bundle on the real demo images and return a summary (also printed by the CLI).

    The demo data set is built from images that ship with installed packages (see
    :data:`jointssl_monai.apps.sample_data.DEMO_SAMPLES`); the run is a real
    ``python -m monai.bundle run training`` of ``bundle/configs/pretrain.json`` with :data:`DEMO_OVERRIDES`
    (and ``overrides``), writing under ``output_dir``; ``report=False`` skips the page of figures.
    """
    bundle = find_bundle_dir(bundle_dir)
    output = Path(output_dir).absolute()
    output.mkdir(parents=True, exist_ok=True)
    entries = demo_datalist()
    datalist = output / "datalist.json"
    datalist.write_text(json.dumps({"training": entries}, indent=2))
    settings = {**DEMO_OVERRIDES, **overrides, "bundle_root": str(output), "datalist": str(datalist)}
    if max_epochs is not None:
        settings["max_epochs"] = int(max_epochs)
    command = pretrain_command([bundle / "configs" / "pretrain.json"], settings)
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    run_bundle_process(command)
    seconds = time.perf_counter() - start
    history = json.loads((output / "runs" / "pretrain" / "history.json").read_text())["epochs"]
    # a page of figures of what the run learned: about 15 s on 2 busy cores, so the demo makes it
    policy = settings.get("slice_policy", "center")
    report_command = f"jointssl report {shlex.quote(str(output))} --output "
    report_command += f"{shlex.quote(str(output / 'report'))} --slice_policy {policy}"
    page = f"not asked for; make it with: {report_command}"
    if report:
        try:
            from jointssl_monai.apps.report import make_report

            page = str(make_report(output, output / "report", slice_policy=policy))
        except Exception as err:  # the run is done and saved: say why there is no page, and how to make it
            page = f"not made ({type(err).__name__}: {err}); make it with: {report_command}"
    return {
        "data": f"{sum(e['dims'] == 3 for e in entries)} volumes and {sum(e['dims'] == 2 for e in entries)} "
        f"2D images ({', '.join(e['sample'] for e in entries)})",
        "minutes": round(seconds / 60, 1),
        "loss_first_epoch": round(history[0]["loss"], 4),
        "loss_last_epoch": round(history[-1]["loss"], 4),
        "encoder_weights": str(output / "models" / "ssl" / "encoder.pt"),
        "encoder_card": str(output / "models" / "ssl" / "encoder.json"),
        "checkpoints": str(output / "models" / "ssl" / "checkpoints"),
        "tensorboard_logs": str(output / "runs" / "pretrain"),
        "loss_history": str(output / "runs" / "pretrain" / "history.json"),
        "report": page,
    }


def export_encoder(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    spatial_dims: int = 2,
    in_channels: int = 1,
    backbone: str | None = None,
    inflate: str = "auto",
):
    """Load the pretrained slice encoder into a ``FlexibleUNet`` of the requested shape and save its encoder.

    The backbone is read from the ``encoder.json`` card beside ``checkpoint`` or recognised from its keys
    unless given. Returns the :class:`~jointssl_monai.transfer.EncoderLoadReport`; also written as JSON next
    to ``output``.
    """
    from monai.networks.nets import FlexibleUNet

    from jointssl_monai.transfer import guess_resnet_name, load_pretrained_encoder
    from jointssl_monai.transfer.loading import extract_encoder_state
    from jointssl_monai.utils.checkpoints import atomic_save, safe_load

    if backbone is None:
        card = Path(checkpoint).with_name("encoder.json")
        if card.is_file():
            backbone = json.loads(card.read_text()).get("backbone")
    if backbone is None:
        probe = FlexibleUNet(1, 2, backbone="resnet18", spatial_dims=2).encoder.state_dict()
        state, _ = extract_encoder_state(safe_load(checkpoint), list(probe))
        backbone = guess_resnet_name(state)
    if backbone is None:
        raise ValueError(f"cannot tell the backbone of {checkpoint}; pass --backbone")
    unet = FlexibleUNet(in_channels, 2, backbone=backbone, spatial_dims=spatial_dims)
    report = load_pretrained_encoder(unet, checkpoint, inflate=inflate)
    path = atomic_save({k: v.detach().cpu() for k, v in unet.encoder.state_dict().items()}, output)
    summary = {"source": str(checkpoint), "backbone": backbone, "spatial_dims": spatial_dims,
               "in_channels": in_channels, "loaded": len(report.loaded), "missing": report.missing,
               "skipped": report.skipped, "transformed": len(report.transformed)}  # fmt: skip
    Path(path).with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return report
