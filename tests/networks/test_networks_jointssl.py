import pytest
import torch

from jointssl_monai.networks import JointSSLNet
from jointssl_monai.outputs import JointSSLOutput

TINY = dict(
    backbone="resnet10",
    d_model=32,
    proj_hidden_dim=32,
    proj_dim=16,
    intra_prototypes=[10, 12],
    inter_prototypes=8,
    num_layers=2,
    ff_dim=48,
    heads=2,
    dim_head=8,
    dropout=0.0,
    mask_ratio=0.25,
)


def _net(**kw):
    torch.manual_seed(0)
    return JointSSLNet.from_settings(**{**TINY, **kw})


def _volumes(num_slices, s=5, hw=32):
    views = [torch.randn(len(num_slices), 1, s, hw, hw) for _ in range(2)]
    for v in views:
        for b, n in enumerate(num_slices):
            v[b, :, n:] = 0
    return views, torch.tensor(num_slices)


@pytest.mark.parametrize("num_slices,num_images", [([5, 1, 3], 0), (None, 3), ([4, 1], 2)])
def test_shapes_of_mixed_batches(num_slices, num_images):
    net = _net()
    vols, ns = _volumes(num_slices) if num_slices else (None, None)
    imgs = [torch.randn(num_images, 1, 32, 32) for _ in range(2)] if num_images else None
    out = net(volume_views=vols, num_slices=ns, image_views=imgs)
    assert isinstance(out, JointSSLOutput)
    n_vol = len(num_slices or [])
    n_rows = sum(num_slices or []) + num_images
    assert out.intra.num_views == 2
    for v in range(2):
        assert out.intra.embeddings[v].shape == (n_rows, 16)
        assert [s.shape for s in out.intra.scores[v]] == [(n_rows, 10), (n_rows, 12)]
    exp_source = [b for b, n in enumerate(num_slices or []) for _ in range(n)] + [
        n_vol + i for i in range(num_images)
    ]
    exp_slice = [i for n in num_slices or [] for i in range(n)] + [0] * num_images
    assert out.intra_source.tolist() == exp_source and out.intra_slice.tolist() == exp_slice
    if num_slices is None:
        assert out.inter is None and out.masked_prediction is None and out.volume_features is None
        return
    s = vols[0].shape[2]
    assert [z.shape for z in out.volume_features] == [(n_vol, 32)] * 2
    assert out.inter.embeddings[1].shape == (n_vol, 16) and out.inter.scores[0][0].shape == (n_vol, 8)
    assert len(out.masked_prediction) == len(out.masked_target) == len(out.mask) == 2  # both views masked
    assert torch.equal(out.valid, torch.arange(s)[None] < ns[:, None])
    for pred, target, mask in zip(out.masked_prediction, out.masked_target, out.mask, strict=True):
        assert pred.shape == target.shape == (n_vol, s, 32)
        assert not (mask & ~out.valid).any()
        assert mask.sum(1).tolist() == [0 if n == 1 else max(1, round(0.25 * n)) for n in num_slices]
        assert not target.requires_grad
        assert torch.all(target[~out.valid] == 0) and torch.all(pred[~out.valid] == 0)


def test_masked_targets_are_each_views_own_slice_embeddings():
    """The target of masked view v is view v's encoder embeddings of its valid slices, in slice order."""
    net = _net().eval()
    vols, ns = _volumes([3, 2])
    vols = [vols[0], vols[0].flip(-1)]  # two views that embed differently
    out = net(vols, ns)
    valid = out.valid
    for v in range(2):
        expected = net.encoder(vols[v].transpose(1, 2)[valid])
        torch.testing.assert_close(out.masked_target[v][valid], expected, rtol=1e-5, atol=1e-6)
        assert torch.all(out.masked_target[v][~valid] == 0)
    assert not torch.allclose(out.masked_target[0][valid], out.masked_target[1][valid], atol=1e-3)


