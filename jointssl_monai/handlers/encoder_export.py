"""Writes the pretrained slice encoder and aggregator for downstream use."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from ignite.engine import Events

from jointssl_monai import __version__
from jointssl_monai.engines.utils import unwrap
from jointssl_monai.utils.checkpoints import atomic_save

if TYPE_CHECKING:
    from ignite.engine import Engine
    from torch import nn

__all__ = ["EncoderExportHandler"]


class EncoderExportHandler:
    """Exports the slice encoder in MONAI ``FlexibleUNet`` key names, the aggregator, and a JSON card.

    Files (written atomically, by rank 0 only) under ``output_dir`` (a bundle's ``models/ssl``; never
    ``models/*.pt`` directly, which MONAI Label would offer as segmentation models):

    - ``encoder.pt``: state dict with exactly the keys of
      ``FlexibleUNet(backbone=..., spatial_dims=2).encoder``;
    - ``aggregator.pt``: state dict of the slice Transformer (``f_inter``);
    - ``encoder.json``: backbone, channels, d_model, epochs/iterations done, data summary, package version.

    Example (bundle config)::

        {"_target_": "jointssl_monai.handlers.EncoderExportHandler", "network": "@network",
         "output_dir": "$@bundle_root + '/models/ssl'", "card": {"data": "@datalist_summary"}}

    Args:
        network: the pretraining network (``DistributedDataParallel`` is unwrapped).
        output_dir: folder of the exported files.
        epoch_interval: export every this many epochs (and always when training completes).
        card: extra JSON-serialisable entries of the card.
    """

    def __init__(
        self,
        network: nn.Module,
        output_dir: str | Path,
        epoch_interval: int = 1,
        card: dict[str, Any] | None = None,
    ) -> None:
        self.network = network
        self.output_dir = Path(output_dir)
        self.epoch_interval = max(1, int(epoch_interval))
        self.card = dict(card or {})
        self.exported_iteration = -1
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.epoch_interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        if engine.state.iteration == self.exported_iteration:  # the last epoch end, again at COMPLETED
            return
        self.exported_iteration = engine.state.iteration
        self.export(epoch=engine.state.epoch, iteration=engine.state.iteration)

    def export(self, epoch: int = 0, iteration: int = 0) -> Path:
        """Write the files now; returns the path of ``encoder.pt``."""
        network = unwrap(self.network)
        encoder = network.encoder
        state = {k: v.detach().cpu() for k, v in encoder.encoder_state_dict().items()}
        path = atomic_save(state, self.output_dir / "encoder.pt")
        atomic_save({k: v.detach().cpu() for k, v in network.aggregator.state_dict().items()},
                    self.output_dir / "aggregator.pt")  # fmt: skip
        card = {
            "format": "jointssl_monai encoder export",
            "keys": "monai.networks.nets.FlexibleUNet(spatial_dims=2).encoder",
            "backbone": encoder.backbone,
            "in_channels": encoder.in_channels,
            "spatial_dims": 2,
            "d_model": encoder.d_model,
            "num_keys": len(state),
            "epoch": epoch,
            "iteration": iteration,
            "jointssl_monai_version": __version__,
            **self.card,
        }
        card_path = self.output_dir / "encoder.json"
        tmp = card_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(card, indent=2, default=str))
        tmp.replace(card_path)
        self.logger.info(
            f"exported {len(state)} encoder tensors to {path} (epoch {epoch}, iteration {iteration})"
        )
        return path
