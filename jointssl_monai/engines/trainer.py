"""The pretraining engine: a MONAI ``Trainer`` (an Ignite ``Engine``), so every MONAI/Ignite handler works.

One iteration: move the two-view mixed 2D/3D batch to the device, run
:class:`~jointssl_monai.networks.JointSSLNet` under optional autocast, evaluate
:class:`~jointssl_monai.losses.JointSSLLoss`, stop on a non-finite loss, back-propagate (with a gradient
scaler for fp16), clip gradients and step the optimiser. It fires MONAI's ``IterationEvents``
(``FORWARD_COMPLETED``, ``LOSS_COMPLETED``, ``BACKWARD_COMPLETED``, ``MODEL_COMPLETED``) so that side effects
live in handlers: SwAV's prototype freezing acts on ``BACKWARD_COMPLETED``, DeepCluster-v2's per-epoch
clustering on ``EPOCH_STARTED``. ``engine.state.output`` is a one-item list holding the iteration's dict
(see :func:`iteration_output`), MONAI's decollated convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.engines.workflow import Workflow
from torch import nn

from jointssl_monai.data.batching import MixedBatchSampler
from jointssl_monai.engines.utils import DIAGNOSTIC_SUFFIXES, batches_done_in_epoch, prepare_ssl_batch, unwrap
from jointssl_monai.networks import JointSSLNet
from jointssl_monai.outputs import JointSSLOutput
from jointssl_monai.utils.arguments import check_number
from jointssl_monai.utils.precision import resolve_amp

__all__ = ["JointSSLTrainer", "NonFiniteLossError"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or Inf; the message names the iteration and the loss component."""


class _GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose enabled instance also resumes a checkpoint written without fp16 (an
    empty state: it keeps its initial scale) instead of raising."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            super().load_state_dict(state_dict)


