import math

import pytest
import torch

from jointssl_monai.networks import DeformableAttention1D


def _attention(dim=4, heads=2, dim_head=3, factor=3, kernel=3, zero_bias=True, seed=0):
    torch.manual_seed(seed)
    attn = DeformableAttention1D(
        dim, heads=heads, dim_head=dim_head, downsample_factor=factor, offset_kernel_size=kernel
    ).eval()
    with torch.no_grad():
        attn.to_offsets[2].weight.zero_()  # tanh(0) = 0: zero offsets
        if zero_bias:
            attn.rel_pos_bias.w2.zero_()
            attn.rel_pos_bias.b2.zero_()
    return attn


def _plain_attention(attn, x, keys, bias=None):
    """Reference: per-head softmax(q k^T / sqrt(d) + bias) v with keys/values projected from ``keys``."""
    inner = attn.heads * attn.dim_head
    wq, wk, wv = attn.to_q.weight, attn.to_kv.weight[:inner], attn.to_kv.weight[inner:]
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


def test_padding_content_and_padded_length_change_nothing():
    torch.manual_seed(1)
    attn = DeformableAttention1D(8, heads=2, dim_head=4, downsample_factor=4, offset_kernel_size=6).eval()
    with torch.no_grad():  # large offsets, so that clamping to the valid range matters
        attn.to_offsets[2].weight.mul_(50)
    seq = torch.randn(1, 7, 8)
    alone = attn(seq)
    for padded_len in (8, 13):
        x = torch.randn(2, padded_len, 8) * 100  # garbage everywhere, then the real sequence in row 0
        x[0, :7] = seq[0]
        valid = torch.arange(padded_len)[None] < torch.tensor([[7], [padded_len]])
        out, pos = attn(x, valid, return_positions=True)
        torch.testing.assert_close(out[0, :7], alone[0], rtol=1e-5, atol=1e-5)
        assert pos[0].max() <= 6 and pos.min() >= 0


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 9])
def test_any_length_and_bounded_offsets(length):
    torch.manual_seed(length)
    attn = DeformableAttention1D(8, heads=2, dim_head=4, offset_scale=2.0)
    x = torch.randn(3, length, 8, requires_grad=True)
    out, pos = attn(x, return_positions=True)
    assert out.shape == (3, length, 8) and torch.isfinite(out).all()
    start = torch.arange(pos.shape[-1]) * 4
    centres = start + ((length - start).clamp(max=4) - 1) / 2
    assert ((pos - centres).abs() <= 2.0 + 1e-6).all() and pos.max() <= length - 1 and pos.min() >= 0
    out.sum().backward()
    # offsets are learned through the interpolation weights (unless every point sits on a clamped border)
    assert attn.to_offsets[0].weight.grad.abs().sum() > 0 or length <= 2


def test_rejects_non_prefix_mask():
    attn = DeformableAttention1D(8, heads=2, dim_head=4)
    with pytest.raises(ValueError, match="prefix"):
        attn(torch.randn(1, 4, 8), torch.tensor([[True, False, True, False]]))
