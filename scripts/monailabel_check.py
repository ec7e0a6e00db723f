"""The bundle in a real MONAI Label server, checked over HTTP (run by ``scripts/monailabel_check.sh``).

Runs in MONAI Label's own environment (monailabel 0.8.5 with this package installed). It lays out MONAI
Label's stock ``monaibundle`` app with this repository's bundle as ``<app>/model/<name>`` and a local
datastore holding two real T1 volumes (Colin27, and the ITK subject stored twice: as distributed and with
its first two axes swapped), then starts ``monailabel start_server`` on 127.0.0.1 three times:

1. the bundle as released (``models/model.pt`` and the SSL encoder): ``/info/`` lists the model and its
   ``ssl_pretrained`` training option (on); ``/infer`` returns a label map with the input's shape and
   affine, whose Dice against the subject's brain mask is the one ``metadata.json`` reports; the axis-swapped
   copy gives the same labels in physical space; a label upload then ``/train`` starts from the fine-tuned
   ``model.pt`` (the SSL load is skipped: a fine-tuned model always wins) and rewrites it.
2. the bundle without ``model.pt`` (what a user has before any fine-tuning): MONAI Label cannot infer yet, but
   ``/train`` initialises the encoder from the shipped SSL encoder (the server log shows every encoder key
   loaded) and writes ``model.pt``.
3. a restart: ``/infer`` now uses that new model (its labels equal the bundle's own ``inference.json`` run
   with the new weights).

Every server is stopped whatever happens; the server logs stay in ``--workdir``. Exit status 0 only if every
check passed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
import torch

from jointssl_monai.apps.sample_data import find_sample
from jointssl_monai.apps.sample_datalists import binary_mask_file

BUNDLE = Path(__file__).resolve().parents[1] / "bundle"
START_TIMEOUT_S = 300
HTTP_TIMEOUT_S = 900


class CheckFailed(AssertionError):
    """One HTTP check did not hold; the message says which and what was seen."""


def check(condition: bool, what: str) -> None:
    """Record one check: print it, raise :class:`CheckFailed` if it does not hold."""
    print(f"[{'ok' if condition else 'FAILED'}] {what}", flush=True)
    if not condition:
        raise CheckFailed(what)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def monailabel_server(app: Path, studies: Path, model: str, log: Path) -> Iterator[str]:
    """``monailabel start_server`` on 127.0.0.1 with the stock app; yields its base URL; always stopped."""
    port = _free_port()
    command = [
        str(Path(sys.executable).with_name("monailabel")), "start_server", "--app", str(app), "--studies",
        str(studies), "--host", "127.0.0.1", "--port", str(port), "--conf", "models", model,
        "--conf", "zoo_source", "github", "--conf", "sam2", "false", "--conf", "preload", "false",
    ]  # fmt: skip
    # the monailabel launcher runs the first `python` on PATH: this environment's
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with open(log, "w") as handle:
        server = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                raise CheckFailed(f"the server exited with status {server.returncode}; see {log}")
            try:
                if requests.get(f"{url}/info/", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise CheckFailed(f"the server did not answer /info/ within {START_TIMEOUT_S} s; see {log}")
            time.sleep(2)
        print(f"server up at {url} (log: {log})", flush=True)
        yield url
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        print(f"server stopped (exit {server.returncode})", flush=True)


def infer(url: str, model: str, image: str, out: Path) -> nib.Nifti1Image:
    """``POST /infer/<model>?image=<id>&output=image``; the label map it returns, saved to ``out``."""
    reply = requests.post(
        f"{url}/infer/{model}", params={"image": image, "output": "image"}, data={"params": "{}"},
        timeout=HTTP_TIMEOUT_S,
    )  # fmt: skip
    seen = "" if reply.status_code == 200 else f": {reply.text[:300]}"
    check(reply.status_code == 200, f"/infer on {image!r} answers 200 (got {reply.status_code}{seen})")
    out.write_bytes(reply.content)
    return nib.load(str(out))


def train(url: str, model: str, log: Path, **params) -> str:
    """``POST /train/<model>?run_sync=true``; returns what the server logged during the run."""
    start = log.stat().st_size
    reply = requests.post(
        f"{url}/train/{model}", params={"run_sync": "true"}, json=params, timeout=HTTP_TIMEOUT_S
    )
    check(reply.status_code == 200, f"/train answers 200 (got {reply.status_code}: {reply.text[:300]})")
    with open(log) as handle:
        handle.seek(start)
        return handle.read()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float(np.logical_and(a, b).sum()) / float(a.sum() + b.sum())


def _same_geometry(label: nib.Nifti1Image, image: nib.Nifti1Image, what: str) -> None:
    check(label.shape == image.shape, f"{what}: label map shape {label.shape} is the input's {image.shape}")
    check(np.allclose(label.affine, image.affine, atol=1e-3), f"{what}: label map affine is the input's")


def _encoder_key_count() -> int:
    from monai.networks.nets import FlexibleUNet

    backbone = json.loads((BUNDLE / "configs" / "common.json").read_text())["backbone"]
    return len(FlexibleUNet(1, 2, backbone=backbone, spatial_dims=3).encoder.state_dict())


def lay_out(workdir: Path, name: str) -> tuple[Path, Path, dict[str, Path]]:
    """The stock monaibundle app with the bundle as ``model/<name>``, and the datastore's images."""
    stock = Path(sys.prefix) / "monailabel" / "sample-apps" / "monaibundle"
    if not stock.is_dir():
        raise CheckFailed(f"MONAI Label's sample app is not at {stock}")
    app, studies = workdir / "app", workdir / "studies"
    shutil.copytree(stock, app)
    shutil.copytree(BUNDLE, app / "model" / name, ignore=shutil.ignore_patterns("eval", "runs", "logs"))
    studies.mkdir()
    files = {"colin27": studies / "colin27.nii.gz", "subject": studies / "subject.nii.gz"}
    shutil.copyfile(find_sample("colin27_t1"), files["colin27"])
    shutil.copyfile(find_sample("itk_t1"), files["subject"])
    subject = nib.load(str(files["subject"]))
    # the same voxels with the first two array axes swapped, and the affine's columns with them: the same
    # image in physical space, stored in another axis order
    swapped_affine = subject.affine[:, [1, 0, 2, 3]]
    swapped = nib.Nifti1Image(np.asarray(subject.dataobj).transpose(1, 0, 2), swapped_affine)
    files["swapped"] = studies / "subject_swapped.nii.gz"
    nib.save(swapped, str(files["swapped"]))
    files["colin27_mask"] = binary_mask_file(find_sample("colin27_brain"), workdir / "colin27_mask.nii.gz")
    files["subject_mask"] = binary_mask_file(
        find_sample("itk_t1_skullstrip"), workdir / "subject_mask.nii.gz"
    )
    return app, studies, files