class JointSSLTrainer(Trainer):
    """Ignite trainer for joint image-volume self-supervised pretraining (Nguyen et al., AAAI 2023).

    Example (what ``bundle/configs/pretrain.json`` builds)::

        trainer = JointSSLTrainer(
            device=torch.device("cpu"), max_epochs=100, train_data_loader=loader,
            network=JointSSLNet.from_settings(...), optimizer=build_optimizer(net),
            loss_function=JointSSLLoss(...), slices_per_sample=64, amp="bf16",
            train_handlers=[StatsHandler(...)],
        )
        trainer.run()

    Args:
        device: where the network runs.
        max_epochs: number of epochs.
        train_data_loader: yields collated batches with the keys of ``jointssl_monai.outputs.BATCH_KEYS``.
        network: a :class:`~jointssl_monai.networks.JointSSLNet`, optionally wrapped by
            ``DistributedDataParallel``.
        optimizer: the optimiser.
        loss_function: a :class:`~jointssl_monai.losses.JointSSLLoss`; returns a dict with ``"loss"``.
        slices_per_sample: the slice budget ``S`` of a volume; intra memory-bank keys are
            ``dataset_index * S + slice_position``.
        epoch_length: iterations per epoch (default: the loader's length).
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast on the device's type, or ``"auto"``: bf16 where
            the device computes it natively, else none (:func:`~jointssl_monai.utils.precision.resolve_amp`;
            ``self.amp`` holds the setting used); fp16 uses a gradient scaler (``self.scaler``, a
            ``torch.amp.GradScaler`` of the device's type, disabled for the other settings; save it in
            checkpoints to resume its scale).
        grad_clip_norm: clip the global gradient norm at this value (``None``: no clipping).
        non_blocking: non-blocking host-to-device copies.
        train_handlers: Ignite/MONAI handlers with an ``attach`` method.
        lr_scheduler: the per-iteration learning-rate schedule, if any; only used to keep its position when
            a checkpoint of another epoch length (another number of processes) is resumed.
        nonfinite_policy: ``"stop"`` raises :class:`NonFiniteLossError` (naming iteration and component)
            before the step, so the last checkpoint stays good; ``"skip"`` drops the step and counts it in
            ``engine.state.skipped_steps``.

    ``engine.state.skipped_inputs`` maps every bad input this process passed over (``skip_bad_inputs``) to
    the reason, once per file; :class:`~jointssl_monai.handlers.RunProvenanceHandler` records them.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable[..., dict[str, torch.Tensor]],
        slices_per_sample: int,
        epoch_length: int | None = None,
        amp: str = "none",
        grad_clip_norm: float | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        nonfinite_policy: str = "stop",
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    ) -> None:
        if amp not in ("none", "auto", *_AMP_DTYPES):
            raise ValueError(f"amp must be 'none', 'auto', 'bf16' or 'fp16', got {amp!r}")
        amp = resolve_amp(amp, device)
        if nonfinite_policy not in ("stop", "skip"):
            raise ValueError(f"nonfinite_policy must be 'stop' or 'skip', got {nonfinite_policy!r}")
        if grad_clip_norm is not None:
            check_number("grad_clip_norm", grad_clip_norm, 0, exclusive_minimum=True)
        if slices_per_sample < 1:
            raise ValueError(f"slices_per_sample must be >= 1, got {slices_per_sample}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_ssl_batch,
            iteration_update=None,
            handlers=None,
            amp=amp != "none",
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.slices_per_sample = slices_per_sample
        self.amp = amp  # the resolved setting ("auto" has become "bf16" or "none")
        self.amp_dtype = _AMP_DTYPES.get(amp)
        self.grad_clip_norm = grad_clip_norm
        self.nonfinite_policy = nonfinite_policy
        self.lr_scheduler = lr_scheduler
        # A gradient scaler for fp16 on the trainer's device (``GradScaler(device.type)``); bf16 keeps the
        # float32 exponent range and needs none. Always present, disabled (a pass-through with an empty state)
        # unless fp16, so that checkpoints can hold ``trainer.scaler`` whatever ``amp`` is.
        self.scaler = _GradScaler(self.state.device.type, enabled=self.amp_dtype is torch.float16)
        self.state.skipped_steps = 0
        self.state.skipped_inputs = {}  # file -> reason of every bad input this process passed over
        self.loader_epoch_length = self.state.epoch_length
        self._register_sampler_epoch()
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def attach_handlers(self, handlers: Sequence) -> None:
        """Attach handlers after construction, in order (for handlers that need the trainer itself, such as a
        ``CheckpointSaver`` whose ``save_dict`` holds the trainer for a full resume)."""
        self._register_handlers(handlers)

    def _register_sampler_epoch(self) -> None:
        # MONAI sets the epoch of a DistributedSampler; our mixed batch sampler needs the same, so that each
        # epoch is shuffled differently and identically on every rank.
        batch_sampler = getattr(self.data_loader, "batch_sampler", None)
        if isinstance(batch_sampler, MixedBatchSampler):
            self.add_event_handler(
                Events.EPOCH_STARTED,
                lambda engine: batch_sampler.set_epoch(engine.state.epoch, batches_done_in_epoch(engine)),
            )
        elif batch_sampler is not None and hasattr(batch_sampler, "set_epoch"):
            self.add_event_handler(
                Events.EPOCH_STARTED, lambda engine: batch_sampler.set_epoch(engine.state.epoch)
            )

    def run(self) -> None:  # type: ignore[override]
        # Registered last, so that it runs after a CheckpointLoader on STARTED.
        if not self.has_event_handler(self._adapt_epoch_length, Events.STARTED):
            self.add_event_handler(Events.STARTED, self._adapt_epoch_length)
        Workflow.run(self)  # not Trainer.run, which replaces the scaler by a CUDA one for every amp

    def _adapt_epoch_length(self, engine: JointSSLTrainer) -> None:
        """Continue at the same epoch after resuming a checkpoint written with another number of processes.

        Each process runs ``len(loader)`` iterations an epoch, which depends on the world size; Ignite
        restores the epoch length of the checkpoint. Checkpoints are taken at epoch ends, so the epoch count
        carries over.
        """
        saved, current = engine.state.epoch_length, self.loader_epoch_length
        if current is None or saved == current:
            return
        epoch, rest = divmod(engine.state.iteration, saved)
        if rest:
            raise ValueError(
                f"cannot resume iteration {engine.state.iteration} (inside epoch {epoch + 1} of {saved} "
                f"iterations) with {current} iterations an epoch: resume from an epoch-end checkpoint"
            )
        engine.logger.info(
            f"resumed at the end of epoch {epoch}: {saved} iterations an epoch then, {current} now "
            "(another number of processes or another data set size)"
        )
        engine.state.epoch_length, engine.state.iteration, engine.state.epoch = (
            current,
            epoch * current,
            epoch,
        )
        if self.lr_scheduler is not None:
            # A per-iteration schedule counts iterations too: move it to the same point in the new units (the
            # optimiser already holds the learning rate of that point).
            self.lr_scheduler.last_epoch = epoch * current

    def _any_process_empty(self, engine: JointSSLTrainer, batch: dict) -> bool:
        """Whether this process's batch, or any other process's, holds no item (every item a skipped bad
        input). All processes then pass over the step together: one that went on alone would wait forever
        in the collectives of DistributedDataParallel and of the clustering losses."""
        empty = torch.tensor(
            int(batch.get("volume_views") is None and batch.get("image_views") is None), dtype=torch.int32
        )
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            empty = empty.to(engine.state.device)
            dist.all_reduce(empty, op=dist.ReduceOp.MAX)
        return bool(empty)

    def _skip_empty_batch(self, engine: JointSSLTrainer) -> list[dict]:
        engine.state.skipped_steps += 1
        engine.logger.warning(
            f"iteration {engine.state.iteration}: every item of a batch was a skipped bad input (on this or "
            "another process); no step on any process"
        )
        engine.state.output = [{}]
        return engine.state.output

    def memory_keys(
        self, batch: dict, output: JointSSLOutput
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Dataset keys of the intra rows (``index * S + slice``) and of the volumes (``index``)."""
        indices = [batch[k] for k in ("volume_index", "image_index") if batch.get(k) is not None]
        intra_keys = None
        if output.intra is not None and output.intra_source is not None and indices:
            sample_index = torch.cat(indices).to(output.intra_source.device)
            intra_keys = sample_index[output.intra_source] * self.slices_per_sample + output.intra_slice
        inter_keys = batch.get("volume_index") if output.inter is not None else None
        return intra_keys, inter_keys

    def forward_batch(self, batch: dict) -> JointSSLOutput | None:
        """The network output for a prepared batch, under the configured autocast (``None`` if empty)."""
        if batch.get("volume_views") is None and batch.get("image_views") is None:
            return None
        with self._autocast():
            return self.network(
                volume_views=batch.get("volume_views"),
                num_slices=batch.get("num_slices"),
                image_views=batch.get("image_views"),
                image_local_views=batch.get("image_local_views"),
            )

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.state.device.type, enabled=False)
        return torch.autocast(self.state.device.type, dtype=self.amp_dtype)

    def _check_finite(self, engine: JointSSLTrainer, losses: dict[str, torch.Tensor]) -> bool:
        finite = torch.isfinite(losses["loss"].detach()).all().to(torch.int32)
        if dist.is_available() and dist.is_initialized():
            # Every rank must take the same decision, or DistributedDataParallel waits forever.
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if bool(finite):
            return True
        components = {k: float(v) for k, v in losses.items() if isinstance(v, torch.Tensor)}
        bad = [name for name, value in components.items() if name != "loss" and not math.isfinite(value)]
        message = (
            f"non-finite loss at iteration {engine.state.iteration} (epoch {engine.state.epoch}): "
            f"component(s) {', '.join(bad) or 'total'}; values "
            + ", ".join(f"{k}={v:.4g}" for k, v in components.items())
        )
        if self.nonfinite_policy == "stop":
            raise NonFiniteLossError(
                message + "; stopped before the optimiser step, the last checkpoint is intact"
            )
        engine.state.skipped_steps += 1
        engine.logger.warning(message + "; step skipped")
        return False

    def _iteration(self, engine: JointSSLTrainer, batchdata: dict) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        for source, reason in batch.get("skipped_inputs") or ():
            engine.state.skipped_inputs.setdefault(source, reason)  # once per file, however often it is met
        if self._any_process_empty(engine, batch):
            return self._skip_empty_batch(engine)
        network = unwrap(engine.network)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.forward_batch(batch)
            result: dict = {"output": output}
            engine.state.output = [result]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            intra_keys, inter_keys = self.memory_keys(batch, output)
            losses = engine.loss_function(
                output,
                intra_keys=intra_keys,
                inter_keys=inter_keys,
                intra_prototypes=_prototype_weights(network, "intra"),
                inter_prototypes=_prototype_weights(network, "inter"),
            )
        result.update({"loss": losses["loss"].detach(), "intra_keys": intra_keys, "inter_keys": inter_keys})
        # Components are detached tensors; collapse diagnostics are plain floats.
        result.update({k if k.endswith(DIAGNOSTIC_SUFFIXES) else f"loss_{k}": v
                                    for k, v in losses.items() if k != "loss"})  # fmt: skip
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not self._check_finite(engine, losses):
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return engine.state.output
        # A disabled scaler (no fp16) passes every call through: plain backward and step.
        engine.scaler.scale(losses["loss"]).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.scaler.unscale_(engine.optimizer)  # clip the true gradients, not the scaled ones
        if self.grad_clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(engine.network.parameters(), self.grad_clip_norm)
            result["grad_norm"] = norm.detach()
        engine.scaler.step(engine.optimizer)  # skipped by an enabled scaler when a gradient is not finite
        engine.scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _prototype_weights(network: nn.Module, level: str) -> list[torch.Tensor] | None:
    # A network without clustering prototypes (e.g. a user's own) gives none: SwAV then needs no queue.
    if not isinstance(network, JointSSLNet):
        return None
    return network.prototypes(level).weights()
