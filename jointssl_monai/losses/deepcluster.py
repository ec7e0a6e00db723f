"""DeepCluster-v2 loss with a memory bank keyed by dataset index (Caron et al., NeurIPS 2020, §B; used by
Nguyen et al., AAAI 2023, as the alternative clustering family)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from jointssl_monai.losses.kmeans import spherical_kmeans
from jointssl_monai.outputs import ClusterBranch
from jointssl_monai.utils.dist import all_gather_variable, all_reduce_sum, rank, world_size

__all__ = ["DeepClusterV2Loss"]


class DeepClusterV2Loss(_Loss):
    """Cross-entropy of prototype scores against k-means pseudo-labels of a memory bank.

    The memory bank holds the latest L2-normalised embedding of every key (dataset item) for every global
    view. Keys are chosen by the caller, e.g. ``dataset_index`` for volumes or
    ``dataset_index * max_slices + slice_position`` for slices, so ``num_samples`` must exceed every key.

    Distribution (our choice): :meth:`update_memory` all-gathers ``(keys, embeddings)`` of all processes, so
    every process holds the *full* bank. Hence the state (``bank``, ``written``, ``assignments``,
    ``centroids_h``, ``num_clusterings``) is identical on every process and indexed by key only: a checkpoint
    saved with any number of processes resumes with any other. :meth:`cluster` splits the written rows into
    contiguous blocks,
    one per process, and runs :func:`spherical_kmeans` with its distributed M-step, which equals
    single-process k-means on all rows; the assignments are then all-reduced back to every process. The price
    is one copy of the bank per process (``num_views * num_samples * dim`` float32).

    Args:
        num_samples: number of keys (size of the bank).
        dim: embedding dimension ``D``.
        num_prototypes: ``K`` of every head (DeepCluster-v2: three heads of 3000).
        temperature: softmax temperature (0.1).
        kmeans_iterations: k-means iterations per :meth:`cluster` call (10).
        num_views: global views per sample stored in the bank; head ``h`` clusters the bank of view
            ``h % num_views`` (as DeepCluster-v2 does).
        seed: base seed of k-means; the ``n``-th clustering uses ``seed + n``, identically on every process.
        distributed: ``None`` communicates whenever a process group is initialised.
    """

    def __init__(
        self,
        num_samples: int,
        dim: int,
        num_prototypes: Sequence[int] = (3000, 3000, 3000),
        temperature: float = 0.1,
        kmeans_iterations: int = 10,
        num_views: int = 2,
        seed: int = 0,
        distributed: bool | None = None,
    ) -> None:
        super().__init__()
        if num_samples < 1 or dim < 1 or num_views < 1 or not num_prototypes or min(num_prototypes) < 1:
            raise ValueError(
                f"DeepClusterV2Loss: invalid sizes num_samples={num_samples}, dim={dim}, "
                f"num_views={num_views}, num_prototypes={num_prototypes}."
            )
        if temperature <= 0:
            raise ValueError(f"DeepClusterV2Loss: temperature must be > 0, got {temperature}.")
        self.num_samples = num_samples
        self.dim = dim
        self.num_prototypes = list(num_prototypes)
        self.temperature = temperature
        self.kmeans_iterations = kmeans_iterations
        self.num_views = num_views
        self.seed = seed
        self.distributed = distributed
        self.register_buffer("bank", torch.zeros(num_views, num_samples, dim))
        self.register_buffer("written", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("assignments", torch.full((len(self.num_prototypes), num_samples), -1))
        self.register_buffer("num_clusterings", torch.zeros((), dtype=torch.long))
        for h, k in enumerate(self.num_prototypes):
            self.register_buffer(f"centroids_{h}", torch.zeros(k, dim))

    def rows_in_bank(self) -> int:
        """How many keys of the memory bank hold an embedding."""
        return int(self.written.sum())

    def bank_labels(self, head: int = 0) -> torch.Tensor:
        """The k-means labels of the written bank rows for ``head`` (``-1`` before the first clustering)."""
        return self.assignments[head][self.written]

    @property
    def centroids(self) -> list[torch.Tensor]:
        """Centroids of every head, ``(K_h, D)``, from the last :meth:`cluster` call (zeros before)."""
        return [getattr(self, f"centroids_{h}") for h in range(len(self.num_prototypes))]

    def _check_keys(self, keys: torch.Tensor, rows: int) -> torch.Tensor:
        if not isinstance(keys, torch.Tensor) or keys.shape != (rows,):
            raise ValueError(
                f"DeepClusterV2Loss: keys must be a ({rows},) tensor, got "
                f"{tuple(keys.shape) if isinstance(keys, torch.Tensor) else type(keys).__name__}."
            )
        keys = keys.to(device=self.bank.device, dtype=torch.long)
        if rows and (int(keys.min()) < 0 or int(keys.max()) >= self.num_samples):
            raise ValueError(
                f"DeepClusterV2Loss: keys must lie in [0, {self.num_samples}), got range "
                f"[{int(keys.min())}, {int(keys.max())}]; raise num_samples."
            )
        return keys

    @torch.no_grad()
    def update_memory(self, embeddings: Sequence[torch.Tensor], keys: torch.Tensor) -> None:
        """Store the L2-normalised embeddings of every view under their keys, on every process.

        Collective in a distributed run: every process must call it (with zero rows if it has none).

        Args:
            embeddings: per global view, ``(N, D)``.
            keys: ``(N,)`` long keys of the rows.
        """
        if len(embeddings) != self.num_views:
            raise ValueError(f"DeepClusterV2Loss: expected {self.num_views} views, got {len(embeddings)}.")
        rows = embeddings[0].shape[0]
        for v, emb in enumerate(embeddings):
            if emb.shape != (rows, self.dim):
                raise ValueError(
                    f"DeepClusterV2Loss: embeddings[{v}] has shape {tuple(emb.shape)}, "
                    f"expected ({rows}, {self.dim})."
                )
        keys = self._check_keys(keys, rows)
        stacked = torch.stack([F.normalize(e.detach().float(), dim=1) for e in embeddings], dim=1)
        packed = torch.cat([stacked.flatten(1).to(self.bank), keys.to(self.bank).unsqueeze(1)], dim=1)
        # keys travel as float32 next to the features; exact below 2**24 (checked), one collective for both
        if self.num_samples > 2**24:
            gathered_keys = all_gather_variable(keys, self.distributed)
            gathered = all_gather_variable(packed, self.distributed)
        else:
            gathered = all_gather_variable(packed, self.distributed)
            gathered_keys = gathered[:, -1].round().long()
        features = gathered[:, :-1].reshape(-1, self.num_views, self.dim).transpose(0, 1)
        self.bank[:, gathered_keys] = features
        self.written[gathered_keys] = True

    @torch.no_grad()
    def cluster(self) -> list[torch.Tensor]:
        """Run spherical k-means of every head on the written bank rows; update centroids and assignments.

        Collective in a distributed run. The result equals single-process k-means on the whole bank.

        Returns:
            Centroids of every head, ``(K_h, D)``, to copy into the (frozen) network prototypes.
        """
        rows = torch.nonzero(self.written).flatten()
        if rows.numel() == 0:
            raise RuntimeError(
                "DeepClusterV2Loss.cluster: the memory bank is empty; call update_memory first."
            )
        size, me = (world_size(), rank()) if self.distributed is not False else (1, 0)
        mine = torch.tensor_split(rows, size)[me]
        generator = torch.Generator().manual_seed(self.seed + int(self.num_clusterings))
        self.assignments.fill_(-1)
        for h, k in enumerate(self.num_prototypes):
            result = spherical_kmeans(
                self.bank[h % self.num_views, mine],
                k,
                self.kmeans_iterations,
                generator=generator,
                distributed=self.distributed,
            )
            getattr(self, f"centroids_{h}").copy_(result.centroids)
            shifted = torch.zeros(self.num_samples, dtype=torch.long, device=self.bank.device)
            shifted[mine] = result.assignments + 1
            self.assignments[h] = all_reduce_sum(shifted, self.distributed) - 1
        self.num_clusterings += 1
        return [c.clone() for c in self.centroids]

    def forward(self, branch: ClusterBranch, keys: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Cross-entropy of ``scores / temperature`` of every view against the pseudo-labels of the row keys.

        Rows whose key has no assignment yet (``-1``) are ignored; with none assigned the loss is a zero
        that is still connected to the graph. In training mode the bank is then updated with this batch
        (collective).

        Args:
            branch: scores of every view and head (heads must match ``num_prototypes``).
            keys: ``(N,)`` long keys of the branch rows.
        """
        heads = len(self.num_prototypes)
        rows = branch.embeddings[0].shape[0]
        keys = self._check_keys(keys, rows)
        views: list[tuple[list[torch.Tensor], torch.Tensor]] = [(s, keys) for s in branch.scores]
        if branch.local_scores:
            if branch.local_rows is None:
                raise ValueError("DeepClusterV2Loss: local_scores given without local_rows.")
            local_keys = keys[branch.local_rows.to(keys.device)]
            views += [(s, local_keys) for s in branch.local_scores]
        total = branch.scores[0][0].new_zeros((), dtype=torch.float32)
        for v, (view_scores, view_keys) in enumerate(views):
            if len(view_scores) != heads:
                raise ValueError(
                    f"DeepClusterV2Loss: view {v} has {len(view_scores)} heads, expected {heads}."
                )
            for h, s in enumerate(view_scores):
                if s.shape != (view_keys.shape[0], self.num_prototypes[h]):
                    raise ValueError(
                        f"DeepClusterV2Loss: scores of view {v}, head {h} have shape {tuple(s.shape)}, "
                        f"expected ({view_keys.shape[0]}, {self.num_prototypes[h]})."
                    )
                targets = self.assignments[h, view_keys].to(s.device)
                if bool((targets >= 0).any()):
                    logits = s.float() / self.temperature
                    total = total + F.cross_entropy(logits, targets, ignore_index=-1)
                else:
                    total = total + s.float().sum() * 0.0
        loss = total / (len(views) * heads)
        if self.training:
            self.update_memory(branch.embeddings, keys)
        return loss

    def participate_without_rows(self) -> None:
        """Take part in the collective bank update of a forward pass with zero local rows."""
        if self.training:
            empty = self.bank.new_zeros((0, self.dim))
            self.update_memory([empty] * self.num_views, torch.zeros(0, dtype=torch.long))