def released_bundle(
    url: str, name: str, bundle: Path, files: dict[str, Path], workdir: Path, log: Path
) -> None:
    """Server 1: the released bundle lists, infers, keeps its geometry, and fine-tunes from model.pt."""
    info = requests.get(f"{url}/info/", timeout=30).json()
    check(name in info.get("models", {}), f"/info/ lists the model {name!r}")
    check(name in info.get("trainers", {}), f"/info/ lists the trainer {name!r}")
    options = info["trainers"][name].get("config", {})
    check(options.get("ssl_pretrained") is True, f"training options show ssl_pretrained, on ({options})")

    subject = nib.load(str(files["subject"]))
    labels = infer(url, name, "subject", workdir / "released_subject.nii.gz")
    _same_geometry(labels, subject, "released model")
    predicted = np.asarray(labels.dataobj) > 0
    dice = _dice(predicted, np.asarray(nib.load(str(files["subject_mask"])).dataobj) > 0)
    reported = json.loads((bundle / "configs" / "metadata.json").read_text())["eval_metrics"]["mean_dice"]
    check(dice > 0.5, f"a real segmentation of the brain, not an empty map (Dice {dice:.4f})")
    check(abs(dice - reported) < 0.02, f"Dice through MONAI Label {dice:.4f} is metadata.json's {reported}")

    swapped = infer(url, name, "subject_swapped", workdir / "released_swapped.nii.gz")
    _same_geometry(swapped, nib.load(str(files["swapped"])), "axis-swapped copy")
    back = np.asarray(swapped.dataobj).transpose(1, 0, 2) > 0
    agreement = float((back == predicted).mean())
    check(agreement > 0.999, f"axis-swapped copy: the same labels in physical space ({agreement:.5f} agree)")

    with open(files["colin27_mask"], "rb") as handle:
        reply = requests.put(
            f"{url}/datastore/label", params={"image": "colin27", "tag": "final"},
            files={"label": ("colin27.nii.gz", handle)}, timeout=60,
        )  # fmt: skip
    check(reply.status_code == 200, f"label upload answers 200 (got {reply.status_code}: {reply.text[:300]})")

    model_pt = bundle / "models" / "model.pt"
    before, shipped = _sha256(model_pt), torch.load(model_pt, map_location="cpu", weights_only=True)
    output = train(
        url, name, log, max_epochs=1, val_split=0.0, device="cpu", pretrained=True, ssl_pretrained=True
    )
    check(
        "ssl pretrained encoder: skipped" in output, "with model.pt present, the SSL encoder load is skipped"
    )
    check(_sha256(model_pt) != before, "training rewrote models/model.pt")
    after = torch.load(model_pt, map_location="cpu", weights_only=True)["encoder.conv1.weight"]
    moved = float((after - shipped["encoder.conv1.weight"].float()).abs().max())
    check(
        moved < 0.05, f"it started from the fine-tuned model.pt (first kernel moved {moved:.4f} in one step)"
    )


