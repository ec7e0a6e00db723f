"""Collapse diagnostics of the clustering levels, surfaced while training."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from ignite.engine import Events

from jointssl_monai.engines.utils import iteration_output

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
    sits at ``log K`` and says nothing by itself. With masked slice modelling it also records
    ``mask_token_spread`` (see :func:`~jointssl_monai.losses.token_spread`) and warns when it stays below
    ``min_token_spread``: the slice tokens of a volume have become (nearly) identical. While a collapse
    lasts, the warning is repeated every ``repeat_every`` checks, so a long collapse is never a single line
    lost early in a log.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.ClusterHealthHandler", "interval": 10}

    Args:
        interval: check every this many iterations.
        collapse_share: largest-cluster share that counts as collapsed.
        patience: consecutive collapsed checks before warning.
        levels: the levels to watch.
        min_token_spread: token spread below which the slice tokens count as collapsed.
        repeat_every: repeat a warning every this many checks while the collapse lasts.
    """

    def __init__(
        self,
        interval: int = 10,
        collapse_share: float = 0.9,
        patience: int = 3,
        levels: tuple[str, ...] = ("intra", "inter"),
        min_token_spread: float = 1e-3,
        repeat_every: int = 10,
    ) -> None:
        self.interval = max(1, int(interval))
        self.collapse_share = collapse_share
        self.patience = max(1, int(patience))
        self.levels = levels
        self.min_token_spread = min_token_spread
        self.repeat_every = max(1, int(repeat_every))
        self.collapsed_checks = dict.fromkeys((*levels, "mask"), 0)
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self)

    def _due(self, key: str, collapsed: bool) -> bool:
        """Count a collapsed check; whether to warn now (at ``patience``, then every ``repeat_every``)."""
        self.collapsed_checks[key] = self.collapsed_checks[key] + 1 if collapsed else 0
        streak = self.collapsed_checks[key] - self.patience
        return streak >= 0 and streak % self.repeat_every == 0

    def __call__(self, engine: Engine) -> None:
        output = iteration_output(engine)
        iteration = engine.state.iteration
        for level in self.levels:
            stats = {name: output.get(f"{level}_{name}") for name in _STATS}
            if stats["largest_share"] is None:
                continue
            for name, value in stats.items():
                engine.state.metrics[f"{level}_{name}"] = float(value)
            if self._due(level, stats["largest_share"] >= self.collapse_share):
                self.logger.warning(
                    f"cluster collapse suspected at the {level} level (iteration {iteration}): "
                    f"the largest cluster holds {stats['largest_share']:.0%} of the samples, "
                    f"{int(stats['clusters_used'])} cluster(s) in use, normalised code entropy "
                    f"{stats['normalized_entropy']:.3f}, for {self.collapsed_checks[level]} checks in a row"
                )
        spread = output.get("mask_token_spread")
        if spread is None or math.isnan(float(spread)):
            return
        engine.state.metrics["mask_token_spread"] = float(spread)
        if self._due("mask", float(spread) < self.min_token_spread):
            self.logger.warning(
                f"slice-token collapse suspected (iteration {iteration}): the tokens of a volume differ from "
                f"slice to slice by {float(spread):.2e} of their energy (< {self.min_token_spread:g}), for "
                f"{self.collapsed_checks['mask']} checks in a row"
            )
