"""The authors' slice-wise protocol: metrics, data layouts (BraTS, MMWHS, datalist) built from real crops,
slice stacking, and a tiny end-to-end trial with a pretrained encoder adapted to two input channels."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import ResNetFeatures

from jointssl_monai.apps.slicewise import (
    MMWHS_LABELS,
    Volume,
    dice_3d,
    find_cases,
    iou_3d,
    predict_volume,
    protocol_volumes,
    run_trials,
)


def test_iou_and_dice_over_stacked_slices():
    label = torch.zeros(4, 4, 4, dtype=torch.long)
    label[:2, :2, :] = 1  # 16 voxels
    pred = torch.zeros_like(label)
    pred[:2, :2, :2] = 1  # 8 voxels, all inside
    assert iou_3d(pred, label, 2) == pytest.approx(0.5)
    assert dice_3d(pred, label, 2) == pytest.approx(2 * 8 / 24)
    # two classes: class 2 perfect, class 1 as above -> mean; a class absent from both is not scored
    label[3, 3, 3], pred[3, 3, 3] = 2, 2
    assert iou_3d(pred, label, 4) == pytest.approx((0.5 + 1.0) / 2)


class _Threshold(torch.nn.Module):
    """A 'network' whose prediction is image > 0.5, to check slicing and stacking."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(x[:, :1]), x[:, :1] - 0.5], 1)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_predict_volume_stacks_slices_back_in_place(axis):
    image = torch.rand(1, 16, 16, 16)
    volume = Volume("v", image, (image[0] > 0.5).long())
    pred = predict_volume(_Threshold(), volume, image_size=16, slice_axis=axis, batch_size=5)
    assert pred.shape == volume.label.shape
    assert iou_3d(pred, volume.label, 2) == 1.0


def _save(array: np.ndarray, affine: np.ndarray, path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))


@pytest.fixture(scope="module")
def real_crop(itk_t1, itk_t1_skullstrip):
    """A 40 x 40 x 12 crop of the real ITK subject across the brain edge, with its brain mask."""
    t1, ss = nib.load(str(itk_t1)), nib.load(str(itk_t1_skullstrip))
    box = (slice(44, 84), slice(44, 84), slice(25, 37))
    image = np.asarray(t1.dataobj)[box].astype(np.float32)
    mask = (np.asarray(ss.dataobj)[box] > 0).astype(np.uint8)
    assert 0 < mask.mean() < 1
    return image, mask, t1.affine


def test_brats_layout_multimodal(tmp_path, real_crop):
    image, mask, affine = real_crop
    for case in ("BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"):
        folder = tmp_path / case
        _save(image, affine, folder / f"{case}_flair.nii.gz")
        _save(image.max() - image, affine, folder / f"{case}_t1.nii.gz")
        _save(mask * 2, affine, folder / f"{case}_seg.nii.gz")  # BraTS labels 1, 2, 4: whole tumour = > 0
    (tmp_path / "BraTS2021_00004").mkdir()  # incomplete case: ignored
    cases = find_cases(tmp_path, modalities=["flair", "t1"])["all"]
    assert [c["name"] for c in cases] == ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"]
    train, test, num_classes = protocol_volumes(tmp_path, modalities=["flair", "t1"], test_fraction=0.34)
    assert (len(train), len(test), num_classes) == (2, 1, 2)
    assert train[0].image.shape[0] == 2 and train[0].image.min() >= 0 and train[0].image.max() <= 1
    assert int(train[0].label.sum()) == int(mask.sum())


def test_mmwhs_layout_maps_label_values(tmp_path, real_crop):
    image, mask, affine = real_crop
    label = np.where(mask > 0, np.where(image > np.median(image[mask > 0]), 205, 500), 0).astype(np.int16)
    for i in (1001, 1002):
        _save(image, affine, tmp_path / "ct_train" / f"ct_train_{i}_image.nii.gz")
        _save(label, affine, tmp_path / "ct_train" / f"ct_train_{i}_label.nii.gz")
    train, _, num_classes = protocol_volumes(tmp_path)
    assert num_classes == len(MMWHS_LABELS) + 1
    volume = train[0]
    assert set(volume.label.unique().tolist()) == {
        0,
        MMWHS_LABELS.index(205) + 1,
        MMWHS_LABELS.index(500) + 1,
    }
    with pytest.raises(FileNotFoundError, match="no brats case"):
        find_cases(tmp_path / "ct_train", layout="brats")


