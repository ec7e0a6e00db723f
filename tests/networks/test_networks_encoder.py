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


def test_defaults_are_a_resnet50_with_640_wide_embeddings():
    """The authors' encoder: ResNet-50 on one-channel slices, every stage pooled, 640-wide embeddings."""
    with torch.device("meta"):  # shapes only, no weights to initialise
        default = SliceEncoder()
        explicit = SliceEncoder("resnet50", in_channels=1, d_model=640, multi_stage=True, conv1_t_stride=2)
    shapes = {key: value.shape for key, value in default.state_dict().items()}
    assert shapes == {key: value.shape for key, value in explicit.state_dict().items()}
    assert default.stage_channels == (256, 512, 1024, 2048)
    assert default.resnet.conv1.stride == (2, 2)


def test_size_rules_at_their_boundaries():
    SliceEncoder("resnet10", in_channels=1, d_model=1)
    for kwargs, name in (
        ({"in_channels": 0}, "in_channels"),
        ({"in_channels": 1.0}, "in_channels"),
        ({"d_model": 0}, "d_model"),
        ({"d_model": 2.0}, "d_model"),
    ):
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            SliceEncoder("resnet10", **kwargs)
    with pytest.raises(ValueError, match="conv1_t_stride must be 1 or 2, got 3"):
        SliceEncoder("resnet10", conv1_t_stride=3)


def test_recorded_stride_and_stage_channels_are_those_of_the_backbone():
    enc = SliceEncoder("resnet10", d_model=8, conv1_t_stride=1).eval()
    assert enc.resnet.conv1.stride == (enc.conv1_t_stride, enc.conv1_t_stride) == (1, 1)
    feats = enc.resnet(torch.randn(1, 1, 16, 16))[1:]
    assert enc.stage_channels == tuple(f.shape[1] for f in feats)


def test_last_stage_only_embedding_pools_layer4():
    torch.manual_seed(0)
    enc = SliceEncoder("resnet10", d_model=8, multi_stage=False).eval()
    x = torch.randn(2, 1, 32, 32)
    pooled = torch.nn.functional.normalize(enc.resnet(x)[-1].mean((2, 3)), dim=1)
    torch.testing.assert_close(enc(x), enc.proj(pooled))


def test_stem_follows_the_backbone_max_pool_setting():
    """The encoder's stem is the backbone's: without its max pool the stages see twice the resolution."""
    torch.manual_seed(0)
    enc = SliceEncoder("resnet10", d_model=8).eval()
    enc.resnet.no_max_pool = True
    x = torch.randn(2, 1, 32, 32)
    feats = enc.resnet(x)[1:]
    pooled = torch.cat([torch.nn.functional.normalize(f.mean((2, 3)), dim=1) for f in feats], 1)
    torch.testing.assert_close(enc(x), enc.proj(pooled))


def _batch_norm_updates(enc: SliceEncoder, train: bool = True, grad: bool = True) -> int:
    enc.train(train)
    with torch.set_grad_enabled(grad):
        out = enc(torch.randn(2, 1, 32, 32))
        if grad:
            out.sum().backward()
    return int(enc.resnet.bn1.num_batches_tracked)


def test_gradient_checkpointing_only_when_asked_while_training_with_gradients():
    """Recomputation in the backward pass shows in the BatchNorm statistics: updated twice per step with
    checkpointing (as documented), once without it (the default) or without gradients."""
    assert _batch_norm_updates(SliceEncoder("resnet10", d_model=8)) == 1
    assert _batch_norm_updates(SliceEncoder("resnet10", d_model=8, gradient_checkpointing=True)) == 2
    assert (
        _batch_norm_updates(SliceEncoder("resnet10", d_model=8, gradient_checkpointing=True), grad=False) == 1
    )


def test_channels_last_is_off_by_default_and_converts_the_backbone():
    def layer1_channels_last(enc: SliceEncoder) -> bool:
        seen = []
        enc.resnet.layer1.register_forward_hook(
            lambda mod, args, out: seen.append(out.is_contiguous(memory_format=torch.channels_last))
        )
        enc(torch.randn(2, 1, 32, 32))
        return seen[0]

    plain = SliceEncoder("resnet10", d_model=8).eval()
    fast = SliceEncoder("resnet10", d_model=8, channels_last=True).eval()
    assert not layer1_channels_last(plain)
    assert layer1_channels_last(fast)
    assert fast.resnet.conv1.weight.is_contiguous(memory_format=torch.channels_last)
