"""The authors' downstream protocol: a 2D U-Net on slices, scored by 3D IoU over the stacked slices.

Nguyen et al. (AAAI 2023, arXiv:2212.01893) evaluate the pretrained ResNet-50 slice encoder as the encoder of
a 2D U-Net trained on the slices of 3D volumes (BraTS, MMWHS-CT, MMWHS-MRI); predictions are stacked back into
a volume and scored by the 3D IoU of each foreground class; each setting is repeated over several trials and
reported as mean and standard deviation. Here the 2D U-Net is MONAI's ``FlexibleUNet(spatial_dims=2)`` whose
encoder receives the exported slice encoder through :func:`jointssl_monai.transfer.load_pretrained_encoder`.

Data layouts accepted unchanged (:func:`find_cases`):

- BraTS (2018-2021): ``<root>/<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz``; the label defaults to the whole
  tumour (``seg > 0``); ``modalities`` picks the input channels (several give a multi-channel input; the
  encoder's first convolution is adapted).
- MMWHS: ``<root>/{ct,mr}_train/{ct,mr}_train_<id>_{image,label}.nii.gz``; the label values
  205, 420, 500, 550, 600, 820, 850 become the classes 1-7.
- A datalist JSON (MONAI/MSD style): ``{"training": [{"image": ..., "label": ...}], "test": [...]}``, paths
  relative to the JSON's folder or absolute; ``"image"`` may be a list of files (channels).
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.networks.nets import FlexibleUNet
from monai.transforms import LoadImage, Orientation, ScaleIntensityRangePercentiles, Spacing

from jointssl_monai.apps.sample_datalists import brain_extraction_datalist
from jointssl_monai.transfer.loading import EncoderLoadReport, load_pretrained_encoder

__all__ = [
    "MMWHS_LABELS",
    "LossPlateau",
    "Volume",
    "dice_3d",
    "find_cases",
    "finetune_slicewise",
    "fit_slices",
    "iou_3d",
    "load_volume",
    "predict_volume",
    "protocol_volumes",
    "run_trials",
    "volume_slices",
]

logger = logging.getLogger(__name__)

#: MMWHS label values (LV blood cavity, RV, LA, RA, LV myocardium, ascending aorta, pulmonary artery)
MMWHS_LABELS = (500, 600, 420, 550, 205, 820, 850)


@dataclass
class Volume:
    """One case in RAS orientation: ``image`` ``(C, X, Y, Z)`` in ``[0, 1]``, ``label`` ``(X, Y, Z)``
    (MONAI's axis order, as ``LoadImage`` + ``Orientation`` give it, the same as in pretraining)."""

    name: str
    image: torch.Tensor
    label: torch.Tensor


def find_cases(
    root: str | Path, layout: str = "auto", modalities: Sequence[str] = ("flair",)
) -> dict[str, list]:
    """List the cases of a BraTS folder, an MMWHS folder or a datalist JSON.

    Returns:
        ``{"training": [...], "test": [...]}`` for a datalist JSON (``"validation"`` is accepted for
        ``"test"``), else ``{"all": [...]}`` to be split by the caller; items are
        ``{"image": [paths], "label": path, "name": str}``.

    Raises:
        FileNotFoundError: no case found, with what was expected.
    """
    root = Path(root)
    if layout == "auto":
        layout = (
            "datalist" if root.suffix == ".json" else ("mmwhs" if list(root.glob("*_train")) else "brats")
        )
    if layout == "datalist":
        spec = json.loads(root.read_text())
        out: dict[str, list] = {}
        for split, key in (("training", "training"), ("test", "test"), ("test", "validation")):
            if key in spec and split not in out:
                out[split] = [_datalist_item(item, root.parent, i) for i, item in enumerate(spec[key])]
        if "training" not in out or "test" not in out:
            raise FileNotFoundError(f"{root}: a datalist needs 'training' and 'test' (or 'validation') lists")
        return out
    if layout == "brats":
        cases = []
        for case in sorted(p for p in root.iterdir() if p.is_dir()):
            files = [case / f"{case.name}_{m}.nii.gz" for m in modalities]
            seg = case / f"{case.name}_seg.nii.gz"
            if seg.is_file() and all(f.is_file() for f in files):
                cases.append({"image": [str(f) for f in files], "label": str(seg), "name": case.name})
    elif layout == "mmwhs":
        cases = []
        for image in sorted(root.glob("*_train/*_image.nii*")):
            label = image.with_name(image.name.replace("_image", "_label"))
            if label.is_file():
                cases.append(
                    {"image": [str(image)], "label": str(label), "name": image.name.split("_image")[0]}
                )
    else:
        raise ValueError(f"unknown layout {layout!r}; use auto, brats, mmwhs or datalist")
    if not cases:
        expected = {
            "brats": "<case>/<case>_{" + ",".join(modalities) + ",seg}.nii.gz",
            "mmwhs": "{ct,mr}_train/*_image.nii.gz with *_label.nii.gz",
        }[layout]
        raise FileNotFoundError(f"no {layout} case under {root}: expected {expected}")
    return {"all": cases}


def _datalist_item(item: dict, base: Path, index: int) -> dict:
    images = item["image"] if isinstance(item["image"], list) else [item["image"]]
    resolve = lambda p: str(p if Path(p).is_absolute() else base / p)  # noqa: E731
    name = item.get("name") or re.sub(r"\.nii(\.gz)?$", "", Path(images[0]).name) or f"case{index}"
    return {"image": [resolve(p) for p in images], "label": resolve(item["label"]), "name": name}


def load_volume(
    item: dict, pixdim: Sequence[float] | None = None, label_values: Sequence[int] | None = None
) -> Volume:
    """Read one case: RAS orientation, optional resampling to ``pixdim``, intensities to [0, 1] per channel
    (1st-99th percentile), labels to consecutive classes (``label_values[i]`` -> ``i + 1``; default
    ``label > 0``)."""
    loader = LoadImage(image_only=True, ensure_channel_first=True)
    orient = Orientation(axcodes="RAS", labels=None)
    channels = []
    for path in item["image"]:
        image = orient(loader(path))
        if pixdim is not None:
            image = Spacing(pixdim=pixdim, mode="bilinear")(image)
        channels.append(ScaleIntensityRangePercentiles(1, 99, 0.0, 1.0, clip=True)(image.float()))
    label = orient(loader(item["label"]))
    if pixdim is not None:
        label = Spacing(pixdim=pixdim, mode="nearest")(label)
    raw = torch.as_tensor(np.asarray(label[0])).round().long()
    if label_values:
        classes = torch.zeros_like(raw)
        for index, value in enumerate(label_values, start=1):
            classes[raw == value] = index
    else:
        classes = (raw > 0).long()
    image = torch.cat([torch.as_tensor(np.asarray(c)) for c in channels]).float()
    if image.shape[1:] != classes.shape:
        raise ValueError(
            f"{item['name']}: image shape {tuple(image.shape[1:])} != label {tuple(classes.shape)}"
        )
    return Volume(item["name"], image, classes)


def fit_slices(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Resize a batch of slices ``(N, C, h, w)`` to ``size x size`` (the authors' fixed slice size)."""
    return F.interpolate(
        x, size=(size, size), mode=mode, **({"align_corners": False} if mode == "bilinear" else {})
    )


def volume_slices(volume: Volume, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A volume's image and label as slices along ``axis``: ``(S, C, h, w)`` and ``(S, h, w)``."""
    # (S, C, h, w): the in-plane axes stay in MONAI's order ((X, Y) for axial slices), as in pretraining
    image = volume.image.movedim(1 + axis, 1).transpose(0, 1)
    label = volume.label.movedim(axis, 0)  # (S, h, w)
    return image, label


class LossPlateau:
    """Convergence of a training loss: the mean loss of each window of ``window`` steps is compared with the
    best earlier window's; training has converged once ``patience`` windows in a row improved on it by less
    than ``min_delta``.

    The improvement is absolute, not relative: with a few labelled slices the training loss of a segmentation
    network falls towards zero geometrically (0.15, 0.04, 0.01, 0.003, ...), so every window improves on the
    last by the same large fraction and a relative rule never fires, while the Dice of the network no longer
    changes.

    Args:
        window: steps per window (>= 1).
        min_delta: improvement (in loss units) below which a window counts as stalled (>= 0).
        patience: stalled windows in a row that end training (>= 1).
    """

    def __init__(self, window: int, min_delta: float, patience: int = 2) -> None:
        if window < 1 or patience < 1 or min_delta < 0:
            raise ValueError(f"LossPlateau needs window >= 1, patience >= 1 and min_delta >= 0, got "
                             f"window={window}, patience={patience}, min_delta={min_delta}")  # fmt: skip
        self.window, self.min_delta, self.patience = window, min_delta, patience
        self.best, self.stalled, self.windows_seen = float("inf"), 0, 0

    def converged(self, losses: Sequence[float]) -> bool:
        """Call before every step with the losses so far; ``True`` once training has converged."""
        complete = len(losses) // self.window
        while self.windows_seen < complete:
            start = self.windows_seen * self.window
            mean = float(np.mean(losses[start : start + self.window]))
            self.stalled = self.stalled + 1 if mean > self.best - self.min_delta else 0
            self.best = min(self.best, mean)
            self.windows_seen += 1
        return self.stalled >= self.patience


def finetune_slicewise(
    train: Sequence[Volume],
    *,
    num_classes: int,
    backbone: str = "resnet50",
    encoder: str | Path | None = None,
    steps: int = 200,
    batch_size: int = 8,
    image_size: int = 128,
    learning_rate: float = 1e-3,
    slice_axis: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
    converge_window: int | None = None,
    min_delta: float = 0.01,
    loss_history: list[float] | None = None,
) -> tuple[FlexibleUNet, EncoderLoadReport | None]:
    """Train a 2D ``FlexibleUNet`` on random slices of ``train`` (half of them containing foreground).

    With ``converge_window``, training stops before ``steps`` once converged (:class:`LossPlateau`): when the
    mean training loss of two windows of ``converge_window`` steps in a row is less than ``min_delta`` below
    the best earlier window's.

    Args:
        train: training volumes.
        num_classes: output classes including background.
        backbone: ResNet of the encoder (must match the pretrained encoder).
        encoder: the exported SSL encoder (``models/ssl/encoder.pt``); ``None``: random initialisation.
        steps: optimisation steps; batch_size: slices per step; image_size: slices are resized to this square.
        learning_rate: Adam learning rate; slice_axis: spatial axis along which volumes are sliced (2: axial).
        seed: seeds the network initialisation and the slice sampling.
        device: where to train.
        converge_window: steps per window of the convergence test (``None``: always ``steps`` steps).
        min_delta: loss improvement per window (absolute, in loss units) below which a window counts as
            converged.
        loss_history: if given, every step's training loss is appended to it.

    Returns:
        the trained network (in eval mode) and the encoder load report (``None`` without ``encoder``).
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    in_channels = train[0].image.shape[0]
    net = FlexibleUNet(in_channels, num_classes, backbone=backbone, spatial_dims=2, pretrained=False)
    report = load_pretrained_encoder(net, encoder) if encoder is not None else None
    net = net.to(device).train()
    optimizer = torch.optim.Adam(net.parameters(), lr=learning_rate)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    pools = []
    for volume in train:
        images, labels = volume_slices(volume, slice_axis)
        fg = (labels.flatten(1) > 0).any(1)
        pools.append((images, labels, torch.nonzero(fg).flatten(), torch.arange(len(labels))))
    losses: list[float] = []
    plateau = LossPlateau(converge_window, min_delta) if converge_window else None
    for _ in range(steps):
        if plateau is not None and plateau.converged(losses):
            break
        xs, ys = [], []
        for _ in range(batch_size):
            images, labels, fg, every = pools[int(torch.randint(len(pools), (1,), generator=generator))]
            candidates = fg if len(fg) and torch.rand(1, generator=generator) < 0.5 else every
            i = int(candidates[torch.randint(len(candidates), (1,), generator=generator)])
            xs.append(images[i])
            ys.append(labels[i])
        x = fit_slices(torch.stack(xs), image_size, "bilinear")
        y = fit_slices(torch.stack(ys)[:, None].float(), image_size, "nearest")
        flip = torch.rand(len(x), generator=generator) < 0.5  # left-right flips (axis 0 of RAS slices)
        x[flip], y[flip] = x[flip].flip(2), y[flip].flip(2)
        gamma = torch.empty(len(x), 1, 1, 1).uniform_(0.7, 1.5, generator=generator)
        x = x.clamp_min(0) ** gamma
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    if loss_history is not None:
        loss_history.extend(losses)
    return net.eval(), report


@torch.no_grad()
def predict_volume(
    net: torch.nn.Module, volume: Volume, image_size: int = 128, slice_axis: int = 2, batch_size: int = 16
) -> torch.Tensor:
    """Segment every slice, resize back and stack: a label volume of ``volume.label``'s shape."""
    images, labels = volume_slices(volume, slice_axis)
    device = next(net.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        logits = net(fit_slices(images[start : start + batch_size], image_size, "bilinear").to(device))
        logits = F.interpolate(logits.float().cpu(), size=tuple(labels.shape[1:]), mode="bilinear")
        out.append(logits.argmax(1))
    return torch.cat(out).movedim(0, slice_axis)


def _per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int, dice: bool) -> float:
    scores = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        if not g.any() and not p.any():
            continue  # class absent from this case and correctly not predicted: not scored
        inter = (p & g).sum().item()
        denom = (p.sum() + g.sum()).item() if dice else (p | g).sum().item()
        scores.append((2 * inter if dice else inter) / denom)
    return float(np.mean(scores)) if scores else 1.0


def iou_3d(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """3D IoU over the stacked slices, averaged over foreground classes (the authors' metric)."""
    return _per_class(pred, label, num_classes, dice=False)


def dice_3d(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """3D Dice over the stacked slices, averaged over foreground classes."""
    return _per_class(pred, label, num_classes, dice=True)


def run_trials(
    train: Sequence[Volume],
    test: Sequence[Volume],
    *,
    num_classes: int,
    seeds: Sequence[int] = (0, 1, 2, 3, 4),
    encoder: str | Path | None = None,
    **finetune_kwargs,
) -> dict:
    """Fine-tune once per seed, score every test volume; mean and standard deviation over the trials.

    Returns:
        ``{"trials": [{"seed", "iou", "dice", "per_case": {...}, "seconds"}], "iou_mean", "iou_std",
        "dice_mean", "dice_std", "encoder_report"}`` (scores in [0, 1]; population std over trials).
    """
    trials, report = [], None
    for seed in seeds:
        start = time.perf_counter()
        net, report = finetune_slicewise(
            train, num_classes=num_classes, encoder=encoder, seed=seed, **finetune_kwargs
        )
        kwargs = {k: finetune_kwargs[k] for k in ("image_size", "slice_axis") if k in finetune_kwargs}
        per_case = {}
        for volume in test:
            pred = predict_volume(net, volume, **kwargs)
            per_case[volume.name] = {
                "iou": iou_3d(pred, volume.label, num_classes),
                "dice": dice_3d(pred, volume.label, num_classes),
            }
        trial = {
            "seed": seed,
            "iou": float(np.mean([c["iou"] for c in per_case.values()])),
            "dice": float(np.mean([c["dice"] for c in per_case.values()])),
            "per_case": per_case,
            "seconds": time.perf_counter() - start,
        }
        logger.info(f"trial seed={seed}: 3D IoU {trial['iou']:.4f}, Dice {trial['dice']:.4f}")
        trials.append(trial)
    ious, dices = [t["iou"] for t in trials], [t["dice"] for t in trials]
    return {
        "trials": trials,
        "iou_mean": float(np.mean(ious)),
        "iou_std": float(np.std(ious)),
        "dice_mean": float(np.mean(dices)),
        "dice_std": float(np.std(dices)),
        "encoder_report": report.summary() if report is not None else None,
    }


def protocol_volumes(
    data: str | Path,
    *,
    layout: str = "auto",
    modalities: Sequence[str] = ("flair",),
    label_values: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = None,
    test_fraction: float = 0.2,
    split_seed: int = 0,
    max_cases: int | None = None,
) -> tuple[list[Volume], list[Volume], int]:
    """Training volumes, test volumes and the number of classes (with background) for the protocol.

    ``data="sample"`` is the offline brain extraction: train on Colin27, test on the ITK subject, brain masks
    derived from ``ch2bet > 0`` and the skull-strip map ``> 0``, resampled to 2 mm unless ``pixdim`` is given.
    A folder is split once (``split_seed``) into training and test cases (``test_fraction``); a datalist JSON
    brings its own split. MMWHS folders default to the 7 MMWHS label values.
    """
    if str(data) == "sample":
        folder = Path(tempfile.gettempdir()) / "jointssl_monai_sample_labels"
        train_items, test_items = (
            [
                dict(item, image=[item["image"]], name=split)
                for item in brain_extraction_datalist(split, folder)
            ]
            for split in ("train", "test")
        )
        pixdim = pixdim or (2.0, 2.0, 2.0)
    else:
        cases = find_cases(data, layout, modalities)
        if "all" in cases:
            items = cases["all"][:max_cases] if max_cases else list(cases["all"])
            if len(items) < 2:
                raise ValueError(f"{data}: need at least 2 cases to split, found {len(items)}")
            random.Random(split_seed).shuffle(items)
            n_test = min(len(items) - 1, max(1, round(len(items) * test_fraction)))
            train_items, test_items = items[n_test:], items[:n_test]
        else:
            train_items, test_items = cases["training"], cases["test"]
        is_mmwhs = layout == "mmwhs" or (layout == "auto" and list(Path(data).glob("*_train")))
        if label_values is None and is_mmwhs:
            label_values = MMWHS_LABELS
    train = [load_volume(item, pixdim, label_values) for item in train_items]
    test = [load_volume(item, pixdim, label_values) for item in test_items]
    return train, test, (len(label_values) if label_values else 1) + 1
