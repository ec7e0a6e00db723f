"""Collapse diagnostics of the clustering levels, surfaced while training."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ignite.engine import Events

from jointssl_monai.engines.trainer import iteration_output

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["ClusterHealthHandler"]

_STATS = ("normalized_entropy", "clusters_used", "largest_share")


class ClusterHealthHandler:
    """Logs code entropy, clusters in use and the largest cluster's share; warns when training collapses.

    :class:`~jointssl_monai.losses.JointSSLLoss` (``diagnostics=True``) adds, per clustering level,
    ``<level>_normalized_entropy`` (entropy of the batch-mean assignment over ``log K``),
    ``<level>_clusters_used`` and ``<level>_largest_share`` to the iteration output. This handler copies the
    latest values into ``engine.state.metrics`` (so ``StatsHandler``, ``TensorBoardStatsHandler`` and
    ``MLFlowHandler`` record them) and warns when the largest cluster holds at least ``collapse_share`` of a
    level's samples for ``patience`` consecutive checks: the signature of a collapsed clustering, whose loss
    sits at ``log K`` and says nothing by itself.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.ClusterHealthHandler", "interval": 10}

    Args:
        interval: check every this many iterations.
        collapse_share: largest-cluster share that counts as collapsed.
        patience: consecutive collapsed checks before warning.
        levels: the levels to watch.
    """

    def __init__(
        self,
        interval: int = 10,
        collapse_share: float = 0.9,
        patience: int = 3,
        levels: tuple[str, ...] = ("intra", "inter"),
    ) -> None:
        self.interval = max(1, int(interval))
        self.collapse_share = collapse_share
        self.patience = max(1, int(patience))
        self.levels = levels
        self.collapsed_checks = dict.fromkeys(levels, 0)
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def __call__(self, engine: Engine) -> None:
        output = iteration_output(engine)
        for level in self.levels:
            stats = {name: output.get(f"{level}_{name}") for name in _STATS}
            if stats["largest_share"] is None:
                continue
            for name, value in stats.items():
                engine.state.metrics[f"{level}_{name}"] = float(value)
            collapsed = stats["largest_share"] >= self.collapse_share
            self.collapsed_checks[level] = self.collapsed_checks[level] + 1 if collapsed else 0
            if self.collapsed_checks[level] == self.patience:
                self.logger.warning(
                    f"cluster collapse suspected at the {level} level (iteration {engine.state.iteration}): "
                    f"the largest cluster holds {stats['largest_share']:.0%} of the samples, "
                    f"{int(stats['clusters_used'])} cluster(s) in use, normalised code entropy "
                    f"{stats['normalized_entropy']:.3f}, for {self.patience} checks in a row"
                )
