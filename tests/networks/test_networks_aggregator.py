import math

import pytest
import torch

from jointssl_monai.networks import (
    DeformableAttention1D,
    FullAttention1D,
    MaskedSliceModeling,
    MultiPrototypes,
    ProjectionHead,
    SliceAggregator,
    sinusoidal_position_encoding,
)


def _aggregator(attention, **kw):
    torch.manual_seed(0)
    return SliceAggregator(16, num_layers=2, ff_dim=24, heads=2, dim_head=8, attention=attention, **kw).eval()


@pytest.mark.parametrize("attention", ["deformable", "full"])
def test_padding_has_no_effect_and_z_is_masked_mean(attention):
    agg = _aggregator(attention)
    seq = torch.randn(1, 5, 16)
    tokens_alone, z_alone = agg(seq)
    x = torch.randn(2, 9, 16) * 10
    x[0, :5] = seq[0]
    valid = torch.arange(9)[None] < torch.tensor([[5], [9]])
    tokens, z = agg(x, valid)
    torch.testing.assert_close(tokens[0, :5], tokens_alone[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z[0], z_alone[0], rtol=1e-4, atol=1e-5)
    assert torch.all(tokens[0, 5:] == 0)
    torch.testing.assert_close(z, tokens.sum(1) / valid.sum(1, keepdim=True))


def test_position_encoding_makes_full_attention_order_aware():
    x = torch.randn(1, 6, 16)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    _, z_free = _aggregator("full", position_encoding=False)(x)
    _, z_free_perm = _aggregator("full", position_encoding=False)(x[:, perm])
    torch.testing.assert_close(z_free, z_free_perm, rtol=1e-4, atol=1e-5)  # a set function without positions
    _, z_pe = _aggregator("full")(x)
    _, z_pe_perm = _aggregator("full")(x[:, perm])
    assert not torch.allclose(z_pe, z_pe_perm, atol=1e-3)


def test_aggregator_rejects_bad_tokens():
    with pytest.raises(ValueError, match="SliceAggregator: tokens must be"):
        _aggregator("full")(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match="attention must be"):
        SliceAggregator(16, attention="linear")


def test_mask_sampling_rules():
    mm = MaskedSliceModeling(8, mask_ratio=0.1)
    lengths = torch.tensor([1, 2, 9, 30, 40])
    valid = torch.arange(40)[None] < lengths[:, None]
    gen = torch.Generator().manual_seed(0)
    seen = torch.zeros_like(valid)
    for _ in range(50):
        mask = mm.sample_mask(valid, gen)
        assert not (mask & ~valid).any()  # never a padded slice
        assert mask.sum(1).tolist() == [0, 1, 1, 3, 4]  # round(10 %), at least 1 when L >= 2, never all
        seen |= mask
    assert seen[3, :30].all()  # every valid position gets masked some time
    tokens = torch.randn(5, 40, 8)
    masked = mm.mask_tokens(tokens, mask)
    assert torch.equal(masked[mask], mm.mask_token.expand(int(mask.sum()), 8))
    assert torch.equal(masked[~mask], tokens[~mask])
    assert not MaskedSliceModeling(8, mask_ratio=0.0).sample_mask(valid).any()


def test_prototypes_score_cosines_and_normalize_in_place():
    protos = MultiPrototypes(4, [3, 5])
    assert [h.weight.shape for h in protos.heads] == [(3, 4), (5, 4)]
    assert all(h.bias is None for h in protos.heads)
    with torch.no_grad():
        protos.heads[0].weight.mul_(7)
    protos.normalize_()
    torch.testing.assert_close(protos.heads[0].weight.norm(dim=1), torch.ones(3))
    x = torch.randn(6, 4) * 5
    scores = protos(x)
    expected = torch.nn.functional.cosine_similarity(x[:, None], protos.heads[1].weight[None], dim=-1)
    torch.testing.assert_close(scores[1], expected)
    assert MultiPrototypes(4, 10).num_prototypes == (10,)


def test_prototypes_own_their_upkeep_gradients_and_centroids():
    protos = MultiPrototypes(4, [3, 5])
    assert [w is h.weight for w, h in zip(protos.weights(), protos.heads, strict=True)] == [True, True]
    sum(s.sum() for s in protos(torch.randn(6, 4))).backward()
    assert protos.heads[0].weight.grad is not None
    protos.drop_gradients_()
    assert all(h.weight.grad is None for h in protos.heads)
    centroids = [torch.randn(3, 4), torch.randn(5, 4)]
    protos.load_centroids_(centroids)
    for head, centroid in zip(protos.heads, centroids, strict=True):
        assert torch.equal(head.weight.detach(), centroid)
    with pytest.raises(ValueError, match="1 centroid matrices for 2 prototype heads"):
        protos.load_centroids_(centroids[:1])
    with pytest.raises(ValueError, match=r"centroids of shape \(4, 4\) for a head of shape \(3, 4\)"):
        protos.load_centroids_([torch.randn(4, 4), centroids[1]])


def test_projection_head_layers():
    head = ProjectionHead(8, 16, 4, num_layers=3, batch_norm=True)
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert head(torch.randn(5, 8)).shape == (5, 4)
    assert len(ProjectionHead(8, 16, 4, num_layers=1).mlp) == 1


def test_sinusoidal_encoding_follows_vaswani():
    """``PE[p, 2i] = sin(p / 10000^(2i / d))`` and ``PE[p, 2i + 1] = cos(p / 10000^(2i / d))``, odd ``d``
    included; float32 unless a dtype is asked for."""
    for dim in (6, 7):
        pe = sinusoidal_position_encoding(1001, dim)
        assert pe.dtype == torch.float32 and pe.shape == (1001, dim)
        for p in (0, 1, 2, 3, 500, 1000):  # far positions make the frequencies' base matter
            for j in range(dim):
                angle = p / 10000 ** ((j - j % 2) / dim)
                expected = math.sin(angle) if j % 2 == 0 else math.cos(angle)
                assert abs(float(pe[p, j]) - expected) < 2e-4, (dim, p, j)
    for dtype in (torch.float64, torch.bfloat16):
        pe = sinusoidal_position_encoding(5, 6, dtype=dtype)
        assert pe.dtype == dtype
        torch.testing.assert_close(pe, sinusoidal_position_encoding(5, 6).to(dtype))


def test_defaults_are_the_authors_configuration():
    """640-wide tokens, 4 post-norm layers with deformable attention (8 heads of 64), feed-forward 720: the
    default aggregator has the layers and weight shapes of the explicitly configured one."""
    with torch.device("meta"):  # shapes only, no weights to initialise
        default = SliceAggregator()
        explicit = SliceAggregator(
            640, num_layers=4, ff_dim=720, heads=8, dim_head=64, dropout=0.1, attention="deformable"
        )
    shapes = {key: value.shape for key, value in default.state_dict().items()}
    assert shapes == {key: value.shape for key, value in explicit.state_dict().items()}


def test_without_layers_z_is_the_mean_of_the_valid_tokens():
    agg = SliceAggregator(4, num_layers=0, ff_dim=1, heads=1, dim_head=2)
    tokens = torch.randn(2, 5, 4)
    valid = torch.arange(5)[None] < torch.tensor([[5], [3]])
    out, z = agg(tokens, valid)
    torch.testing.assert_close(out, tokens * valid[..., None])
    torch.testing.assert_close(z, torch.stack([tokens[0].mean(0), tokens[1, :3].mean(0)]))


def test_size_rules_at_their_boundaries():
    SliceAggregator(1, num_layers=1, ff_dim=1, heads=1, dim_head=2)
    for kwargs, name, rule in (
        ({"d_model": 0}, "d_model", ">= 1"),
        ({"d_model": 2.0}, "d_model", ">= 1"),
        ({"num_layers": -1}, "num_layers", ">= 0"),
        ({"num_layers": 1.0}, "num_layers", ">= 0"),
        ({"ff_dim": 0}, "ff_dim", ">= 1"),
        ({"ff_dim": 2.0}, "ff_dim", ">= 1"),
    ):
        args = {"d_model": 1, "num_layers": 1, "ff_dim": 1, "heads": 1, "dim_head": 2, **kwargs}
        with pytest.raises(ValueError, match=f"{name} must be an integer {rule}"):
            SliceAggregator(**args)


def test_deformable_options_reach_every_layer():
    kwargs = {"downsample_factor": 2, "offset_kernel_size": 3, "grid": "centred"}
    torch.manual_seed(0)
    agg = SliceAggregator(16, num_layers=2, ff_dim=24, heads=2, dim_head=8, deformable_kwargs=kwargs).eval()
    tokens = torch.randn(1, 7, 16)
    with torch.no_grad():
        for layer in agg.layers:
            reference = DeformableAttention1D(16, heads=2, dim_head=8, **kwargs).eval()
            reference.load_state_dict(layer.attn.state_dict())
            torch.testing.assert_close(layer.attn(tokens), reference(tokens))


@pytest.mark.parametrize("attention", ["deformable", "full"])
def test_aggregator_runs_in_bfloat16(attention):
    """The position encoding follows the tokens' dtype: a bfloat16 aggregator runs end to end and agrees with
    float32 within bfloat16 precision."""
    agg = _aggregator(attention, position_encoding=True)
    tokens = torch.randn(2, 6, 16)
    with torch.no_grad():
        expected = agg(tokens)[1]
        x, z = agg.to(torch.bfloat16)(tokens.to(torch.bfloat16))
    assert x.dtype == z.dtype == torch.bfloat16
    torch.testing.assert_close(z.float(), expected, atol=0.1, rtol=0.05)


def test_full_attention_defaults_are_eight_heads_of_64_without_dropout():
    torch.manual_seed(0)
    default = FullAttention1D(16).train()
    explicit = FullAttention1D(16, heads=8, dim_head=64, dropout=0.0).train()
    explicit.load_state_dict(default.state_dict())
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(default(x), explicit(x))


def test_full_attention_dropout_acts_only_while_training():
    torch.manual_seed(0)
    attn = FullAttention1D(16, heads=2, dim_head=8, dropout=0.5)
    x = torch.randn(2, 12, 16)
    valid = torch.ones(2, 12, dtype=torch.bool)
    eval_out = attn.eval()(x, valid)
    torch.testing.assert_close(attn(x, valid), eval_out)
    assert not torch.allclose(attn.train()(x, valid), eval_out, atol=1e-4)
