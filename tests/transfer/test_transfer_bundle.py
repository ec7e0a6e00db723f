"""The segmentation bundle on the real images: fine-tune on Colin27 (with the SSL encoder), evaluate and infer
on the ITK subject through ``python -m monai.bundle``, and the MONAI Label warm-start path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import FlexibleUNet, ResNetFeatures

pytestmark = pytest.mark.slow  # about 50 s in all on 2 CPU cores (four short bundle runs)

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"
# tiny but real: resnet10, 32^3 patches, one or two steps
SMALL = ["--backbone", "resnet10", "--roi_size", "[32,32,32]", "--validate#inferer#overlap", "0"]


def _bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _ssl_encoder(path: Path) -> dict[str, torch.Tensor]:
    encoder = ResNetFeatures("resnet10", pretrained=False, spatial_dims=2, in_channels=1)
    for p in encoder.parameters():
        torch.nn.init.normal_(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder.state_dict(), path)
    path.with_suffix(".json").write_text(
        json.dumps({"backbone": "resnet10", "in_channels": 1, "spatial_dims": 2})
    )
    return encoder.state_dict()


@pytest.fixture(scope="module")
def trained_bundle(tmp_path_factory, colin27_t1, colin27_brain, itk_t1, itk_t1_skullstrip):
    root = tmp_path_factory.mktemp("bundle")
    shutil.copytree(CONFIGS, root / "configs")  # a copy of the bundle: its bundle_root holds the configs
    ssl = _ssl_encoder(root / "models" / "ssl" / "encoder.pt")
    log = _bundle(
        "training", "--config_file", str(CONFIGS / "train.json"), "--bundle_root", str(root), *SMALL,
        "--train#trainer#max_epochs", "2", "--val_interval", "2", "--ssl_pretrained", "true", cwd=root,
    )  # fmt: skip
    return root, ssl, log.stdout + log.stderr


def test_training_loads_ssl_encoder_and_saves_model(trained_bundle):
    root, ssl, log = trained_bundle
    n_keys = len(FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3).encoder.state_dict())
    assert f"ssl pretrained encoder: loaded {n_keys} keys" in log
    assert "val_mean_dice" in log
    saved = torch.load(root / "models" / "model.pt", weights_only=True)
    # two AdamW steps (lr 3e-4) move an inflated kernel only slightly: its depth sum is still the SSL kernel
    torch.testing.assert_close(saved["encoder.conv1.weight"].sum(-1), ssl["conv1.weight"], atol=0.05, rtol=0)
    assert (root / "eval" / "sample_labels" / "colin27_brain_mask.nii.gz").is_file()  # derived, not committed


def test_inference_writes_label_map_with_original_geometry(trained_bundle, itk_t1):
    root, _, _ = trained_bundle
    _bundle(
        "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(root),
        "--backbone", "resnet10", "--roi_size", "[32,32,32]", "--inferer#overlap", "0", cwd=root,
    )  # fmt: skip
    out = root / "eval" / "KmeansTest_T1UCharRaw_seg.nii.gz"
    reference, written = nib.load(str(itk_t1)), nib.load(str(out))
    assert written.shape == reference.shape  # 128 x 128 x 62 at 2 x 2 x 3 mm, not the 3 mm working grid
    np.testing.assert_allclose(written.affine, reference.affine, atol=1e-4)
    assert written.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_evaluate_reports_dice_on_original_grid(trained_bundle):
    root, _, _ = trained_bundle
    _bundle(
        "evaluating", "--config_file", f"['{CONFIGS / 'train.json'}','{CONFIGS / 'evaluate.json'}']",
        "--bundle_root", str(root), *SMALL, cwd=root,
    )  # fmt: skip
    summary = (root / "eval" / "val_mean_dice_summary.csv").read_text()
    assert summary.startswith("class,mean")
    dice = float(summary.splitlines()[-1].split(",")[1])
    assert 0.0 <= dice <= 1.0


def test_monai_label_warm_start_keeps_fine_tuned_model(trained_bundle):
    """MONAI Label's call: run('run', init_id=None) with a CheckpointLoader inserted at train#handlers[0]."""
    root, ssl, _ = trained_bundle
    model_pt = root / "models" / "model.pt"
    finetuned = torch.load(model_pt, weights_only=True)  # CheckpointSaver writes the bare state dict
    finetuned["encoder.conv1.weight"].fill_(0.25)  # recognisable, far from the SSL kernel
    torch.save(finetuned, model_pt)
    script = f"""
import monai.bundle
from monai.bundle import ConfigParser
parser = ConfigParser()
parser.read_config({str(CONFIGS / "train.json")!r})
handlers = parser.get("train#handlers")
handlers.insert(0, {{"_target_": "CheckpointLoader", "load_path": {str(model_pt)!r},
                     "load_dict": {{"model": "$@network"}}, "strict": False}})
monai.bundle.run(run_id="run", init_id=None, final_id=None, config_file={str(CONFIGS / "train.json")!r},
                 **{{"bundle_root": {str(root)!r}, "train#handlers": handlers, "train#trainer#max_epochs": 1,
                    "validate#dataset#data": [], "val_interval": 100, "ssl_pretrained": True,
                    "backbone": "resnet10", "roi_size": [32, 32, 32]}})
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert "ssl pretrained encoder: skipped" in log
    after = torch.load(model_pt, weights_only=True)["encoder.conv1.weight"]
    # one more step from the fine-tuned weights, not a reset to the SSL weights
    torch.testing.assert_close(after, torch.full_like(after, 0.25), atol=0.01, rtol=0)
    assert not torch.allclose(after.sum(-1), ssl["conv1.weight"], atol=0.5)
