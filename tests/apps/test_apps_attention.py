"""Attention over slices for the report: ``return_attention`` exposes the weights without changing outputs."""

from __future__ import annotations

import pytest
import torch

from jointssl_monai.networks.aggregator import FullAttention1D, SliceAggregator
from jointssl_monai.networks.deformable_attention import DeformableAttention1D


def _valid(lengths: list[int], s: int) -> torch.Tensor:
    return torch.arange(s)[None] < torch.tensor(lengths)[:, None]


@pytest.mark.parametrize("grid", ["normalized", "centred"])
@pytest.mark.parametrize("grouped", [True, False])
def test_deformable_attention_weights_reproduce_the_output(grid, grouped):
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


def test_full_attention_weights_are_the_masked_softmax():
    torch.manual_seed(1)
    attn = FullAttention1D(16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 7, 16)
    valid = _valid([7, 4], 7)
    with torch.no_grad():
        plain = attn(x, valid)
        out, weights = attn(x, valid, return_attention=True)
    assert torch.equal(out, plain)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 2, 7))
    assert float(weights[1, :, :, 4:].abs().max()) == 0.0
    values = attn.to_qkv(x).reshape(2, 7, 3, 2, 8)[:, :, 2].transpose(1, 2)
    rebuilt = attn.to_out((weights @ values).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attention", ["deformable", "full"])
def test_aggregator_returns_one_map_per_layer_and_the_same_outputs(attention):
    torch.manual_seed(2)
    agg = SliceAggregator(32, num_layers=3, ff_dim=48, heads=2, dim_head=16, attention=attention).eval()
    tokens = torch.randn(2, 10, 32)
    valid = _valid([10, 6], 10)
    with torch.no_grad():
        x, z = agg(tokens, valid)
        x2, z2, maps = agg(tokens, valid, return_attention=True)
    assert torch.equal(x, x2) and torch.equal(z, z2)
    assert len(maps) == 3 and all(m.shape == (2, 2, 10, 10) for m in maps)
