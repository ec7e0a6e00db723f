"""Masked slice modelling: replace some slice tokens by a learned mask token and predict their embeddings.

Nguyen et al. (AAAI 2023, arXiv:2212.01893): about 10 % of the slice tokens of a volume are replaced by a
learned mask token before the aggregator; a decoder predicts the original slice embeddings from its outputs
(the loss, MSE, lives in ``jointssl_monai.losses``).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MaskedSliceModeling"]


class MaskedSliceModeling(nn.Module):
    """Mask token, mask sampling and decoder of the masked-slice objective.

    The mask token is learned, initialised from ``N(0, 0.02^2)``; the decoder is a two-layer GELU MLP.

    Args:
        d_model: token size.
        mask_ratio: fraction of the valid slices of a volume to mask (rounded). Every volume with at least two
            valid slices gets at least one masked slice and keeps at least one visible; a one-slice volume and
            padded positions are never masked. ``0`` masks nothing.
        hidden_dim: hidden width of the two-layer MLP decoder (default ``d_model``).
    """

    def __init__(self, d_model: int = 640, mask_ratio: float = 0.1, hidden_dim: int | None = None) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"MaskedSliceModeling: mask_ratio must be in [0, 1), got {mask_ratio}.")
        self.mask_ratio = mask_ratio
        self.d_model = d_model
        self.mask_token = nn.Parameter(torch.randn(d_model) * 0.02)
        hidden_dim = hidden_dim or d_model
        self.decoder = nn.Sequential(
            nn.Linear(d_model, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, d_model)
        )

    def sample_mask(self, valid: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw the ``(B, S)`` bool mask of positions to replace, given the ``(B, S)`` valid mask."""
        lengths = valid.sum(dim=1)
        if self.mask_ratio == 0.0:
            return torch.zeros_like(valid)
        count = torch.minimum((lengths * self.mask_ratio).round().long().clamp(min=1), lengths - 1)
        scores = torch.rand(valid.shape, generator=generator, device=valid.device)
        scores = scores.masked_fill(~valid, 2.0)  # padded positions rank last
        rank = scores.argsort(dim=1).argsort(dim=1)
        return rank < count[:, None]

    def mask_tokens(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Replace ``tokens`` ``(B, S, D)`` by the mask token where ``mask`` ``(B, S)`` is True."""
        return torch.where(mask[..., None], self.mask_token.to(tokens.dtype), tokens)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        """Decode aggregator outputs ``(B, S, D)`` into predicted slice embeddings ``(B, S, D)``."""
        return self.decoder(outputs)
