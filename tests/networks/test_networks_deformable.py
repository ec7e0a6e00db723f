import math

import pytest
import torch

from jointssl_monai.networks import DeformableAttention1D


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
    attn = DeformableAttention1D(8, heads=2, dim_head=4)
    out, pos = attn(torch.randn(2, 5, 8), return_positions=True)
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
