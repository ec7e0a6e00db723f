"""The weights the bundle ships: listed with their true hashes, loadable as MONAI's tools load them,
exportable to TorchScript with the same outputs, and what the model card says they are."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigParser
from monai.networks.nets import FlexibleUNet, ResNetFeatures

from jointssl_monai.apps.bundle_release import verify_large_files

BUNDLE = Path(__file__).resolve().parents[2] / "bundle"
CONFIGS = BUNDLE / "configs"


def _network() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    parser["bundle_root"] = str(BUNDLE)
    return parser.get_parsed_content("network_def")


def test_large_files_list_the_shipped_weights_with_their_hashes():
    listing = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    assert sorted(entry["path"] for entry in listing) == ["models/model.pt", "models/ssl/encoder.pt"]
    assert all(entry["url"].startswith("https://") for entry in listing)
    # every file present and equal to its sha256: a retrained file without a new hash fails here
    assert sorted(verify_large_files(BUNDLE)) == sorted((BUNDLE / e["path"]).resolve() for e in listing)


def test_shipped_model_loads_every_key_of_the_inference_network():
    state = torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True)
    net = _network()
    assert set(state) == set(net.state_dict())  # CheckpointLoader and MONAI Label load it strictly
    net.load_state_dict(state)  # stored in float16 (half the size); loading casts to the network's float32
    assert all(v.dtype == torch.float32 for v in net.state_dict().values() if v.is_floating_point())
    torch.testing.assert_close(
        net.state_dict()["encoder.conv1.weight"], state["encoder.conv1.weight"].float()
    )


def test_shipped_encoder_is_the_backbone_of_the_segmentation_network():
    card = json.loads((BUNDLE / "models" / "ssl" / "encoder.json").read_text())
    backbone = json.loads((CONFIGS / "common.json").read_text())["backbone"]
    assert card["backbone"] == backbone and card["spatial_dims"] == 2
    state = torch.load(BUNDLE / "models" / "ssl" / "encoder.pt", map_location="cpu", weights_only=True)
    reference = ResNetFeatures(backbone, pretrained=False, spatial_dims=2, in_channels=1).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in reference.items()}
    unet_encoder = FlexibleUNet(1, 2, backbone=backbone, spatial_dims=3).encoder.state_dict()
    assert set(state) == set(unet_encoder)  # every key has a place in the 3D network (inflated)


@pytest.mark.slow  # about 30 s: TorchScript export of the 3D network
def test_ckpt_export_of_the_shipped_model_gives_the_same_outputs(tmp_path):
    exported = tmp_path / "model.ts"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
         "--ckpt_file", str(BUNDLE / "models" / "model.pt"), "--meta_file", str(CONFIGS / "metadata.json"),
         "--config_file", str(CONFIGS / "inference.json"), "--bundle_root", str(BUNDLE)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    scripted = torch.jit.load(str(exported), map_location="cpu")
    net = _network()
    net.load_state_dict(torch.load(BUNDLE / "models" / "model.pt", map_location="cpu", weights_only=True))
    net.eval()
    image = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(image), net(image), rtol=1e-4, atol=1e-4)
