"""Prototype upkeep for clustering heads: L2 normalisation and gradient freezing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ignite.engine import Events
from monai.engines.utils import IterationEvents

from jointssl_monai.engines.trainer import unwrap
from jointssl_monai.losses import cancel_prototype_gradients, normalize_prototypes_

if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch import nn

__all__ = ["PrototypeHandler"]


class PrototypeHandler:
    """Normalises a prototype module before every iteration and cancels its gradients while frozen.

    SwAV (Caron et al., NeurIPS 2020) keeps prototypes on the unit sphere and freezes them during the first
    iterations (313 in the authors' recipe) so that the randomly initialised codes can settle. DeepCluster-v2
    replaces prototypes with k-means centroids and never trains them: use ``freeze_iterations=None``.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.PrototypeHandler", "network": "@network",
         "module": "intra_prototypes", "freeze_iterations": 313}

    Args:
        network: the pretraining network (``DistributedDataParallel`` is unwrapped).
        module: attribute name of the prototype module (``intra_prototypes`` or ``inter_prototypes``).
        freeze_iterations: gradients are cancelled for iterations ``1..freeze_iterations``; ``None`` freezes
            for the whole run, ``0`` never.
        normalize: L2-normalise the prototypes at ``ITERATION_STARTED``.
    """

    def __init__(
        self, network: nn.Module, module: str, freeze_iterations: int | None = 0, normalize: bool = True
    ) -> None:
        self.prototypes = getattr(unwrap(network), module, None)
        if self.prototypes is None:
            raise ValueError(f"the network has no prototype module {module!r}")
        self.module = module
        self.freeze_iterations = freeze_iterations
        self.normalize = normalize

    def attach(self, engine: Engine) -> None:
        if self.normalize:
            engine.add_event_handler(Events.ITERATION_STARTED, self.normalize_prototypes)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.cancel_gradients)

    def normalize_prototypes(self, engine: Engine | None = None) -> None:
        normalize_prototypes_(self.prototypes)

    def cancel_gradients(self, engine: Engine) -> None:
        # Ignite counts iterations from 1; the loss helper takes a 0-based iteration.
        limit = float("inf") if self.freeze_iterations is None else self.freeze_iterations
        cancel_prototype_gradients(self.prototypes, engine.state.iteration - 1, limit)
