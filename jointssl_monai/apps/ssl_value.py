"""The value benchmark: do the pretrained weights beat random initialisation on held-out real data?

One run (``scripts/bench_ssl_value.py``):

1. builds a pretraining datalist from every real image found offline (:func:`offline_image_folders`),
   leaving out label maps, atlases, masks and tiny fixtures, and the held-out test subject;
2. pretrains with the bundle for a wall-clock budget per objective (the paper's ablation: ``intra``,
   ``intra+mask``, ``joint``), each with a cosine schedule sized to its budget;
3. evaluates each exported encoder against the same network from random initialisation, with paired seeds:
   a linear probe (1x1 convolution) on frozen multi-scale features, nearest-neighbour retrieval of slices by
   their position in the brain, and fine-tuning of a 2D ``FlexibleUNet`` to convergence; an intensity rule
   fitted on the same labelled slices and a raw-pixel retrieval are the trivial baselines beside them;
4. writes every seed's score to ``bench_results/ssl_value.json`` (the contract of
   :mod:`jointssl_monai.apps.value_report`) and prints the table of paired gains with 95 % intervals.

Tasks (:func:`brain_extraction_task`, :func:`lobes_task`) use the real images of installed packages; a user's
own task is a :class:`SliceTask` built from their volumes.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.nets import FlexibleUNet

from jointssl_monai.apps.bundle_commands import DEMO_OVERRIDES, find_bundle_dir, pretrain_command
from jointssl_monai.apps.sample_data import find_sample
from jointssl_monai.apps.slicewise import (
    Volume,
    dice_3d,
    finetune_slicewise,
    fit_slices,
    load_volume,
    predict_volume,
    volume_slices,
)
from jointssl_monai.data.datalist import build_datalist, write_datalist
from jointssl_monai.transfer import load_pretrained_encoder

__all__ = [
    "OBJECTIVES",
    "ProbeFeatures",
    "SliceTask",
    "brain_extraction_task",
    "calibrated_epochs",
    "epoch_seconds",
    "epochs_within_budget",
    "evaluation_device",
    "finetune_dice",
    "frozen_encoder",
    "intensity_rule",
    "linear_probe",
    "lobes_task",
    "offline_image_folders",
    "position_retrieval",
    "pretrain_encoder",
    "value_datalist",
]

logger = logging.getLogger(__name__)

#: The paper's ablation (Nguyen et al., AAAI 2023, Table 4): bundle overrides of each objective.
OBJECTIVES: dict[str, dict[str, Any]] = {
    "intra": {"inter_method": "none", "w_inter": 0.0, "w_mask": 0.0},
    "intra+mask": {"inter_method": "none", "w_inter": 0.0},
    "joint": {},
}

#: A small configuration of the paper's model for 2 CPU cores (ResNet-18, 64 x 64 slices, random windows of
#: 16 slices so that a few volumes give many different sequences): the demo's model, sized to more data. A GPU
#: user passes larger values.
CPU_SETTINGS: dict[str, Any] = {
    **{key: value for key, value in DEMO_OVERRIDES.items() if key != "max_epochs"},  # the budget sets it
    "intra_prototypes": 64,
    "inter_prototypes": 3,
    "slice_policy": "random",
    "batch_size": 8,
    "freeze_prototypes_iterations": 20,
    "log_interval": 10,
}

#: Names of the held-out subject's files (the ITK example subject: its T1, skull strip and segmentation).
HELD_OUT_PATTERN = re.compile(r"KmeansTest_T1")
#: Images smaller than this in-plane (pixels) are test fixtures, not images.
MIN_IN_PLANE = 32


# --- data ---


def offline_image_folders() -> list[Path]:
    """The folders of real images the project finds offline: the Debian templates and ITK examples, and the
    test data of nibabel, pydicom and pydicom-data."""
    names = ("colin27_t1", "itk_t1", "nibabel_anatomical", "pydicom_ct_series", "pydicom_cr_x_ray")
    folders = []
    for name in names:
        try:
            path = find_sample(name)
        except FileNotFoundError as err:
            logger.warning(f"value benchmark: {err}")
            continue
        folder = path.parent if name != "pydicom_ct_series" else path.parents[1]
        if folder not in folders:
            folders.append(folder)
    return folders


def value_datalist(
    output: str | Path,
    folders: Sequence[str | Path] | None = None,
    held_out: re.Pattern = HELD_OUT_PATTERN,
    min_in_plane: int = MIN_IN_PLANE,
) -> tuple[Path, dict[str, Any]]:
    """Scan ``folders`` into a pretraining datalist without label maps, tiny fixtures or the held-out subject.

    Returns:
        the datalist path and a summary: counts and every left-out file with its reason.
    """
    folders = list(folders) if folders is not None else offline_image_folders()
    entries, summary = build_datalist(folders, skip_bad_inputs=True, skip_label_maps=True)
    kept, left_out = [], [(name, reason) for name, reason in summary.ignored]
    left_out += [(str(p), reason) for p, reason in summary.skipped.skipped]
    for entry in entries:
        first = entry["image"][0] if isinstance(entry["image"], list) else entry["image"]
        if held_out.search(Path(first).name):
            left_out.append((first, "held-out test subject"))
        elif min(entry["shape"][:2]) < min_in_plane:
            left_out.append((first, f"smaller than {min_in_plane} pixels in-plane: a test fixture"))
        else:
            kept.append(entry)
    path = write_datalist(kept, output)
    info = {
        "volumes": sum(e["dims"] == 3 for e in kept),
        "images": sum(e["dims"] == 2 for e in kept),
        "left_out": [{"file": name, "reason": reason} for name, reason in left_out],
        "folders": [str(f) for f in folders],
    }
    return path, info


@dataclass
class SliceTask:
    """A slice-wise segmentation task: labelled slices are drawn from ``train``, scores are 3D over ``test``.

    Attributes:
        name: the task's name in the results.
        train: the volume that labelled slices come from (image ``(1, X, Y, Z)``, label ``(X, Y, Z)``).
        test: held-out volumes, scored by 3D Dice over their stacked axial slices.
        num_classes: classes including background.
        candidates: axial indices of ``train`` that may be labelled (default: those with foreground).
    """

    name: str
    train: Volume
    test: list[Volume]
    num_classes: int
    candidates: list[int] | None = None

    def picks(self, count: int, seed: int) -> list[int]:
        """``count`` axial indices of ``train`` drawn with ``seed`` among the candidates."""
        pool = self.candidates
        if pool is None:
            pool = [int(z) for z in torch.nonzero(self.train.label.flatten(0, 1).any(0)).flatten()]
        return sorted(np.random.default_rng(seed).choice(pool, size=count, replace=False).tolist())

    def labelled(self, count: int, seed: int) -> Volume:
        """``count`` axial slices of ``train`` drawn with ``seed``, as a thin volume."""
        picks = self.picks(count, seed)
        image, label = self.train.image[..., picks], self.train.label[..., picks]
        return Volume(f"{self.train.name}[{picks}]", image, label)


def brain_extraction_task(workdir: str | Path, pixdim: float = 2.0) -> SliceTask:
    """Brain extraction from an unstripped T1 head: labelled slices of Colin27 (mask: its skull-stripped
    version), tested on the whole ITK subject (mask: its skull-strip map), both resampled to ``pixdim`` mm."""
    from jointssl_monai.apps.sample_datalists import brain_extraction_datalist

    spacing = (pixdim,) * 3
    volumes = []
    for split in ("train", "test"):
        item = brain_extraction_datalist(split, Path(workdir) / "labels")[0]
        volumes.append(
            load_volume({"image": [item["image"]], "label": item["label"], "name": split}, spacing)
        )
    return SliceTask("brain extraction (ITK subject)", volumes[0], [volumes[1]], num_classes=2)


#: AAL region names (``aal.nii.txt``) by lobe; regions of no lobe (insula, cingulum, deep grey matter,
#: hippocampus, amygdala) form one more class.
LOBE_PREFIXES = {
    "frontal": ("Precentral", "Frontal", "Rolandic", "Supp_Motor", "Olfactory", "Rectus", "Paracentral"),
    "parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus"),
    "temporal": ("Temporal", "Heschl", "Fusiform"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital"),
    "cerebellum": ("Cerebelum", "Vermis"),
}


def aal_lobes(table: str | Path) -> dict[int, int]:
    """AAL voxel value (the first column of ``aal.nii.txt``) -> lobe class: 1..5 in :data:`LOBE_PREFIXES`
    order, 6 for the regions of no lobe."""
    classes = {}
    for line in Path(table).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            lobe = next((i for i, p in enumerate(LOBE_PREFIXES.values(), 1) if parts[1].startswith(p)), 6)
            classes[int(parts[0])] = lobe
    return classes


def lobes_task(pixdim: float = 2.0, slab: int = 8) -> SliceTask:
    """AAL regions grouped into 6 lobes on Colin27: labelled slices from even slabs of ``slab`` axial slices,
    tested on the odd slabs stacked into one volume (the image was seen unlabelled in pretraining; the labels
    never were)."""
    aal = find_sample("colin27_aal")
    item = {"image": [str(find_sample("colin27_t1"))], "label": str(aal), "name": "colin27"}
    lobes = aal_lobes(aal.with_name("aal.nii.txt"))
    volume = load_volume(item, (pixdim,) * 3, label_values=sorted(lobes))  # region i -> class i + 1
    label = torch.zeros_like(volume.label)
    for index, value in enumerate(sorted(lobes), start=1):
        label[volume.label == index] = lobes[value]
    depth = label.shape[-1]
    labelled = label.flatten(0, 1).any(0)
    even = [z for z in range(depth) if (z // slab) % 2 == 0 and bool(labelled[z])]
    odd = [z for z in range(depth) if (z // slab) % 2 == 1 and bool(labelled[z])]
    train = Volume("colin27", volume.image, label)
    test = Volume("colin27 odd slabs", volume.image[..., odd], label[..., odd])
    return SliceTask("AAL lobes (Colin27 held-out slabs)", train, [test], num_classes=7, candidates=even)


# --- pretraining ---


_EPOCH_TIME = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):(\d+(?:\.\d+)?)")


def _run_bundle(root: Path, settings: dict[str, Any], extra: Sequence[Path] = ()) -> str:
    configs = [find_bundle_dir() / "configs" / "pretrain.json", *extra]
    command = pretrain_command(configs, {**settings, "bundle_root": str(root)})
    root.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    (root / "bundle.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"pretraining failed (exit {result.returncode}); see {root / 'bundle.log'}")
    return result.stdout + result.stderr


def calibrated_epochs(root: Path, settings: dict[str, Any], budget_s: float) -> tuple[int, float]:
    """Epochs that fit in ``budget_s``: two epochs are timed (Ignite's per-epoch times, the second one: the
    first also fills caches and banks), the rest of the budget is divided by it.

    Returns:
        ``(epochs, seconds per epoch)``.
    """
    start = time.perf_counter()
    log = _run_bundle(root, {**settings, "max_epochs": 2})
    wall = time.perf_counter() - start
    times = epoch_seconds(log)
    if len(times) < 2:
        raise RuntimeError(f"no epoch times in {root / 'bundle.log'}")
    return epochs_within_budget(times, wall, budget_s), times[-1]


def epoch_seconds(log: str) -> list[float]:
    """The per-epoch times Ignite logs (``Epoch[1] Complete. Time taken: 00:00:23.456``), in seconds."""
    return [int(h) * 3600 + int(m) * 60 + float(s) for _, h, m, s in _EPOCH_TIME.findall(log)]


def epochs_within_budget(times: Sequence[float], wall: float, budget_s: float) -> int:
    """Epochs of a run that fit in ``budget_s``, from a calibration run's epoch ``times`` and ``wall`` time:
    the start-up (``wall - sum(times)``) and the first epoch (which also fills caches and memory banks) as
    measured, every further epoch as long as the last one; at least 2."""
    startup = max(0.0, wall - sum(times))
    return max(2, 1 + int((budget_s - startup - times[0]) // times[-1]))


def pretrain_encoder(
    root: str | Path, datalist: Path, budget_s: float, settings: dict[str, Any], seed: int = 0
) -> dict[str, Any]:
    """Pretrain with the bundle for about ``budget_s`` seconds (schedule sized by :func:`calibrated_epochs`,
    Ignite's ``TimeLimit`` as a guard); returns where the encoder is and what the run did."""
    root = Path(root)
    base = {**settings, "datalist": str(datalist), "seed": seed}
    epochs, per_epoch = calibrated_epochs(root / "calibration", base, budget_s)
    extra = root / "time_limit.json"
    extra.write_text(json.dumps({
        "+imports": ["$import ignite"],
        "run": ["$@train#trainer.attach_handlers(@train#run_handlers)",
                f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED, "
                f"ignite.handlers.TimeLimit({int(budget_s * 1.2)}))",
                "$@train#trainer.run()"],
    }))  # fmt: skip
    start = time.perf_counter()
    log = _run_bundle(root, {**base, "max_epochs": epochs}, [extra])
    history = json.loads((root / "runs" / "pretrain" / "history.json").read_text())["epochs"]
    warnings = [line for line in log.splitlines() if "collapse suspected" in line]
    return {
        "encoder": str(root / "models" / "ssl" / "encoder.pt"),
        "epochs": len(history),
        "planned_epochs": epochs,
        "seconds_per_epoch": per_epoch,
        "seconds": time.perf_counter() - start,
        "history": history,
        "collapse_warnings": warnings,
    }


# --- evaluation ---


def _axial(volume: Volume, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = volume_slices(volume, 2)
    return fit_slices(images, size, "bilinear"), fit_slices(labels[:, None].float(), size, "nearest")[
        :, 0
    ].long()


def evaluation_device() -> torch.device:
    """Where the benchmark's networks run: the first CUDA GPU when there is one, else the CPU."""
    return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")


def _device_of(module: torch.nn.Module) -> torch.device:
    return next((p.device for p in module.parameters()), torch.device("cpu"))


def frozen_encoder(
    backbone: str, encoder: str | Path | None, seed: int, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """The 2D ``FlexibleUNet`` encoder (MONAI ``ResNetFeatures``) with the SSL weights or a seeded random
    initialisation (drawn on the CPU, so the same seed gives the same weights on every device), frozen in eval
    mode on ``device``."""
    torch.manual_seed(seed)
    net = FlexibleUNet(1, 2, backbone=backbone, spatial_dims=2, pretrained=False)
    if encoder is not None:
        load_pretrained_encoder(net, encoder)
    return net.encoder.eval().requires_grad_(False).to(device)


@torch.no_grad()
def hypercolumns(encoder: torch.nn.Module, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Every stage's features upsampled to the slice size and stacked: ``(N, C_total, H, W)``, on the CPU."""
    out = []
    for start in range(0, len(images), batch):
        x = images[start : start + batch].to(_device_of(encoder))
        maps = [m for m in encoder(x) if m.ndim == 4 and m.shape[1] > 0]
        stacked = torch.cat([F.interpolate(m, size=x.shape[-2:], mode="bilinear") for m in maps], dim=1)
        out.append(stacked.float().cpu())
    return torch.cat(out)


class ProbeFeatures:
    """The frozen hypercolumns of a task's training volume (every axial slice) and test volumes, computed
    once per encoder so that every probe (label count, seed) only trains its 1x1 head.

    Args:
        task: the task.
        encoder: a frozen encoder (:func:`frozen_encoder`).
        size: slices are resized to ``size x size``.
    """

    def __init__(self, task: SliceTask, encoder: torch.nn.Module, size: int) -> None:
        self.task = task
        images, self.train_labels = _axial(task.train, size)
        self.train = hypercolumns(encoder, images).half()  # half: a 128-slice volume is 1 GB, not 2
        self.test = []
        for volume in task.test:
            test_images, test_labels = _axial(volume, size)
            self.test.append((hypercolumns(encoder, test_images).half(), test_labels))


def linear_probe(features: ProbeFeatures, count: int, seed: int, steps: int = 300) -> float:
    """3D Dice of a 1x1-convolution head trained on the frozen hypercolumns of ``count`` labelled slices
    (drawn with ``seed``), over the task's test volumes."""
    task = features.task
    picks = task.picks(count, seed)
    x, labels = features.train[picks].float(), features.train_labels[picks]
    mean, std = x.mean((0, 2, 3), keepdim=True), x.std((0, 2, 3), keepdim=True) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(seed)
    head = torch.nn.Conv2d(x.shape[1], task.num_classes, 1)
    # a lightly L2-regularised logistic regression per pixel, the usual linear probe
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(head(x), labels).backward()
        optimizer.step()
    scores = []
    with torch.no_grad():
        for test, test_labels in features.test:
            pred = torch.cat([head((chunk.float() - mean) / std).argmax(1) for chunk in test.split(16)])
            scores.append(dice_3d(pred, test_labels, task.num_classes))
    return float(np.mean(scores))


def intensity_rule(task: SliceTask, count: int, seed: int, size: int, bins: int = 64) -> float:
    """The trivial baseline: each intensity bin takes the majority class of the labelled slices' voxels in
    it (for two classes, the best threshold band), applied to the test volumes; 3D Dice."""
    images, labels = _axial(task.labelled(count, seed), size)
    index = (images[:, 0].clamp(0, 1) * (bins - 1)).round().long()
    votes = torch.zeros(bins, task.num_classes)
    votes.index_put_((index.flatten(), labels.flatten()), torch.ones(index.numel()), accumulate=True)
    rule = votes.argmax(1)
    scores = []
    for volume in task.test:
        test_images, test_labels = _axial(volume, size)
        pred = rule[(test_images[:, 0].clamp(0, 1) * (bins - 1)).round().long()]
        scores.append(dice_3d(pred, test_labels, task.num_classes))
    return float(np.mean(scores))


def _brain_positions(volume: Volume) -> tuple[list[int], np.ndarray]:
    """Axial indices inside the brain (label > 0) and their position from its bottom (0) to its top (1)."""
    inside = [int(z) for z in torch.nonzero(volume.label.flatten(0, 1).any(0)).flatten()]
    low, high = inside[0], inside[-1]
    return inside, (np.asarray(inside, dtype=float) - low) / max(1, high - low)


@torch.no_grad()
def position_retrieval(
    reference: Volume, query: Volume, embed: Callable[[torch.Tensor], torch.Tensor], size: int
) -> float:
    """Nearest-neighbour retrieval of slices by anatomical position: each query slice inside the brain
    takes the position of its nearest reference slice (cosine); the score is ``1 - mean |error|``, positions
    normalised to the brain's height in each subject."""
    embeddings, positions = [], []
    for volume in (reference, query):
        inside, position = _brain_positions(volume)
        images, _ = _axial(Volume(volume.name, volume.image[..., inside], volume.label[..., inside]), size)
        embeddings.append(F.normalize(embed(images), dim=1))
        positions.append(position)
    nearest = (embeddings[1] @ embeddings[0].t()).argmax(1).numpy()
    return float(1.0 - np.abs(positions[0][nearest] - positions[1]).mean())


def pooled_embedding(encoder: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Slice embedding for retrieval: the deepest feature map, averaged over space."""
    return lambda images: encoder(images.to(_device_of(encoder)))[-1].mean((2, 3)).float().cpu()


def pixel_embedding(images: torch.Tensor) -> torch.Tensor:
    """The trivial retrieval baseline: the slice itself at 16 x 16, centred."""
    small = F.adaptive_avg_pool2d(images, 16).flatten(1)
    return small - small.mean(1, keepdim=True)


def finetune_dice(
    task: SliceTask, backbone: str, encoder: str | Path | None, count: int, seed: int, size: int,
    max_steps: int = 3000, window: int = 100, min_delta: float = 0.01, device: str | torch.device = "cpu",
) -> dict[str, float]:  # fmt: skip
    """A 2D ``FlexibleUNet`` fine-tuned to convergence (:class:`~jointssl_monai.apps.slicewise.LossPlateau`:
    two windows of ``window`` steps in a row improving the training loss by less than ``min_delta``) on
    ``count`` labelled slices, scored by 3D Dice on the task's test volumes.

    Returns:
        ``score`` (mean 3D Dice), ``steps`` run, ``final_loss`` (mean training loss of the last window) and
        ``converged`` (1.0 if the rule stopped training before ``max_steps``, else 0.0).
    """
    losses: list[float] = []
    net, _ = finetune_slicewise(
        [task.labelled(count, seed)], num_classes=task.num_classes, backbone=backbone, encoder=encoder,
        steps=max_steps, batch_size=8, image_size=size, seed=seed, converge_window=window,
        min_delta=min_delta, loss_history=losses, device=device,
    )  # fmt: skip
    scores = [dice_3d(predict_volume(net, v, image_size=size), v.label, task.num_classes) for v in task.test]
    return {
        "score": float(np.mean(scores)),
        "steps": len(losses),
        "final_loss": float(np.mean(losses[-window:])),
        "converged": float(len(losses) < max_steps),
    }
