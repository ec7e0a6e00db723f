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
from jointssl_monai.utils.arguments import check_int, check_number
from jointssl_monai.utils.dist import all_reduce_max, is_dist, world_size

__all__ = ["CLUSTERING_METHODS", "LEVELS", "JointSSLLoss", "prototype_heads"]

#: The clustering levels of the method: slices and 2D images (intra), volumes (inter).
LEVELS = ("intra", "inter")
#: The clustering families a level can use, by the name a config gives them.
CLUSTERING_METHODS = ("swav", "deepcluster")
#: DeepCluster-v2 clusters with several prototype heads (three in the reference recipe); SwAV with one.
DEEPCLUSTER_HEADS = 3


def _method(level: str, method: str | None) -> str | None:
    if method is None or method == "none":
        return None
    if method not in CLUSTERING_METHODS:
        raise ValueError(
            f"JointSSLLoss: {level}_method must be one of {[*CLUSTERING_METHODS, 'none']}, got {method!r}."
        )
    return method


def prototype_heads(count: int | Sequence[int], method: str | None, name: str = "prototypes") -> list[int]:
    """Prototype counts per head: a sequence as given; an integer ``K`` gives ``[K]`` for SwAV (or a disabled
    level) and ``[K] * 3`` for DeepCluster-v2 (three k-means heads, as in its reference recipe). Every head
    needs at least 2 prototypes (``name`` is the argument named in the error)."""
    heads = count
    if isinstance(count, int) and not isinstance(count, bool):
        heads = [count] * (DEEPCLUSTER_HEADS if method == "deepcluster" else 1)
    if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or not heads:
        raise ValueError(f"{name} must be an integer >= 2 or a non-empty list of them, got {count!r}")
    for k in heads:
        check_int(name, k, 2)
    return list(heads)


