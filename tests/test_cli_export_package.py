"""``jointssl export`` and ``jointssl package``: weights for other tools, bundles for download."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from monai.networks.nets import FlexibleUNet

from jointssl_monai.apps.bundle_release import inspect_zip
from jointssl_monai.networks import JointSSLNet

JOINTSSL = Path(sys.executable).with_name("jointssl")
ROOT = Path(__file__).resolve().parents[1]


def test_export_writes_a_3d_flexibleunet_encoder_from_a_pretraining_checkpoint(tmp_path):
    net = JointSSLNet.from_settings(backbone="resnet10", d_model=16, proj_hidden_dim=16, proj_dim=8,
                                    intra_prototypes=4, inter_prototypes=2, num_layers=1, ff_dim=16, heads=2,
                                    dim_head=8)  # fmt: skip
    checkpoint = tmp_path / "checkpoint_final.pt"
    torch.save({"network": net.state_dict(), "trainer": {"iteration": 3}}, checkpoint)
    output = tmp_path / "encoder3d.pt"
    subprocess.run(
        [JOINTSSL, "export", str(checkpoint), "--output", str(output), "--spatial_dims", "3"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    state = torch.load(output, weights_only=True)
    unet = FlexibleUNet(in_channels=1, out_channels=2, backbone="resnet10", spatial_dims=3)
    assert state.keys() == unet.encoder.state_dict().keys()
    unet.encoder.load_state_dict(state, strict=True)
    report = json.loads(output.with_suffix(".json").read_text())
    assert report["backbone"] == "resnet10" and report["loaded"] == len(state) and not report["missing"]
    # The 2D stem, inflated: summing the 3D kernel over depth gives back the pretrained 2D kernel.
    stem_2d = net.encoder.resnet.conv1.weight.detach()
    torch.testing.assert_close(state["conv1.weight"].sum(dim=-1), stem_2d, rtol=1e-5, atol=1e-6)


def test_package_makes_a_model_zoo_zip_with_its_hash(tmp_path):
    output = tmp_path / "bundle.zip"
    result = subprocess.run(
        [JOINTSSL, "package", "--bundle_dir", str(ROOT / "bundle"), "--output", str(output), "--name", "jss"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    top, infos = inspect_zip(output, expected_top="jss")
    names = {info.filename for info in infos}
    assert top == "jss" and "jss/configs/metadata.json" in names and "jss/configs/pretrain.json" in names
    assert not any("/runs/" in n or n.endswith(".pyc") for n in names)
    import hashlib

    assert hashlib.sha256(output.read_bytes()).hexdigest() in result.stdout
    with zipfile.ZipFile(output) as archive:
        assert json.loads(archive.read("jss/configs/metadata.json"))["version"]