def test_datalist_and_two_channel_trial_with_pretrained_encoder(tmp_path, real_crop):
    image, mask, affine = real_crop
    _save(image, affine, tmp_path / "imgs" / "a.nii.gz")
    _save(mask, affine, tmp_path / "labels" / "a.nii.gz")
    datalist = {
        "training": [{"image": ["imgs/a.nii.gz", "imgs/a.nii.gz"], "label": "labels/a.nii.gz"}],
        "test": [
            {"image": ["imgs/a.nii.gz", "imgs/a.nii.gz"], "label": "labels/a.nii.gz", "name": "held_out"}
        ],
    }
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    train, test, num_classes = protocol_volumes(tmp_path / "datalist.json")
    encoder = tmp_path / "encoder.pt"
    torch.save(ResNetFeatures("resnet10", pretrained=False, spatial_dims=2).state_dict(), encoder)
    result = run_trials(
        train, test, num_classes=num_classes, seeds=[0, 1], encoder=encoder, backbone="resnet10",
        steps=2, batch_size=2, image_size=32,
    )  # fmt: skip
    assert "first conv" in result["encoder_report"] and "loaded 72 of 72" in result["encoder_report"]
    assert [t["seed"] for t in result["trials"]] == [0, 1]
    assert list(result["trials"][0]["per_case"]) == ["held_out"]
    ious = [t["iou"] for t in result["trials"]]
    assert result["iou_mean"] == pytest.approx(np.mean(ious)) and result["iou_std"] == pytest.approx(
        np.std(ious)
    )


def test_finetuning_stops_once_the_training_loss_stops_falling(real_crop):
    """With a convergence window, training ends before the step cap once two windows in a row improve less
    than the threshold; without it, every step runs."""
    from jointssl_monai.apps.slicewise import finetune_slicewise

    image, mask, _ = real_crop
    volume = Volume("crop", torch.as_tensor(image / image.max())[None], torch.as_tensor(mask).long())
    kwargs = dict(num_classes=2, backbone="resnet10", batch_size=2, image_size=32, seed=0)
    fixed: list[float] = []
    finetune_slicewise([volume], steps=30, loss_history=fixed, **kwargs)
    assert len(fixed) == 30
    # an improvement no window can reach: stops after the third window, never before
    stopped: list[float] = []
    finetune_slicewise([volume], steps=30, converge_window=5, min_delta=10.0, loss_history=stopped, **kwargs)
    assert len(stopped) == 15
    assert stopped == fixed[:15]  # the same seeded run, cut short


def _steps_until_converged(window_means: list[float], window: int, min_delta: float, patience: int = 2):
    """Feed a loss that is constant within each window to a ``LossPlateau``; the step at which it stops."""
    from jointssl_monai.apps.slicewise import LossPlateau

    plateau, losses = LossPlateau(window, min_delta, patience), []
    for mean in window_means:
        for _ in range(window):
            if plateau.converged(losses):
                return len(losses)
            losses.append(mean)
    return len(losses) if plateau.converged(losses) else None


def test_loss_plateau_fires_on_a_geometrically_vanishing_loss():
    """A loss that falls by the same fraction each window (what few labelled slices give) has converged once
    two windows in a row gain less than ``min_delta``: here the 4th (0.0375 -> 0.0094 -> 0.0023, a gain of
    0.007) and the 5th (0.0018); a relative rule would never stop it."""
    means = [0.15 * 0.25**k for k in range(8)]
    assert _steps_until_converged(means, window=10, min_delta=0.01) == 50
    assert _steps_until_converged(means, window=10, min_delta=0.01, patience=1) == 40
    assert (
        _steps_until_converged(means, window=10, min_delta=0.001) == 70
    )  # gains 0.0018, then 0.0004, 0.0001


def test_loss_plateau_waits_while_the_loss_still_falls_and_restarts_its_count_after_a_gain():
    """A loss falling by 0.02 a window never converges at ``min_delta`` 0.01; one stalled window followed by a
    real gain starts the count again."""
    assert _steps_until_converged([1.0 - 0.02 * k for k in range(20)], window=5, min_delta=0.01) is None
    # windows: 1.0, 0.995 (stalled), 0.9 (gain: count back to 0), 0.899 (stalled), 0.898 (stalled: stop)
    assert _steps_until_converged([1.0, 0.995, 0.9, 0.899, 0.898, 0.5], window=5, min_delta=0.01) == 25


@pytest.mark.parametrize(
    "kwargs, name",
    [({"window": 0}, "window"), ({"patience": 0}, "patience"), ({"min_delta": -0.1}, "min_delta")],
)
def test_loss_plateau_refuses_settings_that_cannot_work(kwargs, name):
    from jointssl_monai.apps.slicewise import LossPlateau

    settings = {"window": 1, "min_delta": 0.0, "patience": 1, **kwargs}
    with pytest.raises(ValueError, match=f"{name}={settings[name]}"):
        LossPlateau(**settings)
    LossPlateau(window=1, min_delta=0.0, patience=1)  # the smallest allowed values build
