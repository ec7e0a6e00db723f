"""Attention over slices (``return_attention``): the weights are exposed without changing the outputs, and
applied to the values they reproduce the output."""

from __future__ import annotations

import math

import pytest
import torch

from jointssl_monai.networks.aggregator import FullAttention1D, SliceAggregator, sinusoidal_position_encoding
from jointssl_monai.networks.deformable_attention import DeformableAttention1D


def _valid(lengths: list[int], s: int) -> torch.Tensor:
    return torch.arange(s)[None] < torch.tensor(lengths)[:, None]


def _deformable_map_by_hand(
    attn: DeformableAttention1D, x: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Per sequence, head and query: softmax over the sampled points of ``q k / sqrt(dh) + bias``, each
    point's weight split onto the two slices it interpolates (``1 - frac`` and ``frac``; slices outside
    the sequence get nothing)."""
    b, s, _ = x.shape
    h, dh = attn.heads, attn.dim_head
    recorded = {}
    cpb = attn.rel_pos_bias
    hook = cpb.register_forward_hook(lambda mod, inp, out: recorded.setdefault("bias", out))
    _, pos = attn(x, valid, return_positions=True)
    hook.remove()
    q = attn.to_q(x).reshape(b, s, h, dh).transpose(1, 2)
    k_all = attn.to_k(x).reshape(b, s, h, dh).transpose(1, 2)
    lengths = valid.sum(1).tolist()
    points = attn.num_points(valid.sum(1)).tolist()
    expected = torch.zeros(b, h, s, s)
    for bi in range(b):
        n = lengths[bi]
        for hi in range(h):
            keys, spread = [], []
            for m in range(points[bi]):
                p = float(pos[bi, hi, m])
                lo = math.floor(p)
                parts = [(lo, 1 - (p - lo)), (lo + 1, p - lo)]
                parts = [(j, w) for j, w in parts if 0 <= j < n]
                keys.append(sum((w * k_all[bi, hi, j] for j, w in parts), torch.zeros(dh)))
                spread.append(parts)
            keys_t = torch.stack(keys)
            for i in range(n):
                logits = keys_t @ q[bi, hi, i] / math.sqrt(dh) + recorded["bias"][bi, hi, i, : points[bi]]
                weights = logits.softmax(0)
                for m, parts in enumerate(spread):
                    for j, w in parts:
                        expected[bi, hi, i, j] += weights[m] * w
    return expected


@pytest.mark.parametrize("grid", ["normalized", "centred"])
@pytest.mark.parametrize("grouped", [True, False])
def test_deformable_attention_weights_reproduce_the_output(grid: str, grouped: bool) -> None:
    torch.manual_seed(0)
    attn = DeformableAttention1D(32, heads=4, dim_head=8, grid=grid, grouped_projections=grouped).eval()
    x = torch.randn(3, 13, 32)
    valid = _valid([13, 9, 2], 13)
    with torch.no_grad():
        plain = attn(x, valid)
        out, pos, weights = attn(x, valid, return_positions=True, return_attention=True)
        out_only, weights_only = attn(x, valid, return_attention=True)
    assert torch.equal(out, plain) and torch.equal(out_only, plain)
    assert torch.equal(weights, weights_only) and pos.shape[:2] == (3, 4)
    assert weights.shape == (3, 4, 13, 13) and weights.dtype == torch.float32
    assert bool((weights >= 0).all())
    # padded key slices get nothing; a row sums to at most one (points outside the sequence read zeros)
    assert float(weights.masked_select(~valid[:, None, None, :].expand_as(weights)).abs().max()) == 0.0
    assert float(weights.sum(-1).max()) <= 1.0 + 1e-5
    # the weights over slices applied to the values give the module's output
    values = attn.to_v(x).reshape(3, 13, 4, 8).transpose(1, 2)
    rebuilt = attn.to_out((weights @ values).transpose(1, 2).reshape(3, 13, 32))
    keep = valid[..., None].expand_as(out)
    torch.testing.assert_close(rebuilt[keep], out[keep], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grid", ["normalized", "centred"])
def test_deformable_attention_weights_match_a_per_point_loop(grid: str) -> None:
    """At valid queries the map is the softmax over the sampled points, each point's weight split linearly
    onto its two neighbouring slices (written out point by point, with large offsets)."""
    torch.manual_seed(3)
    attn = DeformableAttention1D(
        12, heads=2, dim_head=5, downsample_factor=3, offset_kernel_size=4, grid=grid
    )
    attn.eval()
    with torch.no_grad():
        attn.to_offsets[2].weight.mul_(20)
    x = torch.randn(2, 11, 12)
    valid = _valid([11, 7], 11)
    with torch.no_grad():
        _, weights = attn(x, valid, return_attention=True)
        expected = _deformable_map_by_hand(attn, x, valid)
    keep = valid[:, None, :, None].expand_as(weights)
    torch.testing.assert_close(weights[keep], expected[keep], atol=1e-5, rtol=1e-4)


def test_full_attention_weights_are_the_masked_softmax() -> None:
    torch.manual_seed(1)
    attn = FullAttention1D(16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 7, 16)
    valid = _valid([7, 4], 7)
    with torch.no_grad():
        plain = attn(x, valid)
        out, weights = attn(x, valid, return_attention=True)
        q, k, v = (x @ attn.to_qkv.weight.T).reshape(2, 7, 3, 2, 8).unbind(2)  # bias-free projections
    assert torch.equal(out, plain) and weights.dtype == torch.float32
    for b, n in enumerate((7, 4)):
        for h in range(2):
            logits = q[b, :, h] @ k[b, :n, h].T / math.sqrt(8)
            torch.testing.assert_close(weights[b, h, :, :n], logits.softmax(-1))
    assert float(weights[1, :, :, 4:].abs().max()) == 0.0
    values = v.transpose(1, 2)
    rebuilt = attn.to_out((weights @ values).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-4)
    # without a mask every slice is a key
    _, unmasked = attn(x, return_attention=True)
    for h in range(2):
        logits = q[1, :, h] @ k[1, :, h].T / math.sqrt(8)
        torch.testing.assert_close(unmasked[1, h], logits.softmax(-1))


@pytest.mark.parametrize("attention", ["deformable", "full"])
def test_aggregator_returns_one_map_per_layer_and_the_same_outputs(attention: str) -> None:
    torch.manual_seed(2)
    agg = SliceAggregator(32, num_layers=3, ff_dim=48, heads=2, dim_head=16, attention=attention).eval()
    tokens = torch.randn(2, 10, 32)
    valid = _valid([10, 6], 10)
    with torch.no_grad():
        x, z = agg(tokens, valid)
        x2, z2, maps = agg(tokens, valid, return_attention=True)
        # layer l's map is that layer's attention over the output of layer l - 1
        h = tokens + sinusoidal_position_encoding(10, 32) if agg.position_encoding else tokens
        for layer, got in zip(agg.layers, maps, strict=True):
            _, expected = layer.attn(h, valid, return_attention=True)
            torch.testing.assert_close(got, expected)
            h = layer(h, valid)
    assert torch.equal(x, x2) and torch.equal(z, z2)
    assert len(maps) == 3 and all(m.shape == (2, 2, 10, 10) for m in maps)
    assert not torch.allclose(maps[0], maps[1])
