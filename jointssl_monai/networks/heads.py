"""Projection heads and prototype layers for the clustering objectives.

SwAV (Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS
2020) and DeepCluster-v2 (same paper, appendix) score L2-normalised projections against L2-normalised,
bias-free prototypes; DeepCluster-v2 uses several prototype heads of different sizes. Nguyen et al. (AAAI
2023, arXiv:2212.01893) apply this at the slice/image level (intra) and at the volume level (inter) with
separate heads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MultiPrototypes", "ProjectionHead"]


class ProjectionHead(nn.Module):
    """MLP ``Linear -> [BatchNorm] -> ReLU -> ... -> Linear`` (the SwAV projection head).

    Args:
        in_dim: input size.
        hidden_dim: width of the hidden layers.
        out_dim: output size.
        num_layers: number of linear layers (1 gives a single linear map).
        batch_norm: BatchNorm1d after every hidden linear layer. It needs more than one row per call in
            training mode; the network feeds both views through one call, so one sample per process still
            works (poorly: batch statistics over two rows). Turn it off for tiny per-process batches.
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"ProjectionHead: num_layers must be >= 1, got {num_layers}.")
        layers: list[nn.Module] = []
        dim = in_dim
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.ReLU(inplace=True))
            dim = hidden_dim
        layers.append(nn.Linear(dim, out_dim))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MultiPrototypes(nn.Module):
    """One or several bias-free linear prototype heads scoring L2-normalised inputs.

    The weights are L2-normalised at construction; the trainer should call :meth:`normalize_` before every
    forward pass (SwAV normalises the prototypes in place each iteration, outside the autograd graph), so that
    the scores are cosine similarities.

    Args:
        dim: input (projection) size.
        num_prototypes: prototypes of the single head, or a sequence with one entry per head (DeepCluster-v2).
    """

    def __init__(self, dim: int, num_prototypes: int | Sequence[int]) -> None:
        super().__init__()
        sizes = [num_prototypes] if isinstance(num_prototypes, int) else [int(k) for k in num_prototypes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"MultiPrototypes: num_prototypes must be positive, got {num_prototypes}.")
        self.num_prototypes = tuple(sizes)
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in sizes)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise every prototype vector in place."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return, per head, the ``(N, K_h)`` scores of the L2-normalised rows of ``x`` ``(N, dim)``."""
        x = F.normalize(x, dim=1)
        return [head(x) for head in self.heads]
