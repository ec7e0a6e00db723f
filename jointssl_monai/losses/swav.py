"""SwAV swapped-prediction loss, used for both clustering levels of Nguyen et al. (AAAI 2023).

Caron et al., "Unsupervised Learning of Visual Features by Contrasting Cluster Assignments", NeurIPS 2020,
Eq. 1-3.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from jointssl_monai.losses.sinkhorn import sinkhorn_knopp
from jointssl_monai.outputs import ClusterBranch

__all__ = ["SwAVLoss"]


class SwAVLoss(_Loss):
    """Swapped prediction between the views of a :class:`~jointssl_monai.outputs.ClusterBranch` (SwAV, Eq. 1).

    For every prototype head, the Sinkhorn codes ``q`` of each global view (optionally computed together
    with a
    queue of past embeddings) are predicted from the scores of every other view, global and local:
    ``-sum_k q_k log softmax(scores / temperature)_k``, averaged over rows, over the predicting views, over
    the code views, and over heads.

    State (registered buffers, carried by checkpoints): ``queue`` ``(V, L, D)`` of past embeddings per global
    view, ``queue_count`` (filled rows) and ``iteration`` (training forward calls, for
    ``queue_start_iteration``).
    The queue is per process (like SwAV); it is a cache that refills within ``L / batch`` iterations, so it
    may be reset with :meth:`reset_queue` when resuming with another number of processes.

    Args:
        temperature: softmax temperature of the predictions (0.1).
        epsilon: Sinkhorn entropic regularisation (0.05).
        sinkhorn_iterations: Sinkhorn iterations (3).
        queue_length: rows of the queue per view; 0 disables it.
        queue_start_iteration: first training iteration at which the queue is filled and used.
        embedding_dim: ``D``, required when ``queue_length > 0``.
        num_views: global views per sample (2), required for the queue buffer shape.
        num_prototypes: optional ``K`` per head; lets a process without rows take part in the collectives of a
            distributed Sinkhorn (see :meth:`participate_without_rows`) when no prototypes are passed.
        distributed: forwarded to :func:`sinkhorn_knopp` (``None``: automatic).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        queue_length: int = 0,
        queue_start_iteration: int = 0,
        embedding_dim: int | None = None,
        num_views: int = 2,
        num_prototypes: Sequence[int] | None = None,
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"SwAVLoss: temperature must be > 0, got {temperature}.")
        if queue_length < 0:
            raise ValueError(f"SwAVLoss: queue_length must be >= 0, got {queue_length}.")
        if queue_length > 0 and embedding_dim is None:
            raise ValueError("SwAVLoss: embedding_dim is required when queue_length > 0.")
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.queue_length = queue_length
        self.queue_start_iteration = queue_start_iteration
        self.num_views = num_views
        self.num_prototypes = list(num_prototypes) if num_prototypes is not None else None
        self.distributed = distributed
        self.register_buffer("queue", torch.zeros(num_views, queue_length, embedding_dim or 0))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self.clustered_scores: torch.Tensor | None = None  # see _codes
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))

    def reset_queue(self) -> None:
        """Empty the queue (e.g. after resuming with a different number of processes)."""
        self.queue.zero_()
        self.queue_count.zero_()

    def _queue_active(self) -> bool:
        return self.queue_length > 0 and int(self.iteration) >= self.queue_start_iteration

    def _codes(self, scores: torch.Tensor, view: int, prototypes: torch.Tensor | None) -> torch.Tensor:
        """Sinkhorn codes of one view and head, with the queue's rows prepended when in use.

        The scores Sinkhorn clustered (queue and batch) of view 0, head 0 stay in ``clustered_scores`` (not
        state: rewritten every forward), so collapse statistics can use all those rows without recomputing.
        """
        count = int(self.queue_count) if self._queue_active() else 0
        if count > 0:
            if prototypes is None:
                raise ValueError("SwAVLoss: the queue is in use, pass the current prototypes to forward().")
            with torch.no_grad():
                weights = F.normalize(prototypes.detach().float(), dim=1)
                queued = self.queue[view, :count].to(weights) @ weights.t()
                scores = torch.cat([queued, scores.detach().float()])
        self._last_scores = scores.detach()
        codes = sinkhorn_knopp(scores, self.epsilon, self.sinkhorn_iterations, distributed=self.distributed)
        return codes[count:]

    @torch.no_grad()
    def _push(self, embeddings: Sequence[torch.Tensor]) -> None:
        length = self.queue_length
        for view, emb in enumerate(embeddings):
            new = emb.detach().to(self.queue)[:length]
            self.queue[view] = torch.cat([new, self.queue[view, : length - new.shape[0]]])
        self.queue_count.fill_(min(length, int(self.queue_count) + embeddings[0].shape[0]))

    def _validate(self, branch: ClusterBranch, prototypes: Sequence[torch.Tensor] | None) -> int:
        if branch.num_views < 2:
            raise ValueError(f"SwAVLoss: need at least 2 global views, got {branch.num_views}.")
        if len(branch.scores) != branch.num_views:
            raise ValueError(
                f"SwAVLoss: {len(branch.scores)} score views for {branch.num_views} embedding views."
            )
        if self.queue_length > 0 and branch.num_views != self.num_views:
            raise ValueError(f"SwAVLoss: queue built for {self.num_views} views, got {branch.num_views}.")
        heads = len(branch.scores[0])
        rows = branch.embeddings[0].shape[0]
        for v, view_scores in enumerate(branch.scores):
            if len(view_scores) != heads:
                raise ValueError(
                    f"SwAVLoss: scores[{v}] has {len(view_scores)} heads, scores[0] has {heads}."
                )
            for h, s in enumerate(view_scores):
                if s.ndim != 2 or s.shape != branch.scores[0][h].shape or s.shape[0] != rows:
                    raise ValueError(
                        f"SwAVLoss: scores[{v}][{h}] has shape {tuple(s.shape)}, expected "
                        f"({rows}, {branch.scores[0][h].shape[-1]})."
                    )
        if branch.local_scores:
            if branch.local_rows is None:
                raise ValueError("SwAVLoss: local_scores given without local_rows.")
            for v, view_scores in enumerate(branch.local_scores):
                for h, s in enumerate(view_scores):
                    if s.shape != (branch.local_rows.shape[0], branch.scores[0][h].shape[1]):
                        raise ValueError(
                            f"SwAVLoss: local_scores[{v}][{h}] has shape {tuple(s.shape)}, expected "
                            f"({branch.local_rows.shape[0]}, {branch.scores[0][h].shape[1]})."
                        )
        if prototypes is not None and len(prototypes) != heads:
            raise ValueError(f"SwAVLoss: {len(prototypes)} prototype tensors for {heads} heads.")
        return heads

    def forward(
        self, branch: ClusterBranch, prototypes: Sequence[torch.Tensor] | None = None
    ) -> torch.Tensor:  # type: ignore[override]
        """Swapped-prediction loss of one clustering level.

        Args:
            branch: embeddings and scores of every view (see :class:`~jointssl_monai.outputs.ClusterBranch`).
            prototypes: current ``(K_h, D)`` prototype weights per head; needed only once the queue is in use.

        Returns:
            Scalar loss. In training mode the queue is then updated with this batch's embeddings.
        """
        heads = self._validate(branch, prototypes)
        num_global = branch.num_views
        predictions = [[s[h] for s in branch.scores] for h in range(heads)]
        local = [[s[h] for s in branch.local_scores] for h in range(heads)]
        num_predicting = num_global - 1 + len(branch.local_scores)
        total = branch.scores[0][0].new_zeros((), dtype=torch.float32)
        for h in range(heads):
            weights = prototypes[h] if prototypes is not None else None
            for v in range(num_global):
                q = self._codes(predictions[h][v], v, weights)
                if h == 0 and v == 0:
                    self.clustered_scores = self._last_scores
                terms = [self._cross_entropy(q, predictions[h][p]) for p in range(num_global) if p != v]
                if local[h]:
                    q_local = q[branch.local_rows]
                    terms += [self._cross_entropy(q_local, s) for s in local[h]]
                total = total + torch.stack(terms).sum() / num_predicting
        loss = total / (num_global * heads)
        if self.training:
            if self._queue_active():
                self._push(branch.embeddings)
            self.iteration += 1
        return loss

    def _cross_entropy(self, codes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] == 0:
            return scores.sum().float() * 0.0
        log_p = F.log_softmax(scores.float() / self.temperature, dim=1)
        return -(codes.to(log_p) * log_p).sum(dim=1).mean()

    def participate_without_rows(self, num_prototypes: Sequence[int] | None = None) -> None:
        """Run the collectives of a forward pass with zero local rows (distributed Sinkhorn only).

        In a distributed run, every process must call :func:`sinkhorn_knopp` the same number of times. A
        process whose batch has no rows for this level (e.g. only 2D images, no volumes) calls this instead of
        :meth:`forward`; it contributes nothing to the codes of the others.
        """
        sizes = list(num_prototypes) if num_prototypes is not None else self.num_prototypes
        if sizes is None:
            raise ValueError("SwAVLoss: num_prototypes is needed to take part without rows.")
        for k in sizes:
            for _ in range(self.num_views):
                empty = self.queue.new_zeros((0, k))
                sinkhorn_knopp(empty, self.epsilon, self.sinkhorn_iterations, distributed=self.distributed)
        if self.training:
            self.iteration += 1
