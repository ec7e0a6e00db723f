"""The aggregator's layers are post-norm, as the authors' (``x = LN(x + attn(x)); x = LN(x + FF(x))``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.networks import DeformableAttention1D, FullAttention1D, SliceTransformerLayer


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


def _feed_forward_by_hand(layer: SliceTransformerLayer, h: torch.Tensor) -> torch.Tensor:
    """``W2 GELU(W1 h + b1) + b2`` (eval mode: no dropout)."""
    first, last = layer.ff[0], layer.ff[-1]
    return F.linear(F.gelu(F.linear(h, first.weight, first.bias)), last.weight, last.bias)


@pytest.mark.parametrize("attention", ["full", "deformable"])
def test_layer_is_post_norm_with_a_gelu_feed_forward(attention: str) -> None:
    torch.manual_seed(1)
    layer = SliceTransformerLayer(16, ff_dim=24, heads=2, dim_head=8, dropout=0.2, attention=attention).eval()
    with torch.no_grad():
        for norm in (layer.norm1, layer.norm2):
            norm.weight.uniform_(0.5, 2.0)
            norm.bias.uniform_(-0.5, 0.5)
    x = 2.0 * torch.randn(2, 9, 16)
    valid = torch.arange(9)[None] < torch.tensor([[9], [5]])
    with torch.no_grad():
        h = F.layer_norm(x + layer.attn(x, valid), (16,), layer.norm1.weight, layer.norm1.bias)
        expected = F.layer_norm(
            h + _feed_forward_by_hand(layer, h), (16,), layer.norm2.weight, layer.norm2.bias
        )
        torch.testing.assert_close(layer(x, valid), expected)


def test_default_attention_is_deformable() -> None:
    torch.manual_seed(0)
    layer = SliceTransformerLayer(16, ff_dim=24, heads=2, dim_head=8, dropout=0.0).eval()
    reference = DeformableAttention1D(16, heads=2, dim_head=8).eval()
    reference.load_state_dict(layer.attn.state_dict())
    x = torch.randn(1, 9, 16)
    valid = torch.ones(1, 9, dtype=torch.bool)
    torch.testing.assert_close(layer.attn(x, valid), reference(x, valid))


@pytest.mark.parametrize("attention", ["full", "deformable"])
def test_layer_builds_its_attention_from_its_arguments(attention: str) -> None:
    """Heads, head size, dropout and the deformable options reach the attention: it computes what an attention
    module built with them computes, dropout draws included."""
    kwargs = {"downsample_factor": 2, "offset_kernel_size": 3, "grid": "centred"}
    torch.manual_seed(0)
    layer = SliceTransformerLayer(
        12, ff_dim=8, heads=3, dim_head=5, dropout=0.4, attention=attention, deformable_kwargs=kwargs
    )
    if attention == "full":
        reference = FullAttention1D(12, heads=3, dim_head=5, dropout=0.4)
    else:
        reference = DeformableAttention1D(12, heads=3, dim_head=5, dropout=0.4, **kwargs)
    reference.load_state_dict(layer.attn.state_dict())
    x = torch.randn(2, 9, 12)
    valid = torch.arange(9)[None] < torch.tensor([[9], [6]])
    for mode in ("eval", "train"):
        getattr(layer, mode)()
        getattr(reference, mode)()
        torch.manual_seed(5)
        got = layer.attn(x, valid)
        torch.manual_seed(5)
        torch.testing.assert_close(got, reference(x, valid))
    torch.manual_seed(5)
    assert not torch.allclose(layer.attn(x, valid), layer.eval().attn(x, valid), atol=1e-4)  # dropout acts


def test_feed_forward_drops_hidden_units_while_training() -> None:
    torch.manual_seed(0)
    layer = SliceTransformerLayer(16, ff_dim=64, heads=2, dim_head=8, dropout=0.5, attention="full")
    seen = []
    layer.ff[-1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach()))
    x = torch.randn(4, 10, 16)
    valid = torch.ones(4, 10, dtype=torch.bool)
    layer.train()(x, valid)
    layer.eval()(x, valid)
    dropped, kept = seen
    assert 0.4 < float((dropped == 0).float().mean()) < 0.6
    assert float((kept == 0).float().mean()) < 0.01


def test_layer_rejects_an_unknown_attention() -> None:
    with pytest.raises(ValueError, match="attention must be 'deformable' or 'full', got 'linear'"):
        SliceTransformerLayer(16, ff_dim=24, heads=2, dim_head=8, dropout=0.0, attention="linear")
