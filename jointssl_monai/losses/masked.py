"""Masked slice-embedding loss (``L_mask`` of Nguyen et al., AAAI 2023)."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["MaskedEmbeddingLoss"]


class MaskedEmbeddingLoss(_Loss):
    """Mean squared error between predicted and original slice embeddings.

    About 10 % of the slice tokens of a volume are replaced by a learned mask token; the aggregator
    predicts the original embeddings. ``reduction="masked"`` (default, the paper's wording) averages over
    masked positions; ``"all"`` averages over every valid position (what the authors' code does). The target
    is detached.

    Args:
        reduction: ``"masked"`` or ``"all"``.
    """

    def __init__(self, reduction: str = "masked") -> None:
        if reduction not in ("masked", "all"):
            raise ValueError(f"MaskedEmbeddingLoss: reduction must be 'masked' or 'all', got {reduction!r}.")
        super().__init__(reduction=reduction)

    def forward(  # type: ignore[override]
        self,
        prediction: torch.Tensor,
        target: torch.Tensor,
        mask: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Args:
            prediction: ``(B, S, D)`` predicted slice embeddings.
            target: ``(B, S, D)`` original slice embeddings.
            mask: ``(B, S)`` bool, masked positions.
            valid: ``(B, S)`` bool, non-padded positions (all valid when ``None``).

        Returns:
            Scalar MSE over the selected positions and all features; a zero connected to the graph when no
            position is selected.
        """
        if prediction.ndim != 3 or target.shape != prediction.shape:
            raise ValueError(
                f"MaskedEmbeddingLoss: prediction and target must share a (B, S, D) shape, got "
                f"{tuple(prediction.shape)} and {tuple(target.shape)}."
            )
        for name, m in (("mask", mask), ("valid", valid)):
            if m is not None and (m.shape != prediction.shape[:2] or m.dtype != torch.bool):
                raise ValueError(
                    f"MaskedEmbeddingLoss: {name} must be a bool (B, S) = {tuple(prediction.shape[:2])} "
                    f"tensor, got {m.dtype} {tuple(m.shape)}."
                )
        selected = mask if self.reduction == "masked" else torch.ones_like(mask)
        if valid is not None:
            selected = selected & valid
        if not bool(selected.any()):
            return prediction.float().sum() * 0.0
        diff = prediction[selected].float() - target[selected].detach().float()
        return diff.pow(2).mean()
