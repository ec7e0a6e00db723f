import pytest
import torch
from monai.networks.nets import FlexibleUNet
from monai.networks.utils import copy_model_state

from jointssl_monai.networks import SliceEncoder


@pytest.mark.parametrize("backbone,in_channels,stride", [("resnet10", 1, 2), ("resnet18", 2, 1)])
def test_encoder_weights_load_into_flexible_unet_with_every_key(backbone, in_channels, stride):
    torch.manual_seed(0)
    enc = SliceEncoder(backbone, in_channels=in_channels, d_model=32, conv1_t_stride=stride)
    unet = FlexibleUNet(in_channels, 3, backbone=backbone, spatial_dims=2)
    state = enc.encoder_state_dict()
    assert set(state) == set(unet.encoder.state_dict())
    _, updated, unchanged = copy_model_state(unet.encoder, state, inplace=True)
    assert sorted(updated) == sorted(state) and not unchanged
    for key, value in state.items():
        assert torch.equal(unet.encoder.state_dict()[key], value), key
    # the transferred encoder computes the same last-stage features as the pretrained one (stride permitting)
    enc.eval()
    unet.eval()
    x = torch.randn(2, in_channels, 32, 32)
    if stride == 2:
        torch.testing.assert_close(unet.encoder(x)[-1], enc.resnet(x)[-1])
    assert (enc.backbone, enc.in_channels) == (backbone, in_channels)


def test_embedding_shapes_and_stage_pooling():
    torch.manual_seed(0)
    enc = SliceEncoder("resnet10", d_model=16).eval()
    x = torch.randn(3, 1, 32, 32)
    assert enc(x).shape == (3, 16)
    # multi-stage: projection of the concatenated, L2-normalised stage poolings (64+128+256+512 for resnet10)
    assert enc.proj.in_features == 960
    feats = enc.resnet(x)[1:]
    pooled = torch.cat([torch.nn.functional.normalize(f.mean((2, 3)), dim=1) for f in feats], 1)
    torch.testing.assert_close(enc(x), enc.proj(pooled))
    last = SliceEncoder("resnet10", d_model=16, multi_stage=False)
    assert last.proj.in_features == 512


def test_stem_stride_one_keeps_more_resolution():
    enc1 = SliceEncoder("resnet10", d_model=8, conv1_t_stride=1).eval()
    x = torch.randn(1, 1, 32, 32)
    assert (
        enc1.resnet(x)[-1].shape[-1] == 2 * SliceEncoder("resnet10", d_model=8).eval().resnet(x)[-1].shape[-1]
    )


def test_checkpointing_and_channels_last_match_plain():
    torch.manual_seed(0)
    plain = SliceEncoder("resnet10", d_model=8)
    variant = SliceEncoder("resnet10", d_model=8, gradient_checkpointing=True, channels_last=True)
    variant.load_state_dict(plain.state_dict())
    x = torch.randn(4, 1, 32, 32)
    out_a, out_b = plain(x), variant(x)
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    out_a.square().sum().backward()
    out_b.square().sum().backward()
    torch.testing.assert_close(
        plain.resnet.conv1.weight.grad, variant.resnet.conv1.weight.grad, rtol=1e-3, atol=1e-5
    )


def test_bad_input_is_named():
    enc = SliceEncoder("resnet10", in_channels=2, d_model=8)
    with pytest.raises(ValueError, match="SliceEncoder: slices must have shape"):
        enc(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown backbone"):
        SliceEncoder("vit")