class JointSSLLoss(_Loss):
    """Joint objective over a :class:`~jointssl_monai.outputs.JointSSLOutput` (Nguyen et al., AAAI 2023).

    ``L = w_intra * L_intra + w_inter * L_inter + w_mask * L_mask`` (defaults 1:1:1). Each clustering level
    uses SwAV (:class:`SwAVLoss`) or DeepCluster-v2 (:class:`DeepClusterV2Loss`); this class is the one
    place that decides which, from ``intra_method``/``inter_method``, as ``DiceCELoss`` composes its parts
    from flat arguments. The network and the handlers ask it (:meth:`uses`, :meth:`method`,
    :meth:`prototype_heads`, :meth:`level`). A term whose inputs are absent from the batch (e.g. no volumes:
    no ``inter`` and no ``mask``) contributes nothing; the total stays connected to the graph whenever any
    term is present.

    Distributed runs: SwAV's Sinkhorn and DeepCluster-v2's bank update are collectives. When a level is
    present on some processes but not on others (a process drew only 2D images), the processes without it take
    part with zero rows, so nobody waits forever. This costs one two-element all-reduce per step.

    Args:
        intra_method: clustering family of the slice/image level: ``"swav"``, ``"deepcluster"`` or
            ``None``/``"none"`` (no intra level).
        inter_method: clustering family of the volume level.
        w_intra: weight of ``L_intra``; 0 disables the level.
        w_inter: weight of ``L_inter``; 0 disables the level.
        w_mask: weight of ``L_mask`` (masked slice-embedding prediction); 0 disables it.
        intra_prototypes: prototypes of the intra level (see :func:`prototype_heads`).
        inter_prototypes: prototypes of the inter level.
        embedding_dim: size of the projected embeddings (the network's ``proj_dim``); needed by SwAV queues
            and DeepCluster-v2 memory banks.
        temperature: softmax temperature of both families (0.1).
        sinkhorn_epsilon: SwAV's Sinkhorn entropic regularisation (0.05).
        sinkhorn_iterations: SwAV's Sinkhorn iterations (3).
        intra_queue_length: SwAV queue rows per view at the intra level (0: no queue).
        inter_queue_length: SwAV queue rows per view at the inter level.
        queue_start_iteration: first training iteration at which SwAV queues are used.
        intra_bank_size: DeepCluster-v2 memory-bank keys at the intra level (data set items x slices).
        inter_bank_size: DeepCluster-v2 memory-bank keys at the inter level (data set items).
        kmeans_iterations: DeepCluster-v2 k-means iterations per clustering (10).
        seed: base seed of DeepCluster-v2's k-means.
        mask_reduction: ``"masked"`` (average over masked slices) or ``"all"`` (:class:`MaskedEmbeddingLoss`).
        mask_target_norm: ``"slices"`` or ``"none"`` (:class:`MaskedEmbeddingLoss`).
        diagnostics: add collapse statistics of the first view and head of each level (local to the process)
            to the returned dict.
    """

    def __init__(
        self,
        intra_method: str | None = "swav",
        inter_method: str | None = "swav",
        w_intra: float = 1.0,
        w_inter: float = 1.0,
        w_mask: float = 1.0,
        intra_prototypes: int | Sequence[int] = 3000,
        inter_prototypes: int | Sequence[int] = 3000,
        embedding_dim: int | None = None,
        temperature: float = 0.1,
        sinkhorn_epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        intra_queue_length: int = 0,
        inter_queue_length: int = 0,
        queue_start_iteration: int = 0,
        intra_bank_size: int | None = None,
        inter_bank_size: int | None = None,
        kmeans_iterations: int = 10,
        seed: int = 0,
        mask_reduction: str = "masked",
        mask_target_norm: str = "slices",
        diagnostics: bool = True,
    ) -> None:
        super().__init__()
        methods = {"intra": _method("intra", intra_method), "inter": _method("inter", inter_method)}
        self.w_intra = check_number("w_intra", w_intra, 0)
        self.w_inter = check_number("w_inter", w_inter, 0)
        self.w_mask = check_number("w_mask", w_mask, 0)
        check_number("temperature", temperature, 0, exclusive_minimum=True)
        check_number("sinkhorn_epsilon", sinkhorn_epsilon, 0, exclusive_minimum=True)
        check_int("sinkhorn_iterations", sinkhorn_iterations, 1)
        check_int("intra_queue_length", intra_queue_length, 0)
        check_int("inter_queue_length", inter_queue_length, 0)
        check_int("kmeans_iterations", kmeans_iterations, 1)
        check_int("seed", seed, 0)
        weights = {"intra": self.w_intra, "inter": self.w_inter}
        counts = {"intra": intra_prototypes, "inter": inter_prototypes}
        queues = {"intra": intra_queue_length, "inter": inter_queue_length}
        banks = {"intra": intra_bank_size, "inter": inter_bank_size}
        self._methods = {level: methods[level] if weights[level] > 0 else None for level in LEVELS}
        self._heads = {
            level: prototype_heads(counts[level], methods[level], f"{level}_prototypes") for level in LEVELS
        }
        for level in LEVELS:
            criterion: _Loss | None = None
            if self._methods[level] == "swav":
                criterion = SwAVLoss(
                    temperature=temperature,
                    epsilon=sinkhorn_epsilon,
                    sinkhorn_iterations=sinkhorn_iterations,
                    queue_length=queues[level],
                    queue_start_iteration=queue_start_iteration,
                    embedding_dim=embedding_dim,
                    num_prototypes=self._heads[level],
                )
            elif self._methods[level] == "deepcluster":
                if banks[level] is None or embedding_dim is None:
                    raise ValueError(
                        f"JointSSLLoss: DeepCluster-v2 at the {level} level needs {level}_bank_size (the "
                        "number of memory-bank keys) and embedding_dim."
                    )
                criterion = DeepClusterV2Loss(
                    num_samples=banks[level],
                    dim=embedding_dim,
                    num_prototypes=self._heads[level],
                    temperature=temperature,
                    kmeans_iterations=kmeans_iterations,
                    seed=seed,
                )
            setattr(self, f"{level}_loss", criterion)  # module names kept: checkpoints carry them
        self.mask_loss = MaskedEmbeddingLoss(reduction=mask_reduction, target_norm=mask_target_norm)
        self.diagnostics = diagnostics

    def method(self, level: str) -> str | None:
        """The clustering family of ``level`` (``"swav"`` or ``"deepcluster"``); ``None`` if disabled."""
        if level not in LEVELS:
            raise ValueError(f"JointSSLLoss: level must be one of {LEVELS}, got {level!r}.")
        return self._methods[level]

    def uses(self, level: str) -> bool:
        """Whether the objective has the ``"intra"``, ``"inter"`` or ``"mask"`` term."""
        return self.w_mask > 0 if level == "mask" else self.method(level) is not None

    def level(self, level: str) -> SwAVLoss | DeepClusterV2Loss | None:
        """The clustering loss of ``level`` (``None`` when it is disabled)."""
        self.method(level)  # validates the name
        return getattr(self, f"{level}_loss")

    def prototype_heads(self, level: str) -> list[int]:
        """Prototypes per head of ``level``, for the network's prototype layers (also for a disabled level,
        so that every stage's checkpoint has the same keys)."""
        self.method(level)
        return list(self._heads[level])

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
            labels = loss_fn.bank_labels(0)
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
