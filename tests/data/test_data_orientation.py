"""One in-plane orientation from pretraining to fine-tuning (design decision 7), on real images.

The pretraining pipeline must hand the slice encoder every plane in the axis order and direction in which the
fine-tuning pipelines hand it to the segmentation network: MONAI's reader order (``LoadImage`` +
``EnsureChannelFirst``), oriented like ``bundle/configs/train.json`` (RAS) for volumes, and as read for 2D
images. A transposed plane shows the anatomy rotated by 90 degrees and mirrored, which a 2D filter does not
recognise; the numbers below show how far apart the two are on a real brain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from monai.bundle import ConfigParser
from monai.transforms import Compose, LoadImage, Resize

from jointssl_monai.apps.slicewise import load_volume, volume_slices
from jointssl_monai.data import build_pretrain_dataset, build_pretrain_transforms

TRAIN_CONFIG = Path(__file__).resolve().parents[2] / "bundle" / "configs" / "train.json"
#: coarser than the file (1 mm), finer than the bundle default (3 mm) so that SpatialPadd (64^3) pads nothing
PIXDIM = (2.0, 2.0, 2.0)
SIZE = (96, 96)  # the same in-plane resize on both sides (square, so that a transpose can be compared)


def _corr(a, b) -> float:
    """Pearson correlation: equal up to an intensity scaling and offset gives 1."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


