"""Bundle configs keep the model-zoo and MONAI Label contract; MONAI Label-safe resampling; datalists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Invertd, Spacingd

from jointssl_monai.apps.sample_datalists import brain_extraction_datalist
from jointssl_monai.transfer import KeySafeSpacingd

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "bundle" / "configs"


def _config(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def test_train_config_has_the_ids_monai_label_overrides():
    train = _config("train.json")
    assert train["training"] == "%run" and train["run"]
    for path in ("train#dataset#data", "train#handlers", "train#trainer#max_epochs", "validate#dataset#data"):
        node = train
        for part in path.split("#"):
            node = node[part]
    assert "device" in train and "network_def" in train and "network" in train
    assert train["ssl_pretrained"] is False  # opt-in
    saver = next(h for h in train["train"]["handlers"] if h["_target_"] == "CheckpointSaver")
    assert saver["final_filename"] == "model.pt" and list(saver["save_dict"]) == ["model"]
    assert train["backbone"] == "resnet50"  # the pretraining backbone


def test_inference_config_has_zoo_keys_and_no_spacingd_on_image():
    inference = _config("inference.json")
    for key in ("network_def", "preprocessing", "inferer", "postprocessing"):
        assert key in inference
    targets = [t["_target_"] for t in inference["preprocessing"]["transforms"]]
    assert "Spacingd" not in targets and "jointssl_monai.transfer.KeySafeSpacingd" in targets
    post = [t["_target_"] for t in inference["postprocessing"]["transforms"]]
    assert post.index("Invertd") < post.index("SaveImaged")


def _volume() -> MetaTensor:
    affine = torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0]))
    image = MetaTensor(torch.rand(1, 10, 12, 8), affine=affine, meta={"filename_or_obj": "x.nii.gz"})
    return image


def test_key_safe_spacingd_survives_monai_label_image_path_and_inverts():
    data = {"image": _volume(), "image_path": "/data/x.nii.gz"}
    with pytest.raises(AttributeError):  # the stock transform fails on MONAI Label's string key
        Spacingd(keys="image", pixdim=(3.0, 3.0, 3.0))(dict(data))
    transform = KeySafeSpacingd(keys="image", pixdim=(3.0, 3.0, 3.0))
    out = transform(dict(data))
    assert out["image_path"] == "/data/x.nii.gz"
    assert tuple(out["image"].shape[1:]) == (7, 8, 8)
    np.testing.assert_allclose(out["image"].pixdim, [3.0, 3.0, 3.0])
    out["pred"] = out["image"].clone()
    restored = Invertd(keys="pred", transform=transform, orig_keys="image")(out)
    assert tuple(restored["pred"].shape[1:]) == (10, 12, 8)


def test_verify_net_in_out_with_metadata():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
         "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json"),
         "--n", "1", "--backbone", "resnet10", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "verified with no error" in result.stdout + result.stderr


def test_default_datalists_derive_brain_masks(tmp_path, colin27_brain, itk_t1, itk_t1_skullstrip):
    train = brain_extraction_datalist("train", tmp_path)
    test = brain_extraction_datalist("test", tmp_path)
    assert (
        Path(test[0]["image"]) == itk_t1
        and "label" not in brain_extraction_datalist("test", tmp_path, False)[0]
    )
    for item, source in ((train[0], colin27_brain), (test[0], itk_t1_skullstrip)):
        mask, src = nib.load(item["label"]), nib.load(str(source))
        np.testing.assert_allclose(mask.affine, src.affine)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), np.asarray(src.dataobj) > 0)
    # a plausible adult brain: 1.0 - 1.8 litres
    test_mask = nib.load(test[0]["label"])
    litres = np.asarray(test_mask.dataobj).sum() * np.prod(test_mask.header.get_zooms()) / 1e6
    assert 1.0 < litres < 1.8
    with pytest.raises(KeyError, match="unknown split"):
        brain_extraction_datalist("val", tmp_path)
