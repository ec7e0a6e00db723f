"""Loading a pretrained 2D slice encoder into FlexibleUNet (2D exact, 3D inflated); refusing mismatches."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import FlexibleUNet, ResNetFeatures

from jointssl_monai.transfer import (
    PretrainedEncoderMismatchError,
    adapt_first_conv,
    guess_resnet_name,
    inflate_kernel,
    load_pretrained_encoder,
)

torch.manual_seed(0)


def _ssl_encoder(name: str = "resnet10", in_channels: int = 1) -> dict[str, torch.Tensor]:
    """A fake exported SSL encoder: random weights and non-trivial batch-norm statistics."""
    encoder = ResNetFeatures(name, pretrained=False, spatial_dims=2, in_channels=in_channels)
    state = encoder.state_dict()
    for value in state.values():
        if value.is_floating_point():
            value.copy_(torch.randn_like(value))
        else:
            value.fill_(7)  # num_batches_tracked
    return state


def _unet(name: str = "resnet10", spatial_dims: int = 2, in_channels: int = 1) -> FlexibleUNet:
    return FlexibleUNet(in_channels, 2, backbone=name, spatial_dims=spatial_dims)


def test_2d_every_encoder_key_updated_from_file(tmp_path):
    state = _ssl_encoder()
    path = tmp_path / "encoder.pt"
    torch.save(state, path)
    (tmp_path / "encoder.json").write_text(json.dumps({"backbone": "resnet10", "in_channels": 1}))
    unet = _unet()
    decoder_before = {k: v.clone() for k, v in unet.state_dict().items() if not k.startswith("encoder.")}
    report = load_pretrained_encoder(unet, path)
    after = unet.state_dict()
    encoder_keys = [k for k in after if k.startswith("encoder.")]
    assert sorted(report.loaded) == sorted(encoder_keys) and not report.missing and not report.skipped
    for key in encoder_keys:
        torch.testing.assert_close(after[key], state[key[len("encoder.") :]], msg=key)
    for key, value in decoder_before.items():  # the decoder is left alone
        torch.testing.assert_close(after[key], value, msg=key)
    assert report.source_prefix == "" and report.metadata["backbone"] == "resnet10"
    assert f"loaded {len(encoder_keys)} of {len(encoder_keys)}" in report.summary()


def test_full_pretraining_checkpoint_prefix_detected():
    state = _ssl_encoder()
    checkpoint = {
        "net": {f"module.encoder.backbone.{k}": v for k, v in state.items()}
        | {
            "module.aggregator.layers.0.weight": torch.zeros(3, 3),
            "module.encoder.proj.weight": torch.zeros(640, 8),
        },
        "optimizer": {"state": {}, "param_groups": []},
    }
    unet = _unet()
    report = load_pretrained_encoder(unet, checkpoint)
    assert report.source_prefix == "module.encoder.backbone."
    assert report.complete and report.num_loaded == len(state)
    torch.testing.assert_close(unet.encoder.conv1.weight, state["conv1.weight"])


def test_3d_inflation_every_key_updated_and_depth_constant_equivalence():
    state = _ssl_encoder()
    unet = _unet(spatial_dims=3)
    report = load_pretrained_encoder(unet, state)  # auto = I3D mean inflation
    encoder_keys = [k for k in unet.state_dict() if k.startswith("encoder.")]
    assert sorted(report.loaded) == sorted(encoder_keys)
    convs = [k for k, v in state.items() if v.ndim == 4]
    assert sorted(report.transformed) == sorted("encoder." + k for k in convs)
    after = unet.state_dict()
    for key in encoder_keys:
        src = state[key[len("encoder.") :]]
        got = after[key]
        if src.ndim == 4:  # summing over depth gives back the 2D kernel
            torch.testing.assert_close(got.sum(-1), src, msg=key)
            assert got.shape[-1] == got.shape[-2]
        else:
            torch.testing.assert_close(got, src, msg=key)
    # the inflated stem (7x7x7, stride 2) on a depth-constant volume = the 2D stem on each interior slice
    w2d, w3d = state["conv1.weight"], unet.encoder.conv1.weight.detach()
    image = torch.randn(1, 1, 20, 20)
    volume = image.unsqueeze(-1).expand(-1, -1, -1, -1, 16)
    out3d = F.conv3d(volume, w3d, stride=2, padding=3)
    out2d = F.conv2d(image, w2d, stride=2, padding=3)
    interior = [d for d in range(out3d.shape[-1]) if 2 * d - 3 >= 0 and 2 * d + 3 < 16]
    assert interior
    for d in interior:
        torch.testing.assert_close(out3d[..., d], out2d, atol=1e-4, rtol=1e-4)
    # at the border the kernel reaches the zero padding: the slices differ (the test can fail)
    assert not torch.allclose(out3d[..., 0], out2d, atol=1e-3)


def test_center_inflation_equals_2d_conv_on_every_slice():
    w2d = torch.randn(4, 2, 3, 3)
    w3d = inflate_kernel(w2d, 3, "center")
    volume = torch.randn(1, 2, 9, 9, 5)  # not constant along depth
    out3d = F.conv3d(volume, w3d, padding=1)
    for d in range(5):
        torch.testing.assert_close(
            out3d[..., d], F.conv2d(volume[..., d], w2d, padding=1), atol=1e-5, rtol=1e-5
        )


def test_inflation_along_another_axis():
    w2d = torch.randn(4, 1, 3, 5)
    w3d = inflate_kernel(w2d, 7, "mean", depth_axis=0)
    assert w3d.shape == (4, 1, 7, 3, 5)
    torch.testing.assert_close(w3d.sum(2), w2d)


@pytest.mark.parametrize("mode", ["repeat", "mean"])
def test_first_conv_adapted_keeps_response_to_equal_channels(mode):
    state = _ssl_encoder()
    unet = _unet(in_channels=3)
    report = load_pretrained_encoder(unet, state, first_conv=mode)
    assert report.complete
    assert "first conv: 1 -> 3" in report.transformed["encoder.conv1.weight"]
    grey = torch.randn(1, 1, 16, 16)
    torch.testing.assert_close(
        F.conv2d(grey.expand(-1, 3, -1, -1), unet.encoder.conv1.weight.detach(), padding=3),
        F.conv2d(grey, state["conv1.weight"], padding=3),
        atol=1e-4,
        rtol=1e-4,
    )


def test_first_conv_from_rgb_to_two_channels():
    w = torch.randn(8, 3, 3, 3)
    adapted = adapt_first_conv(w, 2)  # 2 is not a multiple of 3: mean
    torch.testing.assert_close(adapted.sum(1), w.sum(1))


def test_refuses_other_backbone_with_a_clear_message():
    unet = _unet("resnet50")
    before = unet.encoder.conv1.weight.clone()
    with pytest.raises(
        PretrainedEncoderMismatchError, match="resnet18 encoder but the network's backbone is resnet50"
    ):
        load_pretrained_encoder(unet, _ssl_encoder("resnet18"))
    torch.testing.assert_close(unet.encoder.conv1.weight, before)  # nothing half-loaded


def test_refuses_subset_backbone_unless_not_strict():
    # resnet10 keys are a subset of resnet18's with the same shapes: strict refuses, non-strict reports
    unet = _unet("resnet18")
    with pytest.raises(PretrainedEncoderMismatchError, match="missing"):
        load_pretrained_encoder(unet, _ssl_encoder("resnet10"))
    report = load_pretrained_encoder(unet, _ssl_encoder("resnet10"), strict=False)
    assert report.loaded and report.missing and all(".1." in k for k in report.missing if "layer" in k)


def test_raises_when_nothing_loads(tmp_path):
    with pytest.raises(PretrainedEncoderMismatchError, match="no checkpoint key ends with an encoder key"):
        load_pretrained_encoder(_unet(), {"fc.weight": torch.zeros(2, 2)}, strict=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained_encoder(_unet(), tmp_path / "nope.pt")
    bad = tmp_path / "notweights.pt"
    bad.write_text("hello")
    with pytest.raises(PretrainedEncoderMismatchError, match=r"notweights\.pt"):
        load_pretrained_encoder(_unet(), bad)


@pytest.mark.parametrize("name", ["resnet10", "resnet18", "resnet50"])
def test_guess_resnet_name(name):
    assert guess_resnet_name(ResNetFeatures(name, pretrained=False, spatial_dims=2).state_dict()) == name
