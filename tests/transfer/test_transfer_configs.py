"""Bundle configs keep the model-zoo and MONAI Label contract; MONAI Label-safe resampling; datalists."""

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
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.nets import FlexibleUNet
from monai.transforms import AsDiscreted, Invertd, Spacingd

from jointssl_monai.apps.bundle_settings import shared_settings
from jointssl_monai.apps.sample_datalists import brain_extraction_datalist
from jointssl_monai.handlers import PretrainedEncoderLoader
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
    saver = next(h for h in train["train"]["handlers"] if h["_target_"] == "CheckpointSaver")
    assert saver["final_filename"] == "model.pt" and list(saver["save_dict"]) == ["model"]


def _parser(root: Path, *names: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(root / "configs" / name) for name in names])
    parser.update({"bundle_root": str(root), **overrides})
    return parser


def test_shared_settings_reach_train_evaluate_and_inference(tmp_path):
    """One edit of configs/common.json changes every config: a train/inference mismatch is an HTTP 500 in
    MONAI Label when it loads models/model.pt."""
    shutil.copytree(CONFIGS, tmp_path / "configs")
    shared = {"backbone": "resnet18", "out_channels": 3, "pixdim": [2.0, 2.5, 3.0], "roi_size": [32, 48, 64]}
    (tmp_path / "configs" / "common.json").write_text(json.dumps(shared))
    expected = FlexibleUNet(1, 3, backbone="resnet18", spatial_dims=3).state_dict()
    for names in (("train.json",), ("train.json", "evaluate.json"), ("inference.json",)):
        parser = _parser(tmp_path, *names, ssl_pretrained=False)
        net = parser.get_parsed_content("network_def")
        assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in expected.items()}
        prefix = "validate#" if names[0] == "train.json" else ""
        transforms = parser.get_parsed_content(f"{prefix}preprocessing").transforms
        (spacing,) = [t for t in transforms if isinstance(t, KeySafeSpacingd)]
        np.testing.assert_allclose(spacing.spacing_transform.pixdim, shared["pixdim"])
        assert list(parser.get_parsed_content(f"{prefix}inferer").roi_size) == shared["roi_size"]
    train = _parser(tmp_path, "train.json", ssl_pretrained=False)
    post = train.get_parsed_content("validate#postprocessing").transforms
    assert [t for t in post if isinstance(t, AsDiscreted)][-1].to_onehot == [3, 3]


def test_ssl_start_is_a_displayable_config_that_monai_label_can_turn_off(tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    train = _parser(tmp_path, "train.json")
    # MONAI Label shows displayable_configs in its training options and sends them back as one dict
    assert train.get_parsed_content("displayable_configs") == {"ssl_pretrained": True}  # on by default
    assert train.get_parsed_content("ssl_pretrained") is True
    off = _parser(tmp_path, "train.json", displayable_configs={"ssl_pretrained": False})
    assert off.get_parsed_content("ssl_pretrained") is False
    handler = off.get_parsed_content("train#handlers")[0]
    assert isinstance(handler, PretrainedEncoderLoader) and not handler.enabled
    with pytest.raises(RuntimeError) as raised:  # on, with no encoder in this bundle copy: refused early
        train.get_parsed_content("train#handlers")
    assert "ssl pretrained encoder" in repr(raised.value.__cause__) and "does not exist" in repr(
        raised.value.__cause__
    )


def test_shared_settings_file_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"configs/common.json not found: bundle_root"):
        shared_settings(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "common.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"common.json must hold a JSON object of settings, not list"):
        shared_settings(tmp_path)
    (tmp_path / "configs" / "common.json").write_text("{")
    with pytest.raises(ValueError, match=r"common.json is not valid JSON"):
        shared_settings(tmp_path)


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
         "--n", "1", "--bundle_root", str(ROOT / "bundle"), "--device", "cpu"],
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
