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
        self.in_dim, self.out_dim = in_dim, out_dim
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

    The prototypes own their upkeep, which the handlers call: :meth:`normalize_` before every forward pass
    (SwAV normalises the prototypes in place each iteration, outside the autograd graph, so that the scores
    are cosine similarities), :meth:`drop_gradients_` while they are frozen (SwAV's first iterations,
    DeepCluster-v2 always), :meth:`load_centroids_` for DeepCluster-v2's k-means centroids.

    Args:
        dim: input (projection) size.
        num_prototypes: prototypes of the single head, or a sequence with one entry per head (DeepCluster-v2).
    """

    def __init__(self, dim: int, num_prototypes: int | Sequence[int]) -> None:
        super().__init__()
        sizes = [num_prototypes] if isinstance(num_prototypes, int) else [int(k) for k in num_prototypes]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"MultiPrototypes: num_prototypes must be positive, got {num_prototypes}.")
        self.dim = dim
        self.num_prototypes = tuple(sizes)
        self.heads = nn.ModuleList(nn.Linear(dim, k, bias=False) for k in sizes)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        """L2-normalise every prototype vector in place."""
        for head in self.heads:
            head.weight.copy_(F.normalize(head.weight, dim=1))

    def weights(self) -> list[torch.Tensor]:
        """The ``(K_h, dim)`` prototype weights of every head (parameters, not copies)."""
        return [head.weight for head in self.heads]

    def drop_gradients_(self) -> None:
        """Drop the prototypes' gradients (call between backward and the optimiser step to freeze them)."""
        for head in self.heads:
            head.weight.grad = None

    @torch.no_grad()
    def load_centroids_(self, centroids: Sequence[torch.Tensor]) -> None:
        """Copy one ``(K_h, dim)`` centroid matrix per head into the prototypes (DeepCluster-v2).

        Raises:
            ValueError: the number of heads or a head's shape differs.
        """
        if len(centroids) != len(self.heads):
            raise ValueError(
                f"MultiPrototypes: {len(centroids)} centroid matrices for {len(self.heads)} prototype heads; "
                "set the same prototype counts for the loss and the network"
            )
        for head, centroid in zip(self.heads, centroids, strict=True):
            if centroid.shape != head.weight.shape:
                raise ValueError(
                    f"MultiPrototypes: centroids of shape {tuple(centroid.shape)} for a head of shape "
                    f"{tuple(head.weight.shape)}"
                )
            head.weight.copy_(centroid.to(head.weight))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return, per head, the ``(N, K_h)`` scores of the L2-normalised rows of ``x`` ``(N, dim)``."""
        x = F.normalize(x, dim=1)
        return [head(x) for head in self.heads]
