"""One full pretraining step (forward, joint loss, backward, optimiser step) as a benchmark case.

The step is :class:`~jointssl_monai.engines.JointSSLTrainer`'s own iteration on a fixed synthetic batch of the
configured shape (data loading is measured apart, :mod:`jointssl_monai.apps.bench.loader`). The in-run
baseline is the same step written the plain way (:class:`PlainLoopJointSSLNet`): the same modules called once
per view and per volume or image, as a straightforward implementation (the authors' among them) does, where
ours embeds every slice of every view in one encoder call and runs the aggregator once over all sequences.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from jointssl_monai.apps.bench.machine import PeakMemory
from jointssl_monai.apps.bench.timing import interleaved_times, paired_ratio
from jointssl_monai.engines import JointSSLTrainer, build_optimizer
from jointssl_monai.engines.utils import prepare_ssl_batch
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks import JointSSLNet

__all__ = [
    "STEP_CONFIGS", "PlainLoopJointSSLNet", "StepCase", "build_step", "count_flops", "measure_steps",
    "step_variants", "synthetic_batch",
]  # fmt: skip

#: ``demo`` is the model and objectives of ``jointssl demo`` (``DEMO_OVERRIDES``: SwAV slice level,
#: DeepCluster-v2 volume level) on 2 volumes and 2 images; ``paper`` is the authors' 3D-stage shape:
#: ResNet-50, 1 volume of 64 slices of 128 x 128, 2 views, d_model 640, 4 layers, SwAV with 3000 prototypes.
STEP_CONFIGS: dict[str, dict[str, Any]] = {
    "demo": {
        "backbone": "resnet18", "d_model": 128, "num_layers": 2, "ff_dim": 256, "proj_hidden_dim": 256,
        "proj_dim": 64, "prototypes": 16, "slices": 16, "size": 64, "volumes": 2, "images": 2,
        "intra_method": "swav", "inter_method": "deepcluster",
    },
    "paper": {
        "backbone": "resnet50", "d_model": 640, "num_layers": 4, "ff_dim": 720, "proj_hidden_dim": 2048,
        "proj_dim": 128, "prototypes": 3000, "slices": 64, "size": 128, "volumes": 1, "images": 0,
        "intra_method": "swav", "inter_method": "swav",
    },
}  # fmt: skip


def synthetic_batch(config: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """A prepared batch of the configured shape: ``volumes`` volumes and ``images`` 2D images, two views."""
    generator = torch.Generator().manual_seed(seed)
    b, s, hw, n_img = config["volumes"], config["slices"], config["size"], config["images"]
    volume = torch.rand(b, 1, s, hw, hw, generator=generator)
    images = torch.rand(n_img, 1, hw, hw, generator=generator)
    return {
        "volume_views": [volume, volume.flip(-1)] if b else None,
        "num_slices": torch.full((b,), s, dtype=torch.long) if b else None,
        "volume_index": torch.arange(b) if b else None,
        "image_views": [images, images.flip(-2)] if n_img else None,
        "image_index": torch.arange(b, b + n_img) if n_img else None,
        "image_local_views": None,
    }


class _RowByRow(nn.Module):
    """The aggregator called on one sequence at a time."""

    def __init__(self, aggregator: nn.Module) -> None:
        super().__init__()
        self.inner = aggregator

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [self.inner(tokens[i : i + 1], valid[i : i + 1]) for i in range(tokens.shape[0])]
        return torch.cat([c for c, _ in outputs]), torch.cat([z for _, z in outputs])


class PlainLoopJointSSLNet(JointSSLNet):
    """:class:`JointSSLNet` with the batching taken out: one encoder call per view of each volume and each
    image, one aggregator call per sequence. It computes the same function (identical outputs in eval mode;
    in training mode BatchNorm sees smaller batches) and is the baseline every speed-up is measured against.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.aggregator = _RowByRow(self.aggregator)
        self._slices_per_volume: list[int] = []

    def _check_volumes(self, volume_views, num_slices):  # type: ignore[override]
        views, valid = super()._check_volumes(volume_views, num_slices)
        self._slices_per_volume = valid.sum(1).tolist() if valid is not None else []
        return views, valid

    def _encode(self, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        volume_chunks = 2 if self._slices_per_volume else 0  # forward puts the two volume views first
        out = []
        for i, chunk in enumerate(chunks):
            pieces = chunk.split(self._slices_per_volume if i < volume_chunks else 1)
            out.append(torch.cat([self.encoder(p) for p in pieces]))
        return out


@dataclass
class StepCase:
    """One benchmark case: ``run()`` performs a full training step and returns its loss."""

    name: str
    amp: str
    channels_last: bool
    plain: bool
    trainer: JointSSLTrainer
    batch: dict[str, Any]
    losses: list[float] = field(default_factory=list)

    def run(self) -> float:
        # The trainer's own iteration, the function ``trainer.run()`` calls for every batch.
        output = self.trainer._iteration(self.trainer, self.batch)
        loss = float(output[0]["loss"])
        self.losses.append(loss)
        return loss


def count_flops(step: Callable[[], Any]) -> int:
    """Floating-point operations of one call of ``step`` (forward and backward: PyTorch's FLOP counter counts
    matrix products and convolutions, 2 per multiply-add)."""
    with FlopCounterMode(display=False) as counter:
        step()
    return int(counter.get_total_flops())


def build_step(
    config_name: str,
    amp: str = "none",
    channels_last: bool = False,
    plain: bool = False,
    device: str | torch.device = "cpu",
    seed: int = 0,
    volumes: int | None = None,
) -> StepCase:
    """Build the network, joint loss, AdamW optimiser and trainer of a :data:`STEP_CONFIGS` configuration.

    Args:
        config_name: a key of :data:`STEP_CONFIGS`.
        amp: ``"none"``, ``"bf16"`` or ``"fp16"`` autocast, as the bundle's ``amp``.
        channels_last: the slice encoder in channels-last memory format.
        plain: the plain-loop baseline (:class:`PlainLoopJointSSLNet`) instead of the batched network.
        device: where to run.
        seed: initialisation and batch seed (the same for every case, so cases differ only in the setting).
        volumes: volumes per step instead of the configuration's (the largest-batch search).
    """
    config = STEP_CONFIGS[config_name]
    if volumes is not None:
        config = {**config, "volumes": volumes}
    device = torch.device(device)
    torch.manual_seed(seed)
    rows = (config["volumes"] + config["images"]) * config["slices"]
    loss = JointSSLLoss(
        config["intra_method"], config["inter_method"], intra_prototypes=config["prototypes"],
        inter_prototypes=config["prototypes"], embedding_dim=config["proj_dim"], intra_bank_size=rows,
        inter_bank_size=config["volumes"], seed=seed,
    ).to(device)  # fmt: skip
    cls = PlainLoopJointSSLNet if plain else JointSSLNet
    net = cls.from_settings(
        backbone=config["backbone"], d_model=config["d_model"], num_layers=config["num_layers"],
        ff_dim=config["ff_dim"], proj_hidden_dim=config["proj_hidden_dim"], proj_dim=config["proj_dim"],
        intra_prototypes=loss.prototype_heads("intra"), inter_prototypes=loss.prototype_heads("inter"),
        channels_last=channels_last,
    ).to(device)  # fmt: skip
    batch = prepare_ssl_batch(synthetic_batch(config, seed), device)
    trainer = JointSSLTrainer(
        device=device, max_epochs=1, train_data_loader=[batch], network=net,
        optimizer=build_optimizer(net, "adamw", lr=1e-3), loss_function=loss,
        slices_per_sample=config["slices"], amp=amp,
    )  # fmt: skip
    name = f"{config_name} {'plain loop' if plain else 'batched'} {amp if amp != 'none' else 'fp32'}"
    name += " channels-last" if channels_last else ""
    return StepCase(name, amp, channels_last, plain, trainer, batch)


def step_variants(device: torch.device | str) -> list[dict[str, Any]]:
    """The cases of one configuration: the plain-loop baseline first, then the batched step in float32 and
    bf16 autocast, each with and without channels-last."""
    variants: list[dict[str, Any]] = [{"plain": True, "amp": "none", "channels_last": False}]
    for amp in ("none", "bf16"):
        for channels_last in (False, True):
            variants.append({"plain": False, "amp": amp, "channels_last": channels_last})
    return variants


def measure_steps(
    config_name: str,
    device: torch.device | str,
    rounds: int,
    matmul_rate: dict[str, float],
    warmup: int = 1,
    authors_dir: str | None = None,
) -> dict[str, Any]:
    """Time every :func:`step_variants` case of a configuration, interleaved, with its peak memory and FLOPs.

    Args:
        config_name: a key of :data:`STEP_CONFIGS`.
        device: where to run.
        rounds: timed rounds (each case once per round, after ``warmup`` untimed steps and a FLOP count).
        matmul_rate: the machine's dense matmul FLOP/s per autocast setting (``"none"``, ``"bf16"``); a case's
            utilisation is its achieved FLOP/s over the rate of its dtype.
        warmup: untimed steps of each case before the first round.
        authors_dir: a checkout of the authors' repository: adds their step
            (:class:`~jointssl_monai.apps.bench.authors.AuthorsStep`) as one more case, and every case's
            speed-up over it (``vs_authors``).

    Returns:
        ``cases``: per case its times, median, throughput, peak memory (``peak_gib``; ``step_gib``: the peak
        less what was in use before the step), GFLOP, utilisation, losses and the per-round speed-ups over
        the plain loop (``vs_plain``), the batched float32 step (``vs_fp32``) and the authors'
        (``vs_authors``).
    """
    device = torch.device(device)
    config = STEP_CONFIGS[config_name]
    cases: list[Any] = [
        build_step(config_name, device=device, **variant) for variant in step_variants(device)
    ]
    if authors_dir is not None:
        from jointssl_monai.apps.bench.authors import AuthorsStep

        cases.append(AuthorsStep(authors_dir, config, device))
    flops = {case.name: count_flops(case.run) for case in cases}
    peaks: dict[str, list[tuple[float, float]]] = {case.name: [] for case in cases}

    def measured(case: Any) -> Callable[[], None]:
        def call() -> None:
            with PeakMemory(device) as peak:
                case.run()
            if peak.gib is not None and peak.increase_gib is not None:
                peaks[case.name].append((peak.gib, peak.increase_gib))

        return call

    times = interleaved_times({c.name: measured(c) for c in cases}, rounds, warmup=warmup, device=device)
    plain, fp32 = cases[0].name, cases[1].name
    authors = cases[-1].name if authors_dir is not None else None
    rows = []
    for case in cases:
        median = statistics.median(times[case.name])
        slices = 2 * (
            config["volumes"] * config["slices"] + (0 if case.name == authors else config["images"])
        )

        def versus(baseline: str | None, skip: tuple[str | None, ...], name: str = case.name) -> dict | None:
            return None if baseline is None or name in skip else paired_ratio(times[baseline], times[name])

        rows.append({
            "case": case.name.removeprefix(f"{config_name} "), "plain": case.plain, "amp": case.amp,
            "channels_last": case.channels_last, "authors": case.name == authors, "seconds": times[case.name],
            "median_s": median, "volumes_per_s": config["volumes"] / median, "slices_per_s": slices / median,
            "peak_gib": max(p for p, _ in peaks[case.name]) if peaks[case.name] else None,
            "step_gib": max(s for _, s in peaks[case.name]) if peaks[case.name] else None,
            "gflop": flops[case.name] / 1e9, "utilisation": flops[case.name] / median / matmul_rate[case.amp],
            "losses": case.losses,
            "vs_plain": versus(plain, (plain, authors)),
            "vs_fp32": versus(fp32, (plain, fp32, authors)),
            "vs_authors": versus(authors, (authors,)),
        })  # fmt: skip
    return {"config": config, "rounds": rounds, "warmup": warmup, "cases": rows}
