"""Projection heads and prototypes: the maps they compute, written out by hand, and their argument rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jointssl_monai.networks import MultiPrototypes, ProjectionHead


def test_projection_head_without_batch_norm_is_an_affine_mlp():
    """``W3 relu(W2 relu(W1 x + b1) + b2) + b3``: hidden layers keep their bias when there is no BatchNorm."""
    torch.manual_seed(0)
    head = ProjectionHead(6, 5, 3, num_layers=3, batch_norm=False)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    x = torch.randn(4, 6)
    h = x
    for layer in linears[:-1]:
        h = torch.relu(h @ layer.weight.T + layer.bias)
    torch.testing.assert_close(head(x), h @ linears[-1].weight.T + linears[-1].bias)


def test_projection_head_with_batch_norm_has_bias_free_hidden_layers():
    """``W2 relu(BN(W1 x)) + b2``: BatchNorm's shift replaces the hidden bias (fresh statistics in eval mode:
    ``BN(y) = y / sqrt(1 + eps)`` with the default affine parameters)."""
    torch.manual_seed(0)
    head = ProjectionHead(6, 5, 3, num_layers=2, batch_norm=True).eval()
    first, last = head.mlp[0], head.mlp[-1]
    x = torch.randn(4, 6)
    hidden = torch.relu(x @ first.weight.T / (1 + 1e-5) ** 0.5)
    torch.testing.assert_close(head(x), hidden @ last.weight.T + last.bias)


def test_projection_head_layer_count_at_its_boundary():
    torch.manual_seed(0)
    single = ProjectionHead(6, 5, 3, num_layers=1)
    x = torch.randn(4, 6)
    torch.testing.assert_close(single(x), x @ single.mlp[0].weight.T + single.mlp[0].bias)
    with pytest.raises(ValueError, match="num_layers must be >= 1, got 0"):
        ProjectionHead(6, 5, 3, num_layers=0)


def test_prototype_counts_at_their_boundary():
    protos = MultiPrototypes(4, 1)
    x = torch.randn(3, 4)
    torch.testing.assert_close(protos(x)[0], F.cosine_similarity(x, protos.heads[0].weight, dim=1)[:, None])
    for bad in (0, [5, 0], []):
        with pytest.raises(ValueError, match="num_prototypes must be positive"):
            MultiPrototypes(4, bad)