@pytest.fixture(scope="module")
def colin27_both_ways(tmp_path_factory, colin27_t1, colin27_brain):
    """Colin27 T1 through train.json's deterministic transforms and through the pretraining pipeline."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN_CONFIG))
    parser["pixdim"] = list(PIXDIM)
    parser["bundle_root"] = str(TRAIN_CONFIG.parents[1])  # the bundle's shared settings (configs/common.json)
    parser["dataset_dir"] = str(tmp_path_factory.mktemp("labels"))
    (item,) = parser.get_parsed_content("train#dataset#data")  # Colin27 T1 and its brain mask
    assert Path(item["image"]) == Path(colin27_t1)
    finetune = Compose(parser.get_parsed_content("train#deterministic_transforms"))(item)
    volume = finetune["image"]  # (1, X, Y, Z), RAS
    depth = volume.shape[-1]
    deterministic, _ = build_pretrain_transforms(num_slices=depth, spatial_size=SIZE, pixdim=PIXDIM)
    pretrain = deterministic({"image": item["image"], "dims": 3, "modality": "MR"})
    return {"item": item, "finetune": volume, "pretrain": pretrain}


def test_pretraining_slices_are_the_finetuning_slices(colin27_both_ways):
    volume = colin27_both_ways["finetune"]
    pretrain = colin27_both_ways["pretrain"]
    assert tuple(volume.shape) == (1, 91, 109, 91)  # no padding: the planes are the same voxels
    assert pretrain["num_slices"] == volume.shape[-1]  # every axial slice, in order
    slices = np.asarray(pretrain["image"])  # (1, S, 96, 96)
    # train.json's axial planes, (X, Y) in MONAI's order, through the same resize as the pretraining slices
    expected = np.asarray(Resize((-1, *SIZE), mode="area")(volume.as_tensor().movedim(-1, 1)))
    assert slices.shape == expected.shape == (1, 91, *SIZE)
    same = _corr(slices, expected)
    transposed = _corr(slices.swapaxes(-1, -2), expected)
    mirrored_x = _corr(slices[..., ::-1, :], expected)  # a left-right mirror (LPS instead of RAS)
    mirrored_y = _corr(slices[..., :, ::-1], expected)  # an anterior-posterior mirror
    # measured: same 0.9998 (only the percentile window differs: 0.5-99.5 here, 1-99 in train.json),
    # transposed 0.746, mirrored left-right 0.944 (a brain is nearly symmetric), front-back 0.744
    assert same > 0.999, same
    assert transposed < 0.85, transposed
    assert mirrored_x < 0.99 and mirrored_y < 0.9, (mirrored_x, mirrored_y)
    middle = slices.shape[1] // 2  # one slice alone: 0.99999 against 0.85 for its transpose
    assert _corr(slices[0, middle], expected[0, middle]) > 0.999
    assert _corr(slices[0, middle].T, expected[0, middle]) < 0.9


def test_slicewise_protocol_slices_are_the_train_config_planes(colin27_both_ways):
    item, volume = colin27_both_ways["item"], colin27_both_ways["finetune"]
    case = load_volume({"image": [item["image"]], "label": item["label"], "name": "colin27"}, pixdim=PIXDIM)
    images, _ = volume_slices(case, 2)  # (S, C, X, Y): what the 2D U-Net of the protocol is trained on
    # the protocol reads, orients and scales like train.json: the same planes, the same axis order
    np.testing.assert_allclose(images[:, 0].movedim(0, -1).numpy(), np.asarray(volume[0]), atol=1e-5)
    slices = np.asarray(colin27_both_ways["pretrain"]["image"])
    protocol = np.asarray(Resize((-1, *SIZE), mode="area")(images[:, 0][None]))
    assert _corr(slices, protocol) > 0.999
    assert _corr(slices.swapaxes(-1, -2), protocol) < 0.85


def test_png_and_volume_slice_share_monai_reader_order(colin27_t1, itk_pd_slice_png):
    # a 2D picture in the pretraining pipeline: exactly what LoadImage + EnsureChannelFirst give fine-tuning
    deterministic, _ = build_pretrain_transforms(
        num_slices=181, spatial_size=(181, 217), in_plane_mode="crop_pad"
    )
    image = deterministic({"image": str(itk_pd_slice_png), "dims": 2, "modality": "MR"})["image"]
    reference = LoadImage(image_only=True, ensure_channel_first=True)(str(itk_pd_slice_png))
    assert tuple(image.shape) == tuple(reference.shape) == (1, 181, 217)  # (columns, rows)
    assert _corr(image, reference) > 0.9999
    # the picture is a BrainWeb slice, whose phantom is built on Colin27's 181 x 217 x 181 grid: it comes out
    # with the same axes as Colin27's axial slices (181 left-right, 217 front-back) and resembles one of them
    volume = deterministic({"image": str(colin27_t1), "dims": 3, "modality": "MR"})["image"][0]
    assert tuple(volume.shape) == (181, 181, 217)  # (slices, X, Y)
    pd = image[0].numpy()
    best = max(range(30, 150, 2), key=lambda z: _corr(pd, volume[z]))  # slices with some head in them
    # measured: 0.82 at slice 88 (PD against T1 contrast); its transpose cannot even be laid over it
    assert _corr(pd, volume[best]) > 0.75


def test_disk_cache_is_not_read_back_across_layouts_or_settings(tmp_path, itk_t1, monkeypatch):
    # a disk cache written before the orientation change holds transposed slices under the same item hash:
    # the cache names carry the layout version and the deterministic settings, so it is never reused
    entry = [{"image": str(itk_t1), "dims": 3, "modality": "MR"}]

    def cache_files(**kwargs) -> set:
        before = set(tmp_path.glob("*.pt"))
        dataset = build_pretrain_dataset(entry, num_slices=4, spatial_size=(16, 16), cache="disk",
                                         cache_dir=tmp_path, **kwargs)  # fmt: skip
        assert dataset[0]["views"][0].shape == (1, 4, 16, 16)
        return set(tmp_path.glob("*.pt")) - before

    first = cache_files()
    assert len(first) == 1
    assert cache_files() == set()  # same settings: read back
    assert cache_files(seed=3, view_policy="compose") == set()  # random-part settings: still read back
    assert len(cache_files(axcodes="LPS")) == 1  # another orientation: a new entry
    monkeypatch.setattr("jointssl_monai.data.dataset.CACHE_LAYOUT_VERSION", 1)
    assert len(cache_files()) == 1  # an older layout: a new entry
