"""2D->3D inflation puts the depth axis where FlexibleUNet(spatial_dims=3) has it, on a real volume.

Pretraining slices are ``(X, Y)`` planes of MONAI's ``(C, X, Y, Z)`` volumes (design decision 7), so the
2D kernels' two axes must land on ``X`` and ``Y`` of the 3D network's input and the inflated taps on
``Z``, the last spatial axis. Then a 3D network fed a volume that is constant along ``Z`` computes, at
every depth, what the pretrained 2D encoder computed on the pretraining slice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.networks.nets import FlexibleUNet, ResNetFeatures
from monai.transforms import Compose

from jointssl_monai.data import build_pretrain_transforms
from jointssl_monai.transfer import load_pretrained_encoder

TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "bundle" / "configs" / "train.json"
PIXDIM = (2.0, 2.0, 2.0)  # no SpatialPadd padding at this spacing: 91 x 109 x 91
DEPTH = 8  # depth of the depth-constant volumes


def _encoder_state(name: str = "resnet10") -> dict[str, torch.Tensor]:
    """A stand-in for an exported SSL slice encoder: random weights, positive batch-norm statistics."""
    generator = torch.Generator().manual_seed(0)
    state = ResNetFeatures(name, pretrained=False, spatial_dims=2, in_channels=1).state_dict()
    for key, value in state.items():
        if not value.is_floating_point():
            continue
        if key.endswith("running_var"):
            value.copy_(0.5 + torch.rand(value.shape, generator=generator))
        else:
            value.copy_(0.1 * torch.randn(value.shape, generator=generator))
    return state


@pytest.fixture(scope="module")
def plane_and_slice(tmp_path_factory, colin27_t1):
    """An axial plane of Colin27 as train.json gives it, (X, Y), and the same slice from pretraining."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser["pixdim"] = list(PIXDIM)
    parser["bundle_root"] = str(TRAIN_CONFIG.parents[1])  # the bundle's shared settings (configs/common.json)
    parser["dataset_dir"] = str(tmp_path_factory.mktemp("labels"))
    (item,) = parser.get_parsed_content("train#dataset#data")
    volume = Compose(parser.get_parsed_content("train#deterministic_transforms"))(item)["image"].as_tensor()
    assert tuple(volume.shape) == (1, 91, 109, 91)  # (C, X, Y, Z), RAS
    z = volume.shape[-1] // 2
    # the pretraining pipeline, without resizing (crop_pad to the plane's own size) and with train.json's
    # percentile window, so that the two inputs are the same numbers
    deterministic, _ = build_pretrain_transforms(
        num_slices=volume.shape[-1], spatial_size=volume.shape[1:3], in_plane_mode="crop_pad",
        pixdim=PIXDIM, percentiles=(1.0, 99.0),
    )  # fmt: skip
    slices = deterministic({"image": str(colin27_t1), "dims": 3, "modality": "MR"})["image"]
    return volume[..., z], slices[:, z]  # both (1, X, Y)


@torch.no_grad()
def test_inflated_encoder_sees_the_pretraining_slice_with_depth_last(plane_and_slice):
    plane, pretrain_slice = plane_and_slice
    assert pretrain_slice.shape == plane.shape == (1, 91, 109)
    torch.testing.assert_close(pretrain_slice, plane, atol=1e-4, rtol=0)

    state = _encoder_state()
    net2d = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=2).eval()
    net3d = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3).eval()
    assert load_pretrained_encoder(net2d, state).complete
    # "center": the 2D kernel on the central depth tap, so the 3D encoder is the 2D one on every Z plane
    assert load_pretrained_encoder(net3d, state, inflate="center").complete
    w2d, w3d = state["conv1.weight"], net3d.encoder.conv1.weight
    torch.testing.assert_close(w3d[..., w3d.shape[-1] // 2], w2d)  # the new taps are the LAST spatial axis
    assert not w3d[..., 0].any()

    features2d = net2d.encoder(pretrain_slice[None])  # what pretraining taught the encoder to compute
    volume = plane[None, ..., None].expand(-1, -1, -1, -1, DEPTH)  # (1, 1, X, Y, Z), constant along Z
    features3d = net3d.encoder(volume)
    assert len(features2d) == len(features3d) == 5
    for level, (f2, f3) in enumerate(zip(features2d, features3d, strict=True)):
        assert f3.shape[2:4] == f2.shape[2:]
        for d in range(f3.shape[-1]):
            torch.testing.assert_close(f3[..., d], f2, atol=1e-3, rtol=1e-3, msg=f"level {level}, depth {d}")

    # the filters are not transpose-symmetric: on the transposed slice (the old picture-order convention) the
    # 2D encoder's stem response, laid back over the plane, is far from what the 3D network computes
    # (measured: 16 % relative difference, against < 1e-6 above)
    stem = features3d[0][..., 0]
    stem_transposed = net2d.encoder(pretrain_slice.transpose(-1, -2)[None])[0].transpose(-1, -2)
    assert float((stem_transposed - stem).norm() / stem.norm()) > 0.1
    assert float((features2d[0] - stem).norm() / stem.norm()) < 1e-4

    # the bundle's default inflation ("mean", I3D) keeps the stem's response at depths away from the padding
    net3d_mean = FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=3).eval()
    load_pretrained_encoder(net3d_mean, state, inflate="mean")
    conv = net3d_mean.encoder.conv1
    stem3d = F.conv3d(volume, conv.weight, stride=conv.stride, padding=conv.padding)
    stem2d = F.conv2d(pretrain_slice[None], w2d, stride=conv.stride[:2], padding=conv.padding[:2])
    interior = [d for d in range(stem3d.shape[-1]) if 2 * d - 3 >= 0 and 2 * d + 3 < DEPTH]
    assert interior
    for d in interior:
        torch.testing.assert_close(stem3d[..., d], stem2d, atol=1e-4, rtol=1e-4)
