"""The joint intra-inter objective of Nguyen et al., AAAI 2023.

``L = w_intra * L_intra + w_inter * L_inter + w_mask * L_mask``, trained in one run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from jointssl_monai.losses.deepcluster import DeepClusterV2Loss
from jointssl_monai.losses.diagnostics import cluster_diagnostics, occupancy_diagnostics, token_spread
from jointssl_monai.losses.masked import MaskedEmbeddingLoss
from jointssl_monai.losses.swav import SwAVLoss
from jointssl_monai.outputs import ClusterBranch, JointSSLOutput
from jointssl_monai.utils.dist import all_reduce_max, is_dist, world_size

__all__ = ["JointSSLLoss"]

_FAMILIES = {"swav": SwAVLoss, "deepcluster": DeepClusterV2Loss}


def _build(level: str, family: str | None, kwargs: dict[str, Any] | None) -> _Loss | None:
    if family is None:
        return None
    if family not in _FAMILIES:
        raise ValueError(f"JointSSLLoss: {level} must be one of {[*_FAMILIES, None]}, got {family!r}.")
    return _FAMILIES[family](**(kwargs or {}))


class JointSSLLoss(_Loss):
    """Joint objective over a :class:`~jointssl_monai.outputs.JointSSLOutput`.

    ``L = w_intra * L_intra + w_inter * L_inter + w_mask * L_mask`` (defaults 1:1:1). Each clustering level
    uses SwAV (:class:`SwAVLoss`) or DeepCluster-v2 (:class:`DeepClusterV2Loss`) independently. A term whose
    inputs are absent from the batch (e.g. no volumes: no ``inter`` and no ``mask``) contributes nothing; the
    total stays connected to the graph whenever any term is present.

    Distributed runs: SwAV's Sinkhorn and DeepCluster-v2's bank update are collectives. When a level is
    present on some processes but not on others (a process drew only 2D images), the processes without it take
    part with
    zero rows, so nobody waits forever. This costs one two-element all-reduce per step. A process without rows
    of a SwAV level needs the prototype sizes: pass ``*_prototypes`` or ``num_prototypes`` in ``*_kwargs``.

    Args:
        intra: clustering family of the slice/image level: ``"swav"``, ``"deepcluster"`` or ``None``.
        inter: clustering family of the volume level.
        w_intra: weight of ``L_intra``.
        w_inter: weight of ``L_inter``.
        w_mask: weight of ``L_mask``.
        intra_kwargs: keyword arguments of the intra family's loss (DeepCluster-v2 needs ``num_samples``,
        ``dim``).
        inter_kwargs: keyword arguments of the inter family's loss.
        mask_kwargs: keyword arguments of :class:`MaskedEmbeddingLoss`.
        diagnostics: add collapse statistics of the first view and head of each level (local to the process)
            to the returned dict.
    """

    def __init__(
        self,
        intra: str | None = "swav",
        inter: str | None = "swav",
        w_intra: float = 1.0,
        w_inter: float = 1.0,
        w_mask: float = 1.0,
        intra_kwargs: dict[str, Any] | None = None,
        inter_kwargs: dict[str, Any] | None = None,
        mask_kwargs: dict[str, Any] | None = None,
        diagnostics: bool = True,
    ) -> None:
        super().__init__()
        self.intra_loss = _build("intra", intra, intra_kwargs)
        self.inter_loss = _build("inter", inter, inter_kwargs)
        self.mask_loss = MaskedEmbeddingLoss(**(mask_kwargs or {}))
        self.w_intra, self.w_inter, self.w_mask = float(w_intra), float(w_inter), float(w_mask)
        self.diagnostics = diagnostics

    def _level(
        self,
        name: str,
        loss_fn: _Loss | None,
        branch: ClusterBranch | None,
        keys: torch.Tensor | None,
        prototypes: Sequence[torch.Tensor] | None,
        present_anywhere: bool,
    ) -> torch.Tensor | None:
        if loss_fn is None:
            return None
        if branch is None:
            if present_anywhere:  # another process has rows of this level: join its collectives
                if isinstance(loss_fn, SwAVLoss):
                    loss_fn.participate_without_rows([p.shape[0] for p in prototypes] if prototypes else None)
                else:
                    loss_fn.participate_without_rows()
            return None
        if isinstance(loss_fn, DeepClusterV2Loss):
            if keys is None:
                raise ValueError(f"JointSSLLoss: DeepCluster-v2 at the {name} level needs {name}_keys.")
            return loss_fn(branch, keys)
        return loss_fn(branch, prototypes)

    def forward(  # type: ignore[override]
        self,
        output: JointSSLOutput,
        intra_keys: torch.Tensor | None = None,
        inter_keys: torch.Tensor | None = None,
        intra_prototypes: Sequence[torch.Tensor] | None = None,
        inter_prototypes: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """Args:
            output: what the pretraining network returned.
            intra_keys: ``(N_intra,)`` memory-bank keys of the intra rows (DeepCluster-v2 only).
            inter_keys: ``(B,)`` memory-bank keys of the volumes (DeepCluster-v2 only).
            intra_prototypes: current intra prototype weights per head (SwAV queue; sizes for empty
            processes).
            inter_prototypes: current inter prototype weights per head.

        Returns:
            ``{"loss": total}`` plus the detached value of each present component (``"intra"``, ``"inter"``,
            ``"mask"``; absent components are left out, never NaN) and, with ``diagnostics``, floats
            ``"<level>_normalized_entropy"``, ``"<level>_clusters_used"``, ``"<level>_largest_share"`` (over
            the rows SwAV's Sinkhorn clustered, queue included; over the bank's k-means labels for
            DeepCluster-v2) and,
            with masked modelling, ``"mask_token_spread"`` (see :func:`token_spread`).
        """
        if not isinstance(output, JointSSLOutput):
            raise TypeError(f"JointSSLLoss: expected a JointSSLOutput, got {type(output).__name__}.")
        present = [output.intra is not None, output.inter is not None]
        if is_dist() and world_size() > 1:
            device = next((t.device for t in self._some_tensors(output)), torch.device("cpu"))
            flags = all_reduce_max(torch.tensor(present, dtype=torch.int32, device=device))
            present = [bool(f) for f in flags.tolist()]
        terms = {
            "intra": (
                self.w_intra,
                self._level("intra", self.intra_loss, output.intra, intra_keys, intra_prototypes, present[0]),
            ),
            "inter": (
                self.w_inter,
                self._level("inter", self.inter_loss, output.inter, inter_keys, inter_prototypes, present[1]),
            ),
        }
        if output.masked_prediction is not None and self.w_mask != 0:
            if output.masked_target is None or output.mask is None:
                raise ValueError("JointSSLLoss: masked_prediction given without masked_target or mask.")
            views = zip(output.masked_prediction, output.masked_target, output.mask, strict=True)
            # summed over the masked views, as the authors sum their two views' masked losses
            mask_value = torch.stack([self.mask_loss(p, t, m, output.valid) for p, t, m in views]).sum()
            terms["mask"] = (self.w_mask, mask_value)
        result: dict[str, Any] = {}
        total: torch.Tensor | None = None
        for name, (weight, value) in terms.items():
            if value is None:
                continue
            result[name] = value.detach()
            total = weight * value if total is None else total + weight * value
        if total is None:
            device = next((t.device for t in self._some_tensors(output)), torch.device("cpu"))
            total = torch.zeros((), device=device)
        result["loss"] = total
        if self.diagnostics:
            for name, loss_fn, branch in (
                ("intra", self.intra_loss, output.intra),
                ("inter", self.inter_loss, output.inter),
            ):
                if loss_fn is None or branch is None or branch.scores[0][0].shape[0] == 0:
                    continue
                for key, value in self._level_health(loss_fn, branch).items():
                    if key != "entropy":
                        result[f"{name}_{key}"] = value
            if output.masked_target is not None and output.valid is not None:
                result["mask_token_spread"] = token_spread(output.masked_target[0], output.valid)
        return result

    @staticmethod
    @torch.no_grad()
    def _level_health(loss_fn: _Loss, branch: ClusterBranch) -> dict[str, float]:
        """Collapse statistics of a level over as many rows as it clusters, not only this step's.

        A step holds few rows at the volume level (often 1-2 volumes), whose argmax agree by chance; so SwAV
        levels are scored over the rows its Sinkhorn clustered (queue and batch, kept by the loss), and
        DeepCluster-v2 levels report the occupancy of the last k-means over the whole bank.
        """
        if isinstance(loss_fn, DeepClusterV2Loss):
            labels = loss_fn.assignments[0][loss_fn.written]
            labels = labels[labels >= 0]
            if labels.numel():
                return occupancy_diagnostics(torch.bincount(labels, minlength=loss_fn.num_prototypes[0]))
        rows = branch.scores[0][0].detach().float()
        if isinstance(loss_fn, SwAVLoss) and loss_fn.clustered_scores is not None:
            rows = loss_fn.clustered_scores
        return cluster_diagnostics(F.softmax(rows / loss_fn.temperature, dim=1))

    @staticmethod
    def _some_tensors(output: JointSSLOutput):
        for branch in (output.intra, output.inter):
            if branch is not None:
                yield branch.embeddings[0]
        if output.masked_prediction is not None:
            yield output.masked_prediction[0]
