"""Masked slice-embedding loss (``L_mask`` of Nguyen et al., AAAI 2023)."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss

__all__ = ["MaskedEmbeddingLoss", "normalize_over_slices"]

_TARGET_NORMS = ("slices", "none")


def normalize_over_slices(tokens: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Standardise every feature of every volume over its valid slices (instance norm along the sequence).

    The masked-modelling target is the encoder's own slice tokens. Raw, they can be predicted almost perfectly
    by the volume's mean token (neighbouring slices look alike), and shrinking them lowers the loss for free.
    Standardised per volume and feature over the slices (data2vec's instance-normalised targets, Baevski et
    al., ICML 2022; MAE's ``norm_pix_loss`` is the per-patch analogue), the target is invariant to the scale
    of the tokens and its mean is zero, so only what differs between slices is left to predict.

    Args:
        tokens: ``(B, S, D)``.
        valid: ``(B, S)`` bool; statistics use valid positions only, padded positions come out as 0.
        eps: relative floor of the variance, as a fraction of the volume's mean squared token entry (a
            relative floor keeps the result scale-invariant; slices identical to that precision give 0).

    Returns:
        ``(B, S, D)`` standardised tokens.
    """
    weight = valid[..., None].to(tokens.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = (tokens * weight).sum(dim=1, keepdim=True) / count
    var = ((tokens - mean).pow(2) * weight).sum(dim=1, keepdim=True) / count
    energy = (tokens.pow(2) * weight).sum(dim=(1, 2), keepdim=True) / (count * tokens.shape[2])
    floor = (eps * energy).clamp_min(torch.finfo(tokens.dtype).tiny)
    return (tokens - mean) / torch.sqrt(var + floor) * weight


class MaskedEmbeddingLoss(_Loss):
    """Mean squared error between predicted and original slice embeddings of one masked view.

    About 10 % of the slice tokens of a volume are replaced by a learned mask token; the aggregator
    predicts the original embeddings. ``reduction="masked"`` (default, the paper's wording) averages over
    masked positions; ``"all"`` averages over every valid position (what the authors' code does). The target
    is detached and, with ``target_norm="slices"`` (default), standardised per volume and feature over the
    valid slices (:func:`normalize_over_slices`), so that the loss cannot fall by shrinking or flattening the
    tokens; ``"none"`` compares raw tokens, as the authors' code does.

    Args:
        reduction: ``"masked"`` or ``"all"``.
        target_norm: ``"slices"`` or ``"none"``.
    """

    def __init__(self, reduction: str = "masked", target_norm: str = "slices") -> None:
        if reduction not in ("masked", "all"):
            raise ValueError(f"MaskedEmbeddingLoss: reduction must be 'masked' or 'all', got {reduction!r}.")
        if target_norm not in _TARGET_NORMS:
            raise ValueError(
                f"MaskedEmbeddingLoss: target_norm must be one of {_TARGET_NORMS}, got {target_norm!r}."
            )
        super().__init__(reduction=reduction)
        self.target_norm = target_norm

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
        if valid is None:
            valid = torch.ones_like(mask)
        selected = (mask if self.reduction == "masked" else torch.ones_like(mask)) & valid
        if not bool(selected.any()):
            return prediction.float().sum() * 0.0
        target = target.detach().float()
        if self.target_norm == "slices":
            target = normalize_over_slices(target, valid)
        diff = prediction[selected].float() - target[selected]
        return diff.pow(2).mean()
