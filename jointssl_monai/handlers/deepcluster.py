"""DeepCluster-v2 schedule: fill the memory bank, cluster it every epoch, load centroids as prototypes."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from ignite.engine import Events

from jointssl_monai.engines.utils import batches_done_in_epoch, unwrap
from jointssl_monai.losses import LEVELS

if TYPE_CHECKING:
    from jointssl_monai.engines.trainer import JointSSLTrainer
    from jointssl_monai.losses import JointSSLLoss

__all__ = ["DeepClusterHandler"]


class DeepClusterHandler:
    """Runs the DeepCluster-v2 schedule (Caron et al., 2020) for every level whose loss is DeepCluster-v2.

    - ``STARTED``: if a memory bank is still empty (a fresh run, not a resume), embed the whole training set
      once without gradients to fill it (``init_memory=True``, as the DeepCluster-v2 reference does);
      otherwise the first epoch trains without pseudo-labels (ignored rows) and fills the bank as it goes.
    - ``EPOCH_STARTED``: spherical k-means of every head on the bank (a collective in distributed runs, equal
      to the single-process result); the centroids replace the network's prototypes of that level, which stay
      frozen (pair with ``PrototypeHandler(freeze_iterations=None)``).

    The bank itself is updated by the loss during its forward pass, from the rows of the current batch.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.DeepClusterHandler",
         "loss_function": "@loss", "network": "@network"}

    Args:
        loss_function: the :class:`~jointssl_monai.losses.JointSSLLoss` of the trainer.
        network: the pretraining network (``DistributedDataParallel`` is unwrapped).
        init_memory: fill empty banks with one pass over the data before the first epoch.
    """

    def __init__(
        self, loss_function: JointSSLLoss, network: torch.nn.Module, init_memory: bool = True
    ) -> None:
        self.levels = {
            level: loss_function.level(level)
            for level in LEVELS
            if loss_function.method(level) == "deepcluster"
        }
        self.network = network
        self.init_memory = init_memory
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: JointSSLTrainer) -> None:
        if not self.levels:
            return
        if self.init_memory:
            engine.add_event_handler(Events.STARTED, self.fill_memory)
        engine.add_event_handler(Events.EPOCH_STARTED, self.cluster)

    def _empty_levels(self) -> list[str]:
        return [level for level, loss in self.levels.items() if loss.rows_in_bank() == 0]

    @torch.no_grad()
    def fill_memory(self, engine: JointSSLTrainer) -> None:
        """One pass over the training data that stores every embedding in the empty banks."""
        if not self._empty_levels():
            return
        engine.network.train()
        loader = engine.data_loader
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is not None and hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(0)
        for batchdata in loader:
            batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
            output = engine.forward_batch(batch)
            keys = engine.memory_keys(batch, output) if output is not None else (None, None)
            for level, level_keys in zip(("intra", "inter"), keys, strict=True):
                if level not in self.levels:
                    continue
                branch = output.branch(level) if output is not None else None
                if branch is not None and level_keys is not None:
                    self.levels[level].update_memory(branch.embeddings, level_keys)
                else:  # a collective: take part with zero rows so that other processes do not wait
                    self.levels[level].participate_without_rows()
        rows = {level: loss.rows_in_bank() for level, loss in self.levels.items()}
        self.logger.info(f"DeepCluster-v2 memory banks filled before training: {rows} rows")

    @torch.no_grad()
    def cluster(self, engine: JointSSLTrainer) -> None:
        """k-means on every non-empty bank; copy the centroids into the level's prototypes."""
        if batches_done_in_epoch(engine):
            # Resumed mid-epoch: this epoch's centroids, pseudo-labels and prototypes came with the
            # checkpoint; clustering again would use a bank the uninterrupted run had not seen at this point.
            return
        network = unwrap(self.network)
        for level, loss in self.levels.items():
            if loss.rows_in_bank() == 0:
                self.logger.info(
                    f"DeepCluster-v2 {level}: memory bank still empty, no pseudo-labels this epoch"
                )
                continue
            centroids = loss.cluster()
            network.prototypes(level).load_centroids_(centroids)
            self.logger.info(
                f"DeepCluster-v2 {level}: k-means on {loss.rows_in_bank()} rows into "
                f"{[c.shape[0] for c in centroids]} clusters (epoch {engine.state.epoch})"
            )
