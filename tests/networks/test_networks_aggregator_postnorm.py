"""The aggregator's layers are post-norm, as the authors' (``x = LN(x + attn(x)); x = LN(x + FF(x))``)."""

from __future__ import annotations

import torch

from jointssl_monai.networks import SliceTransformerLayer


def test_layer_is_post_norm_against_a_hand_written_reference():
    torch.manual_seed(0)
    layer = SliceTransformerLayer(d_model=16, ff_dim=24, heads=2, dim_head=8, dropout=0.0, attention="full")
    with torch.no_grad():  # non-trivial LayerNorm affines, so pre- and post-norm cannot coincide
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-0.5, 0.5)
    layer.eval()
    x = 3.0 * torch.randn(2, 7, 16) + 1.0
    valid = torch.ones(2, 7, dtype=torch.bool)
    h = layer.norm1(x + layer.attn(x, valid))
    expected = layer.norm2(h + layer.ff(h))
    torch.testing.assert_close(layer(x, valid), expected)
    # every output token is LayerNorm-ed (post-norm): its features have the norm's statistics
    pre = x + layer.attn(layer.norm1(x), valid)
    pre = pre + layer.ff(layer.norm2(pre))
    assert not torch.allclose(layer(x, valid), pre, atol=1e-3)
