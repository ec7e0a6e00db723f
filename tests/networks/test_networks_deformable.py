import math

import pytest
import torch

from jointssl_monai.networks import ContinuousPositionBias1D, DeformableAttention1D
from jointssl_monai.networks.deformable_attention import GroupedLinear


def _attention(dim=4, heads=2, dim_head=3, factor=3, kernel=3, zero_bias=True, seed=0):
    torch.manual_seed(seed)
    attn = DeformableAttention1D(
        dim,
        heads=heads,
        dim_head=dim_head,
        downsample_factor=factor,
        offset_kernel_size=kernel,
        grid="centred",
        grouped_projections=False,
    ).eval()
    with torch.no_grad():
        attn.to_offsets[2].weight.zero_()  # tanh(0) = 0: zero offsets
        if zero_bias:
            attn.rel_pos_bias.mlp[-1].weight.zero_()
    return attn


def _plain_attention(attn, x, keys, bias=None):
    """Reference: per-head softmax(q k^T / sqrt(d) + bias) v with keys/values projected from ``keys``."""
    wq, wk, wv = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
    outs = []
    for h in range(attn.heads):
        sl = slice(h * attn.dim_head, (h + 1) * attn.dim_head)
        q, k, v = x @ wq[sl].T, keys @ wk[sl].T, keys @ wv[sl].T
        logits = q @ k.T / math.sqrt(attn.dim_head)
        if bias is not None:
            logits = logits + bias[h]
        outs.append(torch.softmax(logits, dim=-1) @ v)
    return attn.to_out(torch.cat(outs, dim=-1))


def test_zero_offsets_equal_plain_attention_over_downsampled_keys():
    attn = _attention(factor=3, kernel=3)
    x = torch.randn(1, 6, 4)
    out, pos = attn(x, return_positions=True)
    # blocks {0,1,2} and {3,4,5}: reference points at their centres, slices 1 and 4
    assert torch.equal(pos, torch.tensor([[[1.0, 4.0]] * 2]))
    expected = _plain_attention(attn, x[0], x[0, [1, 4]])
    torch.testing.assert_close(out[0], expected)


def test_zero_offsets_interpolate_between_slices():
    attn = _attention(factor=4, kernel=6)
    x = torch.randn(1, 8, 4)
    out, pos = attn(x, return_positions=True)
    assert torch.equal(pos[0, 0], torch.tensor([1.5, 5.5]))
    keys = torch.stack([(x[0, 1] + x[0, 2]) / 2, (x[0, 5] + x[0, 6]) / 2])
    torch.testing.assert_close(out[0], _plain_attention(attn, x[0], keys))


def test_zero_offsets_with_relative_position_bias_and_short_sequence():
    attn = _attention(factor=4, kernel=6, zero_bias=False)
    x = torch.randn(1, 8, 4)
    valid = torch.tensor([[True] * 5 + [False] * 3])
    out, pos = attn(x, valid, return_positions=True)
    # second block holds only slice 4: its reference point is clamped into the valid range
    assert torch.equal(pos[0, 0], torch.tensor([1.5, 4.0]))
    keys = torch.stack([(x[0, 1] + x[0, 2]) / 2, x[0, 4]])
    rel = torch.arange(5.0)[None, :, None] - torch.tensor([1.5, 4.0])[None, None, :]
    bias = attn.rel_pos_bias(rel[None].expand(1, 2, 5, 2))[0]
    torch.testing.assert_close(out[0, :5], _plain_attention(attn, x[0, :5], keys, bias))


