"""Ignite handler that loads the self-supervised slice encoder when fine-tuning starts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.handlers import CheckpointLoader
from monai.utils import min_version, optional_import

from jointssl_monai.transfer.loading import EncoderLoadReport, load_pretrained_encoder

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", "0.4.11", min_version, "Engine")

__all__ = ["PretrainedEncoderLoader"]


class PretrainedEncoderLoader:
    """Load a pretrained encoder (``models/ssl/encoder.pt``) into the network at ``Events.STARTED``.

    Opt-in: with ``enabled=False`` it does nothing, so a bundle can list it permanently behind one flag.
    It never overwrites a fine-tuned model: when a MONAI ``CheckpointLoader`` whose file exists is attached to
    the same engine (MONAI Label warm-starts from ``models/model.pt`` by inserting one at ``train#handlers``
    index 0), the SSL load is skipped and the reason logged, whatever the order of the two handlers.
    Weights are mapped by :func:`jointssl_monai.transfer.load_pretrained_encoder` (2D, or inflated to 3D); the
    log shows how many keys loaded.

    Example of a bundle ``train.json``::

        "ssl_pretrained": false,
        "train": {
            "handlers": [
                {
                    "_target_": "jointssl_monai.handlers.PretrainedEncoderLoader",
                    "load_path": "$@bundle_root + '/models/ssl/encoder.pt'",
                    "network": "@network",
                    "enabled": "@ssl_pretrained"
                }
            ]
        }

    and then ``python -m monai.bundle run training --config_file configs/train.json --ssl_pretrained true``.

    Args:
        load_path: the exported encoder, or a full pretraining checkpoint (the encoder is found by key names).
        network: the segmentation network (``FlexibleUNet`` 2D or 3D, possibly DDP-wrapped).
        enabled: load only when ``True``.
        inflate: 2D-to-3D kernel inflation, see :func:`jointssl_monai.transfer.inflate_kernel`.
        first_conv: stem adaptation to other input channel counts, see
            :func:`jointssl_monai.transfer.adapt_first_conv`.
        strict: refuse a checkpoint that is not the network's backbone (default ``True``).
        skip_if_checkpoint_loader: skip when a ``CheckpointLoader`` with an existing file is attached.
        name: identifier of the ``logging.Logger`` to use; ``None`` uses ``engine.logger``.

    Attributes:
        report: the :class:`~jointssl_monai.transfer.EncoderLoadReport` of the last load (``None`` if none).
    """

    def __init__(
        self,
        load_path: str | Path,
        network: torch.nn.Module,
        enabled: bool = True,
        inflate: str = "auto",
        first_conv: str = "auto",
        strict: bool = True,
        skip_if_checkpoint_loader: bool = True,
        name: str | None = None,
    ) -> None:
        self.load_path = Path(load_path)
        self.network = network
        self.enabled = bool(enabled)
        self.inflate = inflate
        self.first_conv = first_conv
        self.strict = strict
        self.skip_if_checkpoint_loader = skip_if_checkpoint_loader
        self._name = name
        self.logger = logging.getLogger(name)
        self.report: EncoderLoadReport | None = None
        if self.enabled and not self.load_path.is_file():
            # fail at config-parsing time, not after the data pipeline has been built
            raise FileNotFoundError(
                f"ssl pretrained encoder {str(self.load_path)!r} does not exist: export one from pretraining "
                "or turn the flag off"
            )

    def attach(self, engine: Engine) -> None:
        """Register the load on ``Events.STARTED`` of ``engine``."""
        if self._name is None:
            self.logger = engine.logger
        engine.add_event_handler(Events.STARTED, self)

    def _checkpoint_loaders(self, engine: Engine) -> list[CheckpointLoader]:
        # Ignite has no public listing of an event's handlers; CheckpointLoader registers itself on STARTED
        handlers = [h for h, *_ in getattr(engine, "_event_handlers", {}).get(Events.STARTED, [])]
        return [h for h in handlers if isinstance(h, CheckpointLoader) and Path(h.load_path).is_file()]

    def __call__(self, engine: Engine) -> None:
        """Load the encoder unless disabled or a fine-tuned checkpoint is being loaded."""
        if not self.enabled:
            self.logger.info("ssl pretrained encoder: disabled, the encoder keeps its initialisation")
            return
        loaders = self._checkpoint_loaders(engine) if self.skip_if_checkpoint_loader else []
        if loaders:
            self.logger.info(
                f"ssl pretrained encoder: skipped, the engine loads the fine-tuned checkpoint "
                f"{loaders[0].load_path} (it must not be overwritten by {self.load_path})"
            )
            return
        self.report = load_pretrained_encoder(
            self.network, self.load_path, inflate=self.inflate, first_conv=self.first_conv, strict=self.strict
        )
        self.logger.info(
            f"ssl pretrained encoder: loaded {self.report.num_loaded} keys from {self.load_path}\n"
            + self.report.summary()
        )
