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