def test_local_views_map_to_image_rows():
    net = _net()
    vols, ns = _volumes([3, 2])
    imgs = [torch.randn(2, 1, 32, 32) for _ in range(2)]
    local = [torch.randn(2, 1, 16, 16) for _ in range(3)]
    out = net(vols, ns, imgs, local)
    assert len(out.intra.local_scores) == 3 and out.intra.local_scores[2][1].shape == (2, 12)
    assert out.intra.local_rows.tolist() == [5, 6]
    assert out.intra_source[out.intra.local_rows].tolist() == [2, 3]  # the images, after the 2 volumes


def _scalar(out: JointSSLOutput, gen: torch.Generator) -> torch.Tensor:
    """A simple scalar touching every input of the three objectives (random weights avoid cancellations)."""
    total = torch.zeros(())
    branches = [out.intra, out.inter]
    for br in branches:
        for t in br.embeddings + [s for per in br.scores + br.local_scores for s in per]:
            total = total + (t * torch.randn(t.shape, generator=gen)).sum()
    for pred, target, mask in zip(out.masked_prediction, out.masked_target, out.mask, strict=True):
        total = total + ((pred - target) ** 2 * mask[..., None]).sum()
    return total


def test_gradients_reach_every_trainable_parameter():
    net = _net()
    vols, ns = _volumes([5, 3])
    imgs = [torch.randn(2, 1, 32, 32) for _ in range(2)]
    out = net(vols, ns, imgs, [torch.randn(2, 1, 16, 16)])
    _scalar(out, torch.Generator().manual_seed(0)).backward()
    missing = [
        n for n, p in net.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())
    ]
    assert not missing


def test_padded_slices_change_nothing():
    net = _net().train()
    vols, ns = _volumes([5, 2, 3])
    imgs = [torch.randn(2, 1, 32, 32) for _ in range(2)]
    noisy = [v.clone() for v in vols]
    for v in noisy:
        for b, n in enumerate(ns.tolist()):
            v[b, :, n:] = torch.randn_like(v[b, :, n:]) * 50
    outs = []
    for views in (vols, noisy):
        torch.manual_seed(123)  # same mask draw
        outs.append(net(views, ns, imgs))
    a, b = outs
    pairs = [
        (x, y)
        for name in ("masked_prediction", "masked_target", "mask")
        for x, y in zip(getattr(a, name), getattr(b, name), strict=True)
    ]
    pairs += list(zip(a.volume_features, b.volume_features, strict=True))
    for br_a, br_b in ((a.intra, b.intra), (a.inter, b.inter)):
        pairs += list(zip(br_a.embeddings, br_b.embeddings, strict=True))
        pairs += [
            (x, y)
            for pa, pb in zip(br_a.scores, br_b.scores, strict=True)
            for x, y in zip(pa, pb, strict=True)
        ]
    for x, y in pairs:
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_stage_flags_freeze_and_disable_branches():
    net = _net(use_intra=False, use_inter=False, freeze_encoder=True)  # authors' stage B
    net.train()
    assert not net.encoder.training and not any(p.requires_grad for p in net.encoder.parameters())
    assert not any(p.requires_grad for p in net.intra_prototypes.parameters())
    running = net.encoder.resnet.bn1.running_mean.clone()
    vols, ns = _volumes([4, 3])
    out = net(vols, ns)
    assert out.intra is None and out.inter is None and out.volume_features is None
    assert torch.equal(running, net.encoder.resnet.bn1.running_mean)
    _ = ((out.masked_prediction[0] - out.masked_target[0]) ** 2).sum().backward()
    assert net.masked_modeling.mask_token.grad is not None and net.encoder.resnet.conv1.weight.grad is None
    stage_c = _net(use_intra=False, use_mask=False)
    out = stage_c(vols, ns, [torch.randn(2, 1, 32, 32)] * 2)
    assert out.intra is None and out.masked_prediction is None and out.inter.scores[0][0].shape == (2, 8)
    assert set(stage_c.state_dict()) == set(net.state_dict())


