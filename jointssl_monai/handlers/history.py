"""Per-epoch loss history written to a JSON file, for summaries and quick checks of a run."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from ignite.engine import Events

from jointssl_monai.engines.utils import DIAGNOSTIC_SUFFIXES, iteration_output
from jointssl_monai.utils.checkpoints import atomic_write_json
from jointssl_monai.utils.dist import rank

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["LossHistoryHandler"]


class LossHistoryHandler:
    """Averages ``loss``, every ``loss_*`` component and every collapse diagnostic (``intra_clusters_used``,
    ``mask_token_spread``, ...) of the iteration output over each epoch and writes
    ``{"epochs": [{"epoch": 1, "iterations": n, "loss": ..., "loss_intra": ...}, ...]}`` to ``output_file``
    (rank 0 only, rewritten atomically after every epoch). A resumed run continues the file it finds.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.LossHistoryHandler",
         "output_file": "$@output_dir + '/history.json'"}

    Args:
        output_file: path of the JSON file.
    """

    def __init__(self, output_file: str | Path) -> None:
        self.output_file = Path(output_file)
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.accumulate)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.sums.clear()
        self.count = 0

    def accumulate(self, engine: Engine) -> None:
        output = iteration_output(engine)
        for key, value in output.items():
            if key == "loss" or key.startswith("loss_") or key.endswith(DIAGNOSTIC_SUFFIXES):
                self.sums[key] += float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
        self.count += 1

    def read(self) -> list[dict]:
        """The epochs recorded so far in ``output_file`` (empty when it does not exist)."""
        if not self.output_file.is_file():
            return []
        return json.loads(self.output_file.read_text()).get("epochs", [])

    def write(self, engine: Engine) -> None:
        if rank() != 0:
            return
        epoch = engine.state.epoch
        record = {"epoch": epoch, "iterations": self.count}
        record.update({k: (v / self.count if self.count else math.nan) for k, v in sorted(self.sums.items())})
        epochs = [e for e in self.read() if e["epoch"] < epoch] + [record]
        atomic_write_json({"epochs": epochs}, self.output_file)
