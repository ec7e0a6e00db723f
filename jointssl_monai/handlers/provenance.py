"""Where a run started: the checkpoint it resumed from, its first and last iteration, how many it ran."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from ignite.engine import Events

from jointssl_monai.utils.checkpoints import atomic_write_json
from jointssl_monai.utils.dist import rank

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["RunProvenanceHandler"]


class RunProvenanceHandler:
    """Appends one record per run to ``output_file``, so that a resumed run can prove it resumed::

        {"runs": [{"resumed_from": null, "start_iteration": 0, "start_epoch": 0, ..., "completed": false},
                  {"resumed_from": ".../checkpoint_iteration=6.pt", "start_iteration": 6, "start_epoch": 2,
                   "epoch_length": 3, "max_epochs": 4, "end_iteration": 12, "end_epoch": 4,
                   "iterations_run": 6, "completed": true, "skipped_inputs": [], "skipped_steps": 0}]}

    ``resumed_from`` is the ``load_path`` of ``checkpoint_loader`` (MONAI's ``CheckpointLoader`` that ran on
    ``STARTED``; ``None`` when it is disabled, i.e. a fresh run). ``start_iteration``/``start_epoch`` are the
    trainer's counters when its first epoch starts (after every ``STARTED`` handler: the loaded checkpoint's,
    converted by :class:`~jointssl_monai.engines.JointSSLTrainer` when the epoch length changed);
    ``iterations_run`` counts the iterations this process completed. The record is written at ``STARTED``
    (``completed: false``, so an interrupted run leaves its start) and rewritten at ``COMPLETED``. Rank 0
    only writes; the file is replaced atomically. One log line per event says the same. At every epoch end
    the record also lists the bad inputs the run passed over (``skip_bad_inputs``; each file once, gathered
    from every process) and the steps it skipped.

    Attach it after the ``CheckpointLoader``, so that its ``STARTED`` step sees the loaded state.

    Example (bundle config, right after the ``CheckpointLoader`` at the top of ``train#handlers``)::

        {"_target_": "jointssl_monai.handlers.RunProvenanceHandler",
         "output_file": "$@output_dir + '/provenance.json'", "checkpoint_loader": "@train#handlers#0"}

    Args:
        output_file: path of the JSON file.
        checkpoint_loader: the ``CheckpointLoader`` of the run (anything with ``load_path``), or ``None``.
    """

    def __init__(self, output_file: str | Path, checkpoint_loader: Any | None = None) -> None:
        if checkpoint_loader is not None and not hasattr(checkpoint_loader, "load_path"):
            raise TypeError(
                "RunProvenanceHandler: checkpoint_loader must be a CheckpointLoader (with load_path), got "
                f"{type(checkpoint_loader).__name__}"
            )
        self.output_file = Path(output_file)
        self.checkpoint_loader = checkpoint_loader
        self.record: dict[str, Any] = {}
        self._epoch_seen = False
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.first_epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.count)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _position(self, engine: Engine) -> None:
        self.record.update(
            start_iteration=engine.state.iteration,
            start_epoch=engine.state.epoch,
            epoch_length=engine.state.epoch_length,
            max_epochs=engine.state.max_epochs,
        )

    def started(self, engine: Engine) -> None:
        path = None if self.checkpoint_loader is None else str(self.checkpoint_loader.load_path)
        self.record = {"resumed_from": path}
        self._position(engine)
        self.record.update(end_iteration=None, end_epoch=None, iterations_run=0, completed=False)
        self._epoch_seen = False
        how = f"resumed from {path}" if path else "started without a checkpoint"
        self.logger.info(
            f"run {how} at iteration {engine.state.iteration} (epoch {engine.state.epoch}) of "
            f"{engine.state.max_epochs} epochs"
        )
        self._write(new=True)

    def first_epoch_started(self, engine: Engine) -> None:
        if self._epoch_seen:
            return
        self._epoch_seen = True
        # The epoch counter has just been incremented; STARTED handlers may have moved the position.
        before = (self.record["start_iteration"], self.record["start_epoch"])
        self._position(engine)
        self.record["start_epoch"] = engine.state.epoch - 1
        if (self.record["start_iteration"], self.record["start_epoch"]) != before:
            self._write(new=False)

    def count(self, engine: Engine) -> None:
        self.record["iterations_run"] += 1

    def _skips(self, engine: Engine) -> None:
        # Every process's bad inputs, each file once (a collective: attached on every process, as in
        # pretrain.json's train#handlers).
        skipped = dict(getattr(engine.state, "skipped_inputs", {}) or {})
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, skipped)
            skipped = {k: v for part in gathered for k, v in part.items()}
        before = len(self.record.get("skipped_inputs", []))
        self.record["skipped_inputs"] = [{"image": k, "reason": v} for k, v in sorted(skipped.items())]
        self.record["skipped_steps"] = int(getattr(engine.state, "skipped_steps", 0))
        if len(skipped) > before:
            self.logger.warning(
                f"{len(skipped)} bad input(s) skipped so far in this run (each counted once): "
                + "; ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
            )

    def epoch_completed(self, engine: Engine) -> None:
        self._skips(engine)
        self._write(new=False)

    def completed(self, engine: Engine) -> None:
        self._skips(engine)
        self.record.update(end_iteration=engine.state.iteration, end_epoch=engine.state.epoch, completed=True)
        self.logger.info(
            f"run completed at iteration {engine.state.iteration} (epoch {engine.state.epoch}) after "
            f"{self.record['iterations_run']} iterations, started at iteration "
            f"{self.record['start_iteration']} from {self.record['resumed_from'] or 'no checkpoint'}"
        )
        self._write(new=False)

    def read(self) -> list[dict]:
        """The runs recorded so far in ``output_file`` (empty when it does not exist)."""
        if not self.output_file.is_file():
            return []
        return json.loads(self.output_file.read_text()).get("runs", [])

    def _write(self, new: bool) -> None:
        if rank() != 0:
            return
        runs = self.read()
        if new or not runs:
            runs.append(dict(self.record))
        else:
            runs[-1] = dict(self.record)
        atomic_write_json({"runs": runs}, self.output_file)
