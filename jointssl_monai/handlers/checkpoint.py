"""Atomic, resumable checkpoints of the whole pretraining state."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ignite.engine import Events

from jointssl_monai.utils.checkpoints import atomic_save

if TYPE_CHECKING:
    from ignite.engine import Engine

__all__ = ["AtomicCheckpointSaver"]


def _iteration_number(path: Path) -> int:
    return int(path.stem.rsplit("=", 1)[-1])


class AtomicCheckpointSaver:
    """Saves ``{name: obj.state_dict()}`` of every object in ``save_dict`` atomically, keeping the newest.

    MONAI's ``CheckpointSaver`` writes in place (Ignite's ``DiskSaver(atomic=False)``), so a process killed
    while saving leaves a truncated newest checkpoint, and a resume then fails. This handler writes through
    :func:`~jointssl_monai.utils.checkpoints.atomic_save` (temporary file, flush, rename): at any moment the
    newest complete checkpoint is loadable. Files are named ``checkpoint_iteration=<N>.pt`` by global
    iteration, which :func:`~jointssl_monai.utils.checkpoints.latest_checkpoint` orders, plus
    ``final_filename`` when training completes. The format is Ignite's, so MONAI's ``CheckpointLoader``
    resumes from it. Attach it on rank 0 only.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.AtomicCheckpointSaver", "save_dir": "@ckpt_dir",
         "save_dict": {"trainer": "@train#trainer", "network": "@network_def"}, "epoch_interval": 1}

    Args:
        save_dir: folder of the checkpoints.
        save_dict: objects with ``state_dict()`` (trainer, network, optimiser, scheduler, loss, random state).
        epoch_interval: save every this many epochs (0: never at epoch ends).
        iteration_interval: save every this many iterations (0: never mid-epoch).
        n_saved: how many periodic checkpoints to keep (the final one is kept apart).
        final_filename: name of the checkpoint written when training completes (``None``: none).
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: dict[str, Any],
        epoch_interval: int = 1,
        iteration_interval: int = 0,
        n_saved: int = 2,
        final_filename: str | None = "checkpoint_final.pt",
    ) -> None:
        if not save_dict:
            raise ValueError("AtomicCheckpointSaver: save_dict is empty")
        for name, obj in save_dict.items():
            if not callable(getattr(obj, "state_dict", None)):
                raise TypeError(f"AtomicCheckpointSaver: save_dict[{name!r}] has no state_dict()")
        self.save_dir = Path(save_dir)
        self.save_dict = save_dict
        self.epoch_interval = epoch_interval
        self.iteration_interval = iteration_interval
        self.n_saved = max(1, n_saved)
        self.final_filename = final_filename
        # Periodic checkpoints of an earlier, interrupted run count towards n_saved, oldest first.
        self.saved = sorted(self.save_dir.glob("checkpoint_iteration=*.pt"), key=_iteration_number)
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        if self.epoch_interval > 0:
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.epoch_interval), self.save_periodic)
        if self.iteration_interval > 0:
            engine.add_event_handler(
                Events.ITERATION_COMPLETED(every=self.iteration_interval), self.save_periodic
            )
        if self.final_filename:
            engine.add_event_handler(Events.COMPLETED, self.save_final)

    def state(self) -> dict[str, Any]:
        return {name: obj.state_dict() for name, obj in self.save_dict.items()}

    def save_periodic(self, engine: Engine) -> Path:
        path = self.save_dir / f"checkpoint_iteration={engine.state.iteration}.pt"
        if path in self.saved:  # an epoch end that is also an iteration multiple
            return path
        atomic_save(self.state(), path)
        self.saved.append(path)
        while len(self.saved) > self.n_saved:
            self.saved.pop(0).unlink(missing_ok=True)
        self.logger.info(
            f"saved checkpoint {path} (epoch {engine.state.epoch}, iteration {engine.state.iteration})"
        )
        return path

    def save_final(self, engine: Engine) -> Path:
        path = atomic_save(self.state(), self.save_dir / str(self.final_filename))
        self.logger.info(f"saved final checkpoint {path}")
        return path
