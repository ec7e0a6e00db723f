"""``pretrain.json`` lists its pretraining transforms (``train#deterministic_transforms`` and
``train#random_transforms``, MONAI bundle style); they must compute what the Python factory
``build_pretrain_dataset`` builds from the same settings, and the disk cache must tell them apart by what they
compute."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser

from jointssl_monai.apps.bundle_commands import find_bundle_dir
from jointssl_monai.data import SampleKey, build_pretrain_dataset, pretrain_transform_lists, transforms_digest


@pytest.mark.parametrize("policy", ["center", "random", "random_stride"])
def test_the_bundle_lists_the_transforms_the_python_factory_builds(
    policy, tmp_path, itk_t1, itk_pd_slice_png
):
    entries = [{"image": str(itk_t1), "dims": 3, "modality": "MR"},
               {"image": str(itk_pd_slice_png), "dims": 2, "modality": "MR"}]  # fmt: skip
    (tmp_path / "datalist.json").write_text(json.dumps({"training": entries}))
    parser = ConfigParser()
    parser.read_config(str(find_bundle_dir() / "configs" / "pretrain.json"))
    settings = {"datalist": str(tmp_path / "datalist.json"), "bundle_root": str(tmp_path), "num_slices": 6,
                "spatial_size": [24, 24], "slice_policy": policy, "seed": 4}  # fmt: skip
    for key, value in settings.items():
        parser[key] = value
    listed = parser.get_parsed_content("train#dataset")
    built = build_pretrain_dataset(entries, num_slices=6, spatial_size=(24, 24), slice_policy=policy, seed=4)
    for index in (0, 1):
        key = SampleKey(index, seed=100 + index)
        for a, b in zip(listed[key]["views"], built[key]["views"], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    deterministic, _ = pretrain_transform_lists(6, (24, 24), slice_policy=policy)
    assert transforms_digest(
        parser.get_parsed_content("train#deterministic_transforms")
    ) == transforms_digest(deterministic)


def test_the_cache_digest_follows_every_deterministic_setting():
    def digest(**settings) -> str:
        return transforms_digest(pretrain_transform_lists(8, (32, 32), **settings)[0])

    base = digest()
    assert digest() == base  # stable across builds
    changes = [{"percentiles": (1.0, 99.0)}, {"ct_window": (-500.0, 500.0)}, {"axcodes": "LPS"},
               {"pixdim": (2.0, 2.0, 2.0)}, {"in_plane_mode": "crop_pad"}, {"slice_axis": 0}]  # fmt: skip
    for changed in changes:
        assert digest(**changed) != base, changed
    assert digest(image_scale=(0.5, 1.0), view_policy="compose") == base  # the random part is not cached
    assert transforms_digest(pretrain_transform_lists(8, (32, 32))[0], skip_bad_inputs=True) != base
