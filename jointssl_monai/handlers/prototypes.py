"""Prototype upkeep for clustering levels: L2 normalisation and gradient freezing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ignite.engine import Events
from monai.engines.utils import IterationEvents

from jointssl_monai.engines.utils import unwrap

if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch import nn

    from jointssl_monai.losses import JointSSLLoss

__all__ = ["PrototypeHandler"]


class PrototypeHandler:
    """Normalises the prototypes of one clustering level before every iteration and drops their gradients
    while they are frozen.

    SwAV (Caron et al., NeurIPS 2020) keeps prototypes on the unit sphere and freezes them during the first
    iterations (313 in the authors' recipe) so that the randomly initialised codes can settle. DeepCluster-v2
    replaces prototypes with k-means centroids and never trains them. The loss says which family the level
    uses (:meth:`~jointssl_monai.losses.JointSSLLoss.method`); the handler does nothing for a level the loss
    does not use.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.PrototypeHandler", "network": "@network",
         "loss_function": "@loss_function", "level": "intra", "freeze_iterations": 313}

    Args:
        network: the pretraining network (``DistributedDataParallel`` is unwrapped).
        loss_function: the :class:`~jointssl_monai.losses.JointSSLLoss` of the trainer.
        level: ``"intra"`` or ``"inter"``.
        freeze_iterations: SwAV levels: gradients are dropped for iterations ``1..freeze_iterations`` (``0``:
            never, ``None``: always). DeepCluster-v2 levels are frozen for the whole run whatever the value.
        normalize: L2-normalise the prototypes at ``ITERATION_STARTED``.
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: JointSSLLoss,
        level: str,
        freeze_iterations: int | None = 0,
        normalize: bool = True,
    ) -> None:
        self.prototypes = unwrap(network).prototypes(level)
        self.level = level
        self.active = loss_function.uses(level)
        self.freeze_iterations = None if loss_function.method(level) == "deepcluster" else freeze_iterations
        self.normalize = normalize

    def attach(self, engine: Engine) -> None:
        if not self.active:
            return
        if self.normalize:
            engine.add_event_handler(Events.ITERATION_STARTED, self.normalize_prototypes)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.drop_gradients)

    def normalize_prototypes(self, engine: Engine | None = None) -> None:
        self.prototypes.normalize_()

    def frozen(self, iteration: int) -> bool:
        """Whether the prototypes are frozen at Ignite's (1-based) ``iteration``."""
        return self.freeze_iterations is None or iteration <= self.freeze_iterations

    def drop_gradients(self, engine: Engine) -> None:
        if self.frozen(engine.state.iteration):
            self.prototypes.drop_gradients_()