def test_bad_batches_are_named():
    net = _net()
    vols, _ = _volumes([3, 2])
    with pytest.raises(ValueError, match="num_slices"):
        net(vols, torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="neither volume_views nor image_views"):
        net()
    with pytest.raises(ValueError, match=r"volume_views\[1\]"):
        net([vols[0], vols[1][:, :, :4]])
    with pytest.raises(ValueError, match=r"image_views\[0\]"):
        net(image_views=[torch.randn(2, 3, 32, 32)] * 2)


def test_volume_head_has_no_batch_norm_by_default():
    """Its batch is 2 x volumes per process: BatchNorm over two rows encodes the difference of the views."""
    net = _net()
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net.intra_head.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in net.inter_head.modules())
    # one volume, two near-identical views: the volume embeddings of the views stay near-identical
    net.train()
    vol = torch.randn(1, 1, 5, 32, 32)
    out = net([vol, vol + 0.01 * torch.randn_like(vol)], torch.tensor([5]))
    cosine = torch.nn.functional.cosine_similarity(out.inter.embeddings[0], out.inter.embeddings[1])
    assert float(cosine.detach()) > 0.95


def test_the_bundle_lists_the_parts_the_builder_builds(tmp_path):
    from monai.bundle import ConfigParser

    from jointssl_monai.apps.bundle_commands import find_bundle_dir

    parser = ConfigParser()
    parser.read_config(str(find_bundle_dir() / "configs" / "pretrain.json"))
    settings = {"backbone": "resnet10", "d_model": 32, "proj_hidden_dim": 32, "proj_dim": 16, "num_layers": 2,
                "ff_dim": 48, "attention_heads": 2, "attention_head_dim": 8, "intra_prototypes": 10,
                "inter_prototypes": 3, "dataset_dir": str(tmp_path)}  # fmt: skip
    for key, value in settings.items():
        parser[key] = value
    parser["loss#intra_bank_size"], parser["loss#inter_bank_size"] = 100, 10  # no data set needed
    parser["loss#intra_queue_length"], parser["loss#inter_queue_length"] = 0, 0
    torch.manual_seed(0)
    listed = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    torch.manual_seed(0)
    built = JointSSLNet.from_settings(
        backbone="resnet10", d_model=32, proj_hidden_dim=32, proj_dim=16, num_layers=2, ff_dim=48, heads=2,
        dim_head=8, intra_prototypes=loss.prototype_heads("intra"),
        inter_prototypes=loss.prototype_heads("inter"),
    )  # fmt: skip
    assert listed.state_dict().keys() == built.state_dict().keys()
    for key, value in built.state_dict().items():  # same parts, built in the same order: the same weights
        torch.testing.assert_close(listed.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert [listed.uses(level) for level in ("intra", "inter", "mask")] == [True, True, True]


def test_parts_that_do_not_fit_are_refused_by_name():
    from jointssl_monai.networks import MaskedSliceModeling, MultiPrototypes, ProjectionHead

    net = _net()
    parts = dict(net.named_children())
    with pytest.raises(ValueError, match=r"masked_modeling.d_model is 16, expected 32"):
        JointSSLNet(**{**parts, "masked_modeling": MaskedSliceModeling(16)})
    with pytest.raises(ValueError, match=r"inter_prototypes.dim is 8, expected 16"):
        JointSSLNet(**{**parts, "inter_prototypes": MultiPrototypes(8, 4)})
    with pytest.raises(ValueError, match=r"intra_head.in_dim is 64, expected 32"):
        JointSSLNet(**{**parts, "intra_head": ProjectionHead(64, 32, 16)})


def _parts(net: JointSSLNet) -> dict:
    return dict(net.named_children())


def test_a_network_built_from_parts_runs_every_branch_and_trains_its_encoder_by_default():
    net = JointSSLNet(**_parts(_net()))
    net.eval()
    net.train()
    assert net.encoder.training and net.intra_head.training and net.aggregator.training
    assert all(p.requires_grad for p in net.parameters())
    vols, ns = _volumes([3, 2])
    out = net(vols, ns)
    assert out.intra is not None and out.inter is not None and out.masked_prediction is not None


@pytest.mark.parametrize(
    ("flags", "frozen"),
    [
        ({}, set()),
        (
            {"use_inter": False, "use_mask": False},
            {"inter_head", "inter_prototypes", "masked_modeling", "aggregator"},
        ),
        (
            {"use_intra": False, "use_inter": False, "freeze_encoder": True},
            {"encoder", "intra_head", "intra_prototypes", "inter_head", "inter_prototypes"},
        ),
        ({"use_intra": False, "use_mask": False}, {"intra_head", "intra_prototypes", "masked_modeling"}),
        ({"use_mask": False}, {"masked_modeling"}),
        ({"use_inter": False}, {"inter_head", "inter_prototypes"}),
    ],
)
def test_exactly_the_parts_of_disabled_branches_are_frozen(flags, frozen):
    """Stage A freezes the volume level, the masking and the aggregator; stage B the encoder and both
    clustering levels; stage C the slice level and the masking; the aggregator trains whenever the volume
    level or the masking runs."""
    net = JointSSLNet(**_parts(_net()), **flags)
    for name, module in net.named_children():
        assert all(not p.requires_grad for p in module.parameters()) == (name in frozen), name
        assert all(p.requires_grad for p in module.parameters()) == (name not in frozen), name


def test_flag_rules_are_refused_with_the_rule():
    parts = _parts(_net())
    with pytest.raises(
        ValueError, match=r"^JointSSLNet: at least one of use_intra, use_inter, use_mask must be True\.$"
    ):
        JointSSLNet(**parts, use_intra=False, use_inter=False, use_mask=False)
    from jointssl_monai.networks import MaskedSliceModeling

    no_masking = MaskedSliceModeling(32, mask_ratio=0.0)
    JointSSLNet(**{**parts, "masked_modeling": no_masking}, use_mask=False)
    with pytest.raises(
        ValueError, match=r"^mask_ratio must be > 0 when masked slice modelling is on \(w_mask > 0\)"
    ):
        JointSSLNet(**{**parts, "masked_modeling": no_masking})
    JointSSLNet(**{**parts, "masked_modeling": MaskedSliceModeling(32, mask_ratio=0.01)})


def test_every_part_that_does_not_fit_is_named_in_one_message():
    from jointssl_monai.networks import MultiPrototypes, ProjectionHead, SliceAggregator

    parts = _parts(_net())
    bad = {
        "aggregator": SliceAggregator(16, num_layers=1, ff_dim=8, heads=1, dim_head=4),
        "inter_head": ProjectionHead(64, 32, 16),
        "intra_prototypes": MultiPrototypes(8, 4),
    }
    expected = (
        r"^JointSSLNet: the parts do not fit \(encoder\.d_model=32\): "
        r"aggregator\.d_model is 16, expected 32; inter_head\.in_dim is 64, expected 32; "
        r"intra_prototypes\.dim is 8, expected 16$"
    )
    with pytest.raises(ValueError, match=expected):
        JointSSLNet(**{**parts, **bad})


def test_level_accessors_return_that_levels_parts_and_refuse_other_names():
    net = _net()
    assert net.prototypes("intra") is net.intra_prototypes and net.prototypes("inter") is net.inter_prototypes
    assert net.projection_head("intra") is net.intra_head and net.projection_head("inter") is net.inter_head
    for accessor in (net.prototypes, net.projection_head):
        with pytest.raises(ValueError, match=r"level must be 'intra' or 'inter', got 'mask'"):
            accessor("mask")


def test_train_mode_is_restored_by_default_but_a_frozen_encoder_stays_in_eval():
    for freeze in (False, True):
        net = _net(use_intra=False, use_inter=False, freeze_encoder=freeze).eval()
        assert net.train() is net and net.training and net.masked_modeling.training
        assert net.encoder.training is not freeze


def test_flat_settings_reach_the_parts_they_name():
    """``from_settings`` equals the parts built by hand with the same settings (same weights, same output)."""
    from jointssl_monai.networks import (
        MaskedSliceModeling,
        MultiPrototypes,
        ProjectionHead,
        SliceAggregator,
        SliceEncoder,
    )

    deformable = {"downsample_factor": 2, "offset_kernel_size": 4}
    settings = dict(position_encoding=True, deformable_kwargs=deformable, mask_decoder_hidden_dim=24,
                    proj_batch_norm=False, inter_proj_batch_norm=True)  # fmt: skip
    net = _net(**settings).eval()
    torch.manual_seed(0)
    parts = [
        SliceEncoder("resnet10", 1, 32),
        SliceAggregator(32, 2, 48, 2, 8, 0.0, "deformable", True, settings["deformable_kwargs"]),
        MaskedSliceModeling(32, 0.25, 24),
        ProjectionHead(32, 32, 16, 2, batch_norm=False),
        ProjectionHead(32, 32, 16, 2, batch_norm=True),
        MultiPrototypes(16, [10, 12]),
        MultiPrototypes(16, 8),
    ]
    reference = JointSSLNet(*parts).eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(net.state_dict()[key], value, rtol=0, atol=0, msg=key)
    vols, ns = _volumes([5, 3])
    torch.testing.assert_close(net(vols, ns).volume_features, reference(vols, ns).volume_features)


def test_flat_settings_for_memory_reach_the_encoder():
    """``channels_last`` stores the encoder's convolutions channels-last; ``gradient_checkpointing`` runs the
    encoder's stages again in the backward pass."""
    for channels_last in (True, False):  # off by default
        weight = (
            _net(**({"channels_last": True} if channels_last else {})).encoder.resnet.layer1[0].conv1.weight
        )
        assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
    for checkpointing, calls in ((False, 1), (True, 2)):
        flags = {"gradient_checkpointing": True} if checkpointing else {}  # off by default
        net = _net(**flags, use_inter=False, use_mask=False).train()
        seen = []
        net.encoder.resnet.layer1.register_forward_pre_hook(lambda *_, seen=seen: seen.append(1))
        out = net(image_views=[torch.randn(2, 1, 16, 16)] * 2)
        out.intra.embeddings[0].sum().backward()
        assert len(seen) == calls


def test_default_settings_build_the_papers_network():
    """Paper values: ResNet-50, 640-d tokens, 4 layers of width 720 with 8 heads of 64, deformable
    attention, projection 2048 -> 128, 3000 prototypes per level, every branch on."""
    from jointssl_monai.networks import (
        MaskedSliceModeling,
        MultiPrototypes,
        ProjectionHead,
        SliceAggregator,
        SliceEncoder,
    )

    net = JointSSLNet.from_settings()
    paper = JointSSLNet(
        SliceEncoder("resnet50", 1, 640),
        SliceAggregator(640, 4, 720, 8, 64, 0.1, "deformable"),
        MaskedSliceModeling(640, 0.1),
        ProjectionHead(640, 2048, 128, 2, batch_norm=True),
        ProjectionHead(640, 2048, 128, 2, batch_norm=False),
        MultiPrototypes(128, 3000),
        MultiPrototypes(128, 3000),
    )
    shapes = {k: v.shape for k, v in paper.state_dict().items()}
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes
    assert all(p.requires_grad for p in net.parameters())


def test_volume_batches_without_a_slice_count_use_every_slice():
    net = _net().eval()
    vols, _ = _volumes([4, 4], s=4)
    out = net(vols)
    assert out.valid.all() and out.valid.shape == (2, 4)
    torch.testing.assert_close(out.volume_features, net(vols, torch.tensor([4, 4])).volume_features)


def test_bad_view_sets_are_named_with_their_rule():
    net = _net()
    vols, ns = _volumes([3, 2])
    imgs = [torch.randn(2, 1, 32, 32)] * 2
    with pytest.raises(ValueError, match=r"volume_views must hold 2 global views, got 1\."):
        net(vols[:1], ns)
    two_channels = [torch.randn(2, 2, 5, 32, 32)] * 2  # the same (wrong) shape in both views
    with pytest.raises(
        ValueError, match=r"volume_views\[0\] must have shape \(B, 1, S, H, W\), the same in both views"
    ):
        net(two_channels, ns)
    with pytest.raises(ValueError, match=r"image_views must hold 2 global views, got 3\."):
        net(image_views=imgs + imgs[:1])
    with pytest.raises(
        ValueError, match=r"image_views\[1\] must have shape \(B2, 1, H, W\) with the same B2 in every view"
    ):
        net(image_views=[imgs[0], torch.randn(3, 1, 32, 32)])
    with pytest.raises(
        ValueError, match=r"^JointSSLNet: the batch holds neither volume_views nor image_views\.$"
    ):
        net()
    with pytest.raises(ValueError, match=r"^image_local_views were given without image_views\.$"):
        net(vols, ns, image_local_views=[torch.randn(2, 1, 16, 16)])
    with pytest.raises(ValueError, match=r"^image_local_views\[0\] must have shape \(B2, 1, H, W\)"):
        net(image_views=imgs, image_local_views=[torch.randn(2, 3, 16, 16)])
    with pytest.raises(ValueError, match=r"^image_local_views must have B2=2 rows, got 3\.$"):
        net(image_views=imgs, image_local_views=[torch.randn(3, 1, 16, 16)])


def test_slice_positions_are_integer_indices():
    out = _net()(*_volumes([3, 2]), [torch.randn(2, 1, 32, 32)] * 2)
    assert out.intra_slice.dtype == torch.long and out.intra_source.dtype == torch.long
    assert out.intra_slice.tolist() == [0, 1, 2, 0, 1, 0, 0]


def test_embeddings_are_unit_rows():
    """Each row (slice, image, volume) is normalised on its own before scoring against the prototypes."""
    out = _net()(*_volumes([3, 2]), [torch.randn(2, 1, 32, 32)] * 2)
    for branch in (out.intra, out.inter):
        for emb in branch.embeddings:
            torch.testing.assert_close(emb.norm(dim=1), torch.ones(emb.shape[0]))


def test_volume_features_are_the_aggregation_of_the_unmasked_valid_slice_tokens():
    """``Z`` of view v is the aggregator's pooled output over view v's own tokens with the padding masked."""
    net = _net().eval()
    vols, ns = _volumes([5, 2])
    out = net(vols, ns)
    for v in range(2):
        tokens = out.masked_target[v]
        _, z = net.aggregator(tokens, out.valid)
        torch.testing.assert_close(out.volume_features[v], z, rtol=1e-5, atol=1e-6)
        _, unmasked_padding = net.aggregator(tokens, None)
        assert not torch.allclose(out.volume_features[v], unmasked_padding, atol=1e-4)


def test_the_aggregator_runs_only_the_sequences_a_stage_needs():
    """All branches: the 2 plain and the 2 masked sequences (4B rows) in one call; stage B only the masked
    (2B); stage C only the plain (2B)."""
    vols, ns = _volumes([3, 2], hw=16)
    for flags, rows in (({}, 8), ({"use_intra": False, "use_inter": False}, 4), ({"use_mask": False}, 4)):
        net = _net(**flags)
        seen = []
        net.aggregator.register_forward_hook(lambda _m, args, _o, seen=seen: seen.append(args[0].shape[0]))
        net(vols, ns)
        assert seen == [rows], flags


def test_the_encoder_builds_no_graph_without_autograd():
    """Under ``torch.no_grad`` (evaluation, bank filling) the encoder keeps no activations for a backward."""
    net = _net()
    grads = []
    net.encoder.register_forward_hook(lambda _m, _a, out: grads.append(out.requires_grad))
    with torch.no_grad():
        net(*_volumes([3, 2]))
    net(*_volumes([3, 2]))
    assert grads == [False, True]