def ssl_start(url: str, name: str, bundle: Path, log: Path) -> None:
    """Server 2: no model.pt yet; training starts from the shipped SSL encoder and writes model.pt."""
    info = requests.get(f"{url}/info/", timeout=30).json()
    check(name in info.get("trainers", {}), f"without model.pt, /info/ still lists the trainer {name!r}")
    output = train(
        url, name, log, max_epochs=1, val_split=0.0, device="cpu", pretrained=True, ssl_pretrained=True
    )
    keys = _encoder_key_count()
    check(
        f"ssl pretrained encoder: loaded {keys} keys" in output,
        f"the log shows all {keys} encoder keys loaded",
    )
    model_pt = bundle / "models" / "model.pt"
    check(model_pt.is_file(), "training wrote models/model.pt")
    ssl = torch.load(bundle / "models" / "ssl" / "encoder.pt", map_location="cpu", weights_only=True)
    kernel = torch.load(model_pt, map_location="cpu", weights_only=True)["encoder.conv1.weight"]
    # the 2D kernel inflated by its mean over depth: summed over depth it gives the 2D kernel back
    gap = float((kernel.sum(-1) - ssl["conv1.weight"]).abs().max())
    check(gap < 0.05, f"model.pt's encoder starts from the SSL encoder (first kernel within {gap:.4f})")


def restarted(url: str, name: str, bundle: Path, files: dict[str, Path], workdir: Path) -> None:
    """Server 3: after a restart /infer serves the newly trained model.pt."""
    info = requests.get(f"{url}/info/", timeout=30).json()
    check(name in info.get("models", {}), f"after the restart /info/ lists the model {name!r}")
    labels = infer(url, name, "subject", workdir / "new_subject.nii.gz")
    _same_geometry(labels, nib.load(str(files["subject"])), "new model")
    expected_dir = workdir / "bundle_inference"
    datalist = json.dumps([{"image": str(files["subject"])}])
    config = bundle / "configs" / "inference.json"
    subprocess.run(
        [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config),
         "--bundle_root", str(bundle), "--output_dir", str(expected_dir), "--datalist", datalist],
        check=True, capture_output=True,
    )  # fmt: skip
    expected = np.asarray(nib.load(str(expected_dir / "subject_seg.nii.gz")).dataobj) > 0
    agreement = float(((np.asarray(labels.dataobj) > 0) == expected).mean())
    check(
        agreement > 0.999, f"/infer uses the new model.pt: {agreement:.5f} of voxels as inference.json gives"
    )
    released = np.asarray(nib.load(str(workdir / "released_subject.nii.gz")).dataobj) > 0
    check(bool((released != expected).any()), "and not the released one (their label maps differ)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--workdir", default=None, help="where the app, datastore and logs go (default: temp)"
    )
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="monailabel-check-")).absolute()
    if workdir.exists() and any(workdir.iterdir()):
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = json.loads((BUNDLE / "configs" / "metadata.json").read_text())["name"]
    app, studies, files = lay_out(workdir, name)
    bundle = app / "model" / name
    started = time.perf_counter()
    try:
        log = workdir / "server1.log"
        with monailabel_server(app, studies, name, log) as url:
            released_bundle(url, name, bundle, files, workdir, log)
        (bundle / "models" / "model.pt").unlink()
        log = workdir / "server2.log"
        with monailabel_server(app, studies, name, log) as url:
            ssl_start(url, name, bundle, log)
        with monailabel_server(app, studies, name, workdir / "server3.log") as url:
            restarted(url, name, bundle, files, workdir)
    except CheckFailed as failure:
        print(f"monailabel_check: FAILED: {failure} (logs in {workdir})", file=sys.stderr)
        sys.exit(1)
    print(
        f"monailabel_check: every check passed in {time.perf_counter() - started:.0f} s (logs in {workdir})"
    )


if __name__ == "__main__":
    main()