@pytest.mark.parametrize("grid", ["normalized", "centred"])
def test_padding_content_and_padded_length_change_nothing(grid):
    torch.manual_seed(1)
    attn = DeformableAttention1D(8, heads=2, dim_head=4, downsample_factor=4, offset_kernel_size=6, grid=grid)
    attn.eval()
    with torch.no_grad():  # large offsets, so that the border of the valid range matters
        attn.to_offsets[2].weight.mul_(50)
    seq = torch.randn(1, 7, 8)
    alone = attn(seq)
    for padded_len in (8, 13):
        x = torch.randn(2, padded_len, 8) * 100  # garbage everywhere, then the real sequence in row 0
        x[0, :7] = seq[0]
        valid = torch.arange(padded_len)[None] < torch.tensor([[7], [padded_len]])
        out, pos = attn(x, valid, return_positions=True)
        torch.testing.assert_close(out[0, :7], alone[0], rtol=1e-5, atol=1e-5)
        if grid == "centred":  # clamped into the valid range (normalized reads zeros outside it)
            assert pos[0].max() <= 6 and pos.min() >= 0


@pytest.mark.parametrize("grid", ["normalized", "centred"])
@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 9])
def test_any_length_and_bounded_offsets(length, grid):
    torch.manual_seed(length)
    attn = DeformableAttention1D(8, heads=2, dim_head=4, offset_scale=2.0, grid=grid)
    x = torch.randn(3, length, 8, requires_grad=True)
    out, pos = attn(x, return_positions=True)
    assert out.shape == (3, length, 8) and torch.isfinite(out).all()
    m = torch.arange(pos.shape[-1])
    if grid == "centred":
        # offsets are in cells of downsample_factor slices: at most 2 * 4 slices (was 2 slices before)
        centres = m * 4 + ((length - m * 4).clamp(max=4) - 1) / 2
        assert ((pos - centres).abs() <= 2.0 * 4 + 1e-6).all() and pos.max() <= length - 1 and pos.min() >= 0
    else:
        assert pos.shape[-1] == max(length // 4, min(length, 2))
        cell = length / max(pos.shape[-1] - 1, 1)
        assert ((pos - (m * cell - 0.5)).abs() <= 2.0 * cell + 1e-5).all()
    out.sum().backward()
    # offsets are learned through the interpolation weights (unless every point sits on a clamped border)
    assert attn.to_offsets[0].weight.grad.abs().sum() > 0 or (length <= 2 and grid == "centred")


def test_short_sequences_attend_over_two_points():
    """``downsample_factor <= L < 2 * downsample_factor`` has one point in the reference (a constant softmax);
    here two, so that keys and the position bias are learned on short volumes too."""
    torch.manual_seed(0)
    # a position-bias MLP wide enough that no initialisation leaves all its hidden units dead
    attn = DeformableAttention1D(32, heads=2, dim_head=4, cpb_hidden_dim=16)
    out, pos = attn(torch.randn(2, 5, 32), return_positions=True)
    assert pos.shape == (2, 2, 2)
    out.sum().backward()
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def _constant_offsets(attn, fraction):
    """Make every predicted offset ``fraction * offset_scale`` (grid cells), whatever the queries."""
    with torch.no_grad():
        attn.to_offsets[0].weight.zero_()
        attn.to_offsets[0].bias.fill_(1.0)  # GELU(1) everywhere
        gelu1 = torch.nn.functional.gelu(torch.tensor(1.0))
        attn.to_offsets[2].weight.fill_(math.atanh(fraction) / (attn.dim_head * gelu1))


@pytest.mark.parametrize("grid", ["normalized", "centred"])
def test_offset_scale_is_in_downsampled_cells(grid):
    """``offset_scale`` counts grid cells (as in lucidrains' module), not slices: 2 cells at factor 4 and 64
    slices move a point by 8 slices (centred) or 2 * 64 / 15 slices (normalized)."""
    for offset_scale, fraction, cells in ((2.0, 0.5, 1.0), (2.0, -0.75, -1.5), (None, 0.5, 2.0)):
        attn = DeformableAttention1D(16, heads=2, dim_head=4, offset_scale=offset_scale, grid=grid).eval()
        _constant_offsets(attn, fraction)
        _, pos = attn(torch.randn(1, 64, 16), return_positions=True)
        m = torch.arange(16.0)
        if grid == "centred":
            expected = (m * 4 + 1.5 + cells * 4).clamp(0, 63)
        else:
            expected = (m + cells) * 64 / 15 - 0.5
        torch.testing.assert_close(pos, expected.expand(1, 2, 16), rtol=0, atol=1e-4)


def test_grouped_projections_read_their_own_feature_block():
    attn = DeformableAttention1D(8, heads=2, dim_head=3)
    assert attn.to_q.weight.shape == (6, 4) and attn.to_k.weight.shape == (6, 4)
    x = torch.randn(5, 8)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(5, 4)  # head 1's block only
    for proj in (attn.to_q, attn.to_k, attn.to_v):
        torch.testing.assert_close(proj(x)[:, :3], proj(x2)[:, :3])
        assert not torch.allclose(proj(x)[:, 3:], proj(x2)[:, 3:])
    with pytest.raises(ValueError, match="divisible"):
        DeformableAttention1D(10, heads=4, dim_head=3)
    assert DeformableAttention1D(10, heads=4, dim_head=3, grouped_projections=False).to_q.weight.shape == (
        12,
        10,
    )


def test_rejects_non_prefix_mask():
    attn = DeformableAttention1D(8, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="prefix"):
        attn(torch.randn(1, 4, 8), torch.tensor([[True, False, True, False]]))


def test_mask_and_token_checks_name_the_rule():
    attn = DeformableAttention1D(8, heads=2, dim_head=4)
    x = torch.randn(1, 4, 8)
    with pytest.raises(
        ValueError, match=r"valid must be a bool tensor of shape \(1, 4\), got torch.bool \(1, 5\)"
    ):
        attn(x, torch.ones(1, 5, dtype=torch.bool))  # right dtype, wrong shape
    with pytest.raises(ValueError, match=r"valid must be a bool tensor of shape \(1, 4\), got torch.int64"):
        attn(x, torch.ones(1, 4, dtype=torch.long))  # right shape, wrong dtype
    with pytest.raises(ValueError, match="valid must mark a non-empty prefix"):
        attn(x, torch.zeros(1, 4, dtype=torch.bool))  # an empty sequence is a prefix, but not a non-empty one
    with pytest.raises(ValueError, match=r"tokens must be \(B, S, dim\), got \(4, 8\)"):
        attn(x[0])


def test_constructor_rules_at_their_boundaries():
    DeformableAttention1D(8, heads=2, dim_head=4, downsample_factor=1, offset_kernel_size=1)
    with pytest.raises(ValueError, match="downsample_factor must be >= 1"):
        DeformableAttention1D(8, heads=2, dim_head=4, downsample_factor=0, offset_kernel_size=1)
    DeformableAttention1D(8, heads=2, dim_head=4, downsample_factor=3, offset_kernel_size=3)
    with pytest.raises(ValueError, match=r"offset_kernel_size \(2\) must be >= downsample_factor \(3\)"):
        DeformableAttention1D(8, heads=2, dim_head=4, downsample_factor=3, offset_kernel_size=2)
    with pytest.raises(ValueError, match="grid must be one of"):
        DeformableAttention1D(8, heads=2, dim_head=4, grid="uniform")
    with pytest.raises(
        ValueError, match=r"heads \(4\); pass grouped_projections=False for dense projections\.$"
    ):
        DeformableAttention1D(10, heads=4, dim_head=3)


def test_default_heads_split_the_features_into_eight_groups():
    """The documented default of 8 heads: grouped projections need ``dim`` divisible by 8."""
    DeformableAttention1D(16)
    with pytest.raises(ValueError, match=r"dim \(12\) divisible by heads \(8\)"):
        DeformableAttention1D(12)


def test_grouped_linear_is_a_block_diagonal_linear_map_on_any_leading_shape():
    torch.manual_seed(0)
    proj = GroupedLinear(6, 4, groups=2)
    x = torch.randn(2, 3, 6)
    dense = torch.block_diag(*proj.weight.chunk(2, dim=0))  # (4, 6)
    torch.testing.assert_close(proj(x), x @ dense.T)
    single = GroupedLinear(3, 5)  # groups=1 by default: a dense bias-free linear map
    torch.testing.assert_close(single(x[..., :3]), x[..., :3] @ single.weight.T)
    with pytest.raises(ValueError, match=r"out_features \(3\) must be divisible by groups \(2\)"):
        GroupedLinear(4, 3, groups=2)
    with pytest.raises(ValueError, match=r"in_features \(3\) and out_features \(4\) must be divisible"):
        GroupedLinear(3, 4, groups=2)


def test_grouped_linear_initialises_like_nn_linear():
    """Uniform in ``+/- 1 / sqrt(fan_in)``, the bound of ``nn.Linear``'s default initialisation."""
    torch.manual_seed(0)
    weight = GroupedLinear(64, 512, groups=2).weight.detach()  # fan_in = 32
    bound = 1 / math.sqrt(32)
    assert float(weight.abs().max()) <= bound
    assert float(weight.abs().max()) > 0.99 * bound
    torch.testing.assert_close(weight.std(), torch.tensor(bound / math.sqrt(3)), rtol=0.02, atol=0)


def _mlp_by_hand(bias: ContinuousPositionBias1D, d: torch.Tensor) -> torch.Tensor:
    linears = [m for m in bias.mlp if isinstance(m, torch.nn.Linear)]
    h = d[..., None]
    for layer in linears[:-1]:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    return (h @ linears[-1].weight.T)[..., 0]


def test_position_bias_defaults_are_two_hidden_layers_on_log_distances():
    torch.manual_seed(0)
    bias = ContinuousPositionBias1D(5)
    d = torch.tensor([[-7.5, -1.0, 0.0, 0.25, 3.0]])
    hidden = [m for m in bias.mlp if isinstance(m, torch.nn.Linear)][:-1]
    assert len(hidden) == 2
    torch.testing.assert_close(bias(d), _mlp_by_hand(bias, torch.sign(d) * torch.log1p(d.abs())))
    # no output bias: with the hidden layers silenced the bias is exactly zero
    with torch.no_grad():
        for layer in hidden:
            layer.weight.zero_()
            layer.bias.fill_(-1.0)
    assert torch.equal(bias(d), torch.zeros_like(d))


def test_position_bias_options_reach_the_mlp():
    torch.manual_seed(0)
    linear = ContinuousPositionBias1D(3, depth=1, log_distance=False)
    d = torch.tensor([-4.0, 0.5, 9.0])
    assert len([m for m in linear.mlp if isinstance(m, torch.nn.Linear)]) == 2
    torch.testing.assert_close(linear(d), _mlp_by_hand(linear, d))
    with pytest.raises(ValueError, match="hidden_dim and depth must be >= 1"):
        ContinuousPositionBias1D(3, depth=0)
    with pytest.raises(ValueError, match="hidden_dim and depth must be >= 1"):
        ContinuousPositionBias1D(0, depth=2)
    attn = DeformableAttention1D(
        8, heads=2, dim_head=4, cpb_hidden_dim=3, cpb_depth=1, cpb_log_distance=False
    )
    torch.testing.assert_close(attn.rel_pos_bias(d), _mlp_by_hand(attn.rel_pos_bias, d))
    assert attn.rel_pos_bias.mlp[0].out_features == 3
    # default width: a quarter of the token size, at least one
    assert DeformableAttention1D(4, heads=2, dim_head=4).rel_pos_bias.mlp[0].out_features == 1
    assert DeformableAttention1D(3, heads=1, dim_head=4).rel_pos_bias.mlp[0].out_features == 1
    assert DeformableAttention1D(16, heads=2, dim_head=4).rel_pos_bias.mlp[0].out_features == 4


def _recorded_bias_input(attn: DeformableAttention1D, x: torch.Tensor, valid: torch.Tensor):
    seen = {}
    hook = attn.rel_pos_bias.register_forward_pre_hook(lambda mod, args: seen.setdefault("rel", args[0]))
    _, pos = attn(x, valid, return_positions=True)
    hook.remove()
    return seen["rel"], pos


@pytest.mark.parametrize("grid", ["normalized", "centred"])
def test_position_bias_sees_the_documented_relative_positions(grid):
    """normalized: ``2 i / max(L - 1, 1) - 1 - u`` with ``u = (2 pos + 1) / L - 1``; centred: ``i - pos``
    in slices; at every length, including one and two slices."""
    torch.manual_seed(0)
    attn = DeformableAttention1D(8, heads=2, dim_head=4, grid=grid).eval()
    with torch.no_grad():
        attn.to_offsets[2].weight.mul_(10)
    lengths = [1, 2, 3, 6, 9]
    x = torch.randn(len(lengths), 9, 8)
    valid = torch.arange(9)[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        rel, pos = _recorded_bias_input(attn, x, valid)
    for b, n in enumerate(lengths):
        m = int(attn.num_points(torch.tensor(n)))
        i = torch.arange(n, dtype=torch.float32)[:, None]
        p = pos[b, :, :m][:, None, :]
        u = (2 * p + 1) / n - 1
        expected = 2 * i / max(n - 1, 1) - 1 - u if grid == "normalized" else i - p
        torch.testing.assert_close(rel[b, :, :n, :m], expected, atol=1e-5, rtol=1e-5)


def test_cut_short_blocks_are_centred_on_their_valid_slices_before_the_offset():
    """centred grid: a block of ``f`` slices cut short by the end of the sequence uses the centre of its
    valid slices, then moves by ``f * offset`` slices (here -0.25 cells, one slice to the left)."""
    attn = DeformableAttention1D(8, heads=2, dim_head=4, grid="centred").eval()  # f = 4
    _constant_offsets(attn, -0.25 / attn.offset_scale)
    for length, centres in ((5, [1.5, 4.0]), (7, [1.5, 5.0]), (8, [1.5, 5.5])):
        _, pos = attn(torch.randn(1, length, 8), return_positions=True)
        torch.testing.assert_close(pos[0], (torch.tensor(centres) - 1.0).expand(2, 2))


def test_dropout_on_the_attention_weights_only_while_training():
    torch.manual_seed(0)
    attn = DeformableAttention1D(8, heads=2, dim_head=4, dropout=0.5)
    plain = DeformableAttention1D(8, heads=2, dim_head=4, dropout=0.0)
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(2, 12, 8)
    attn.train()
    plain.train()
    torch.manual_seed(1)
    dropped = attn(x)
    torch.manual_seed(1)
    assert not torch.allclose(dropped, plain(x), atol=1e-4)
    attn.eval()
    torch.testing.assert_close(attn(x), plain(x))


@pytest.mark.parametrize("grid", ["normalized", "centred"])
def test_runs_in_bfloat16_close_to_float32(grid):
    """Positions, relative positions and the mask follow the tokens' dtype (a bfloat16 module runs end to
    end) and the result agrees with float32 within bfloat16 precision."""
    torch.manual_seed(0)
    attn = DeformableAttention1D(16, heads=2, dim_head=8, grid=grid).eval()
    x = torch.randn(2, 11, 16)
    valid = torch.arange(11)[None] < torch.tensor([[11], [7]])
    with torch.no_grad():
        expected = attn(x, valid)
        out = attn.to(torch.bfloat16)(x.to(torch.bfloat16), valid)
    assert out.dtype == torch.bfloat16
    keep = valid[..., None].expand_as(out)
    torch.testing.assert_close(out.float()[keep], expected[keep], atol=0.05, rtol=0.05)


def test_sampled_keys_keep_the_projections_precision_under_autocast(monkeypatch):
    """Under autocast the projections run in bfloat16 while the positions stay float32: the interpolated
    keys and values stay bfloat16 (no float32 copy) and the output is close to the float32 one."""
    torch.manual_seed(0)
    attn = DeformableAttention1D(16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 11, 16)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.dtype, k.dtype, v.dtype))
        return sdpa(q, k, v, **kwargs)

    with torch.no_grad():
        expected = attn(x)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, pos = attn(x, return_positions=True)
    assert pos.dtype == torch.float32
    assert seen == [(torch.bfloat16,) * 3]
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
