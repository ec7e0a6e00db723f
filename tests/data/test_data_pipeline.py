"""Slice sequences, the two-view pairing contract, mixed batching and caching, on real volumes."""

from __future__ import annotations

import pickle

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Orientation

from jointssl_monai.data import (
    BadInputError,
    ImageViewsd,
    MixedBatchSampler,
    ResizeInPlaned,
    SampleKey,
    SliceSequenced,
    VolumeViewsd,
    build_pretrain_dataset,
    build_pretrain_loader,
    collate_joint_ssl,
    load_ssl_image,
)
from jointssl_monai.outputs import BATCH_KEYS


@pytest.fixture(scope="module")
def colin_small(tmp_path_factory, colin27_t1):
    """Colin27 T1 block-averaged to about 60^3, so the tests stay fast."""
    img = nib.load(colin27_t1)
    data = np.asarray(img.dataobj, dtype=np.float32)[:180, :216, :180]
    data = data.reshape(60, 3, 72, 3, 60, 3).mean(axis=(1, 3, 5))
    affine = img.affine.copy()
    affine[:3, :3] *= 3
    path = tmp_path_factory.mktemp("colin") / "colin27_small.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _volume(depth: int) -> torch.Tensor:
    # slice k holds the value k + 1 everywhere: the value identifies the source slice
    return torch.arange(1, depth + 1, dtype=torch.float32).view(1, 1, 1, depth).expand(1, 6, 5, depth).clone()


@pytest.mark.parametrize(
    ("policy", "depth", "expected"),
    [
        ("center", 12, [3, 4, 5, 6, 7, 8, 9, 10]),  # centre crop, as the authors
        ("stride", 15, [1, 3, 5, 7, 9, 11, 13, 15]),  # uniform stride over the whole volume
        ("center", 5, [1, 2, 3, 4, 5, 0, 0, 0]),  # shorter volume: zero padding at the end
    ],
)
def test_slice_policies(policy, depth, expected):
    out = SliceSequenced("image", num_slices=8, policy=policy)({"image": _volume(depth)})
    assert out["image"].shape == (1, 8, 6, 5)  # (C, S, H, W): H, W = the in-plane axes in MONAI's order
    assert out["image"][0, :, 0, 0].tolist() == expected
    assert out["num_slices"] == min(depth, 8)


def test_random_policy_is_a_contiguous_window_that_moves():
    t = SliceSequenced("image", num_slices=4, policy="random")
    t.set_random_state(seed=1)
    starts = set()
    for _ in range(30):
        picked = t({"image": _volume(20)})["image"][0, :, 0, 0]
        assert torch.equal(torch.diff(picked), torch.ones(3))
        starts.add(int(picked[0]))
    assert len(starts) > 5 and min(starts) >= 1 and max(starts) <= 17


def test_random_stride_policy_spreads_a_moving_comb_over_the_volume():
    t = SliceSequenced("image", num_slices=4, policy="random_stride")
    t.set_random_state(seed=1)
    seen = set()
    for _ in range(40):
        picked = [int(v) - 1 for v in t({"image": _volume(22)})["image"][0, :, 0, 0]]  # 0-based slices
        gaps = np.diff(picked)
        assert len(picked) == 4 and all(5 <= g <= 6 for g in gaps), picked  # stride 22 / 4 = 5.5
        assert picked[0] <= 5 and picked[-1] >= 16  # the comb spans the whole volume
        seen.update(picked)
    assert len(seen) == 22  # every slice is drawn over the epochs


def test_axial_slices_of_a_ct_series_are_its_2d_dicom_files_in_monai_order(pydicom_ct_series):
    files = sorted(
        pydicom_ct_series.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2])
    )
    volume = load_ssl_image([str(f) for f in files], dims=3)
    labels = (("L", "R"), ("P", "A"), ("I", "S"))
    slicer = SliceSequenced("image", num_slices=5)
    native = slicer({"image": Orientation("LPS", labels=labels)(volume)})["image"]
    ras = slicer({"image": Orientation("RAS", labels=labels)(volume)})["image"]
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        picture = ds.pixel_array + float(ds.RescaleIntercept)
        # LPS is the series' own axis order: slice i is the file read as a 2D image, (columns, rows)
        np.testing.assert_array_equal(native[0, i].numpy(), picture.T)
        np.testing.assert_array_equal(native[0, i].numpy(), load_ssl_image(f, dims=2)[0].numpy())
        # RAS (pretraining and fine-tuning default) keeps the axis order and flips both directions
        np.testing.assert_array_equal(ras[0, i].numpy(), picture.T[::-1, ::-1])


def test_slice_i_of_both_views_is_the_same_source_slice():
    # slices of distinct brightness over a textured plane; views may flip/rotate/blur/noise/bias/gamma it,
    # but every transform acts in-plane and identically on all slices, so the brightness order of slices
    # (and the zero padding) must survive in both views.
    rng = torch.Generator().manual_seed(0)
    texture = 0.5 + 0.5 * torch.rand(1, 1, 32, 32, generator=rng)
    levels = torch.linspace(0.2, 0.9, 6).view(1, 6, 1, 1)
    image = torch.zeros(1, 8, 32, 32)
    image[:, :6] = texture * levels
    views = VolumeViewsd("image", policy="compose", prob=0.7)
    views.set_random_state(seed=3)
    for _ in range(25):
        out = views({"image": image.clone(), "num_slices": 6})["views"]
        assert len(out) == 2
        for view in out:
            assert view.shape == (1, 8, 32, 32)
            assert torch.count_nonzero(view[:, 6:]) == 0
            means = view[0, :6].mean(dim=(1, 2))
            assert torch.all(torch.diff(means) > 0), means


def test_image_views_are_reproducible_and_random(itk_pd_slice_png):
    image = load_ssl_image(itk_pd_slice_png, dims=2) / 255.0
    make = ImageViewsd("image", spatial_size=(32, 32), num_local=3, local_size=(16, 16))
    make.set_random_state(seed=7)
    first = make({"image": image})
    make.set_random_state(seed=7)
    again = make({"image": image})
    assert [v.shape for v in first["views"]] == [(1, 32, 32)] * 2
    assert [v.shape for v in first["local_views"]] == [(1, 16, 16)] * 3
    assert all(torch.equal(a, b) for a, b in zip(first["views"], again["views"], strict=True))
    assert not torch.equal(first["views"][0], first["views"][1])


def test_sampler_mixes_in_ratio_and_shards_disjointly_per_epoch():
    dims = [3] * 10 + [2] * 25
    shards = [MixedBatchSampler(dims, 2, 3, seed=5, num_replicas=2, rank=r) for r in range(2)]
    for epoch in (0, 1):
        seen = []
        for sampler in shards:
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler) == 4  # 13 images per rank / 3 per batch, the longer stream
            for b in batches:
                assert [dims[i] for i in b] == [3, 3, 2, 2, 2]
            seen.append(batches)
        images = [[i for b in batches for i in b if dims[i] == 2] for batches in seen]
        assert not set(images[0]) & set(images[1])  # disjoint shares
    again = MixedBatchSampler(dims, 2, 3, seed=5, num_replicas=2, rank=0)
    again.set_epoch(1)
    assert list(again) == seen[0]  # deterministic given (seed, epoch)
    shards[0].set_epoch(0)
    assert list(shards[0]) != seen[0]  # and a new shuffle each epoch


def test_sampler_resumed_inside_an_epoch_yields_the_rest_with_the_same_item_seeds():
    dims = [3] * 6 + [2] * 9
    sampler = MixedBatchSampler(dims, 2, 1, seed=5)
    sampler.set_epoch(3)
    full = [[(int(k), k.seed) for k in batch] for batch in sampler]
    assert len(full) == 9  # 9 images, one a batch; the 6 volumes go round 1.5 times
    sampler.set_epoch(3, start_batch=4)
    assert [[(int(k), k.seed) for k in batch] for batch in sampler] == full[4:]
    seeds = [seed for batch in full for _, seed in batch]
    assert len(set(seeds)) == len(seeds)  # an item met twice in an epoch is augmented twice, differently
    sampler.set_epoch(4)
    assert not {seed for batch in sampler for seed in (k.seed for k in batch)} & set(seeds)
    # the seed belongs to the place in the epoch, not to the process count: rank 1 of 2 draws the odd places
    shard = MixedBatchSampler(dims, 1, 1, seed=5, num_replicas=2, rank=0)
    shard.set_epoch(3)
    assert next(iter(shard))[0].seed == full[0][0][1]


def test_item_views_depend_on_the_sampler_key_alone(colin_small, itk_pd_slice_png):
    datalist = [{"image": str(colin_small), "dims": 3, "modality": "MR"},
                {"image": str(itk_pd_slice_png), "dims": 2, "modality": "MR"}]  # fmt: skip
    dataset = build_pretrain_dataset(datalist, num_slices=8, spatial_size=(16, 16), slice_policy="random")
    key = SampleKey(0, seed=1234)
    first = dataset[key]["views"]
    dataset[SampleKey(1, seed=99)], dataset[1]  # draws in between, as another loader worker's history
    again = dataset[pickle.loads(pickle.dumps(key))]["views"]  # as sent to a loader worker
    other = dataset[SampleKey(0, seed=1235)]["views"]
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(first[0], other[0])


def test_loader_batches_are_the_same_with_and_without_workers(colin_small, itk_t1, itk_pd_slice_png):
    datalist = [{"image": str(path), "dims": dims, "modality": "MR"}
                for path, dims in ((colin_small, 3), (itk_t1, 3), (itk_pd_slice_png, 2))]  # fmt: skip
    batches = {}
    for workers in (0, 2):
        dataset = build_pretrain_dataset(datalist, num_slices=8, spatial_size=(16, 16), seed=3)
        loader = build_pretrain_loader(dataset, 1, 1, num_workers=workers, seed=3, persistent_workers=True)
        loader.batch_sampler.set_epoch(2)
        batches[workers] = [torch.cat([b["volume_views"][0].flatten(), b["image_views"][1].flatten()])
                            for b in loader]  # fmt: skip
    assert len(batches[0]) == 2
    for a, b in zip(batches[0], batches[2], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_collate_refuses_a_bad_item_by_name():
    good = {"views": [torch.zeros(1, 4, 8, 8)] * 2, "num_slices": 4, "index": 0, "source": "a.nii.gz"}
    odd = {"views": [torch.zeros(1, 4, 6, 6)] * 2, "num_slices": 4, "index": 1, "source": "b.nii.gz"}
    nan = {"views": [torch.full((1, 8, 8), float("nan"))] * 2, "index": 2, "source": "c.png"}
    with pytest.raises(BadInputError, match=r"b\.nii\.gz: volume views of shape"):
        collate_joint_ssl([good, odd])
    with pytest.raises(BadInputError, match=r"c\.png: a view holds NaN/Inf"):
        collate_joint_ssl([good, nan])
    batch = collate_joint_ssl([good])
    assert tuple(batch) == BATCH_KEYS and batch["image_views"] is None and batch["num_slices"].tolist() == [4]


def test_mixed_loader_with_caches_gives_identical_batches(
    colin_small, itk_t1, itk_pd_slice_png, pydicom_ct, tmp_path
):
    datalist = [
        {"image": str(colin_small), "dims": 3, "modality": "MR"},
        {"image": str(itk_t1), "dims": 3, "modality": "MR"},
        {"image": str(itk_pd_slice_png), "dims": 2, "modality": "MR"},
        {"image": str(pydicom_ct), "dims": 2, "modality": "CT"},
    ]
    results = {}
    for cache in ("none", "memory", "disk"):
        dataset = build_pretrain_dataset(datalist, num_slices=8, spatial_size=(32, 32), cache=cache,
                                         cache_dir=tmp_path / "cache", seed=11)  # fmt: skip
        loader = build_pretrain_loader(dataset, volumes_per_batch=2, images_per_batch=2, shuffle=False)
        (batch,) = list(loader)
        results[cache] = batch
    batch = results["none"]
    assert batch["volume_index"].tolist() == [0, 1] and batch["image_index"].tolist() == [2, 3]
    assert batch["num_slices"].tolist() == [8, 8]
    assert [tuple(v.shape) for v in batch["volume_views"]] == [(2, 1, 8, 32, 32)] * 2
    assert [tuple(v.shape) for v in batch["image_views"]] == [(2, 1, 32, 32)] * 2
    assert all(torch.isfinite(v).all() and float(v.std()) > 0.01 for v in batch["volume_views"])
    for cache in ("memory", "disk"):
        for key in ("volume_views", "image_views"):
            for a, b in zip(results[cache][key], batch[key], strict=True):
                torch.testing.assert_close(a, b)


def test_optional_resampling_and_auto_slice_axis(colin_small):
    # colin_small is 3 mm isotropic, 60 x 72 x 60: 6 mm spacing halves every axis
    entry = [{"image": str(colin_small), "dims": 3, "modality": "MR"}]
    native = build_pretrain_dataset(entry, num_slices=64, spatial_size=(16, 16))[0]
    coarse = build_pretrain_dataset(entry, num_slices=64, spatial_size=(16, 16), pixdim=(6.0, 6.0, 6.0))[0]
    assert (native["num_slices"], coarse["num_slices"]) == (60, 30)
    # "auto" slices along the coarsest axis: 6 mm along y (72 -> 36 slices), 3 mm elsewhere
    sliced = build_pretrain_dataset(entry, num_slices=64, spatial_size=(16, 16), pixdim=(3.0, 6.0, 3.0),
                                    slice_axis="auto")[0]  # fmt: skip
    assert sliced["num_slices"] == 36


@pytest.mark.parametrize(("policy", "moves"), [("random_stride", True), ("random", True), ("center", False)])
@pytest.mark.parametrize("cache", ["memory", "none"])
def test_random_slice_policies_draw_their_slices_for_every_item_even_under_a_cache(
    policy, moves, cache, itk_t1
):
    # the views only flip in-plane here, so each slice's sum tells which source slice it is
    entry = [{"image": str(itk_t1), "dims": 3, "modality": "MR"}]
    dataset = build_pretrain_dataset(entry, num_slices=8, spatial_size=(16, 16), slice_policy=policy,
                                     cache=cache, view_transforms=("flip",))  # fmt: skip

    def slice_sums(seed: int, view: int = 0) -> torch.Tensor:
        return dataset[SampleKey(0, seed)]["views"][view].sum(dim=(0, 2, 3))

    torch.testing.assert_close(slice_sums(1), slice_sums(1))  # one draw: the same slices, in both views
    torch.testing.assert_close(slice_sums(1), slice_sums(1, view=1))
    assert (
        not torch.allclose(slice_sums(1), slice_sums(2))
    ) == moves  # another draw: other slices, if random


def test_slice_sequence_defaults_take_64_centre_slices_of_the_image_key():
    """Defaults: key ``image``, 64 slices, centre policy, axis 2; the count goes to ``num_slices``."""
    out = SliceSequenced()({"image": _volume(70)})
    assert out["image"][0, :, 0, 0].tolist() == list(range(4, 68))  # slices 3..66, 1-based values
    assert out["num_slices"] == 64


def test_slice_sequence_argument_rules_at_their_boundaries():
    """``num_slices >= 1``, ``slice_axis`` in 0, 1, 2, ``auto``, a known policy; errors name the argument."""
    one = SliceSequenced(num_slices=1)({"image": _volume(5)})
    assert one["image"][0, :, 0, 0].tolist() == [3] and one["num_slices"] == 1
    for axis in (0, 1, 2, "auto"):
        SliceSequenced(slice_axis=axis)
    with pytest.raises(ValueError, match="num_slices must be an integer >= 1"):
        SliceSequenced(num_slices=0)
    with pytest.raises(ValueError, match="slice_axis must be 0, 1, 2 or 'auto'"):
        SliceSequenced(slice_axis=3)
    with pytest.raises(ValueError, match="policy must be one of"):
        SliceSequenced(policy="middle")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slices_along_each_axis_keep_the_other_axes_in_monai_order(axis):
    """Slice ``i`` along ``axis`` is ``volume.select(axis, i)``, its plane the two other axes in order."""
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6)
    out = SliceSequenced(num_slices=8, slice_axis=axis)({"image": volume})
    depth = volume.shape[1 + axis]
    assert out["num_slices"] == depth
    for i in range(depth):
        torch.testing.assert_close(out["image"][:, i], volume.select(1 + axis, i), rtol=0, atol=0)
    assert torch.count_nonzero(out["image"][:, depth:]) == 0


def test_auto_axis_is_the_coarsest_voxel_direction_of_an_oblique_affine():
    """Spacing is the length of each affine column (voxel axis), not of a row (world axis)."""
    from monai.data import MetaTensor

    c, s = np.cos(np.pi / 3), np.sin(np.pi / 3)
    rotation = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([1.0, 3.0, 1.0])  # voxel axis 1 is 3 mm, mostly along world x
    volume = MetaTensor(torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6), affine=affine)
    out = SliceSequenced(num_slices=8, slice_axis="auto")({"image": volume})
    assert out["num_slices"] == 5
    torch.testing.assert_close(out["image"][:, 2], volume.as_tensor()[:, :, 2], rtol=0, atol=0)
    plain = SliceSequenced(num_slices=8, slice_axis="auto")(
        {"image": volume.as_tensor()}
    )  # no affine: axis 2
    assert plain["num_slices"] == 6


def test_random_window_starts_are_uniform_over_every_position():
    """Every start from the first to the last window is drawn, each about equally often."""
    t = SliceSequenced("image", num_slices=4, policy="random")
    t.set_random_state(seed=0)
    starts = [int(t({"image": _volume(6)})["image"][0, 0, 0, 0]) - 1 for _ in range(300)]
    counts = np.bincount(starts, minlength=3)
    assert len(counts) == 3 and all(abs(n / 300 - 1 / 3) < 0.08 for n in counts), counts


def test_slice_sequences_and_2d_images_come_out_as_plain_tensors_with_their_count():
    """Metadata goes (the affine no longer describes a slice sequence); 2D images count one slice; every
    key is processed whatever its kind."""
    from monai.data import MetaTensor

    item = {"a": MetaTensor(torch.rand(1, 6, 5)), "b": MetaTensor(torch.rand(1, 6, 5, 3)), "source": "x.nii"}
    out = SliceSequenced(("a", "b"), num_slices=4)(item)
    assert type(out["a"]) is torch.Tensor and type(out["b"]) is torch.Tensor
    assert out["b"].shape == (1, 4, 6, 5) and out["num_slices"] == 3  # the last key's count
    only_2d = SliceSequenced(num_slices=4)({"image": MetaTensor(torch.rand(1, 6, 5))})
    assert only_2d["num_slices"] == 1 and type(only_2d["image"]) is torch.Tensor


@pytest.mark.parametrize(("entry", "name"), [({"source": "vol.nii"}, "vol.nii"), ({}, "image")])
def test_an_image_of_the_wrong_rank_is_named_with_its_shape(entry, name):
    with pytest.raises(
        BadInputError, match=rf"^{name}: expected \(C, X, Y, Z\) before slicing, got \(1, 2\)$"
    ):
        SliceSequenced()({"image": torch.zeros(1, 2), **entry})


def test_missing_keys_are_an_error_unless_allowed():
    """MONAI's ``allow_missing_keys`` contract, off by default, for the slicing and resizing transforms."""
    for transform in (SliceSequenced, ResizeInPlaned):
        with pytest.raises(KeyError):
            transform()({"other": 1})
        assert transform(allow_missing_keys=True)({"other": 1}) == {"other": 1}


def test_in_plane_resize_defaults_to_128_by_area_and_never_touches_the_slices():
    """Default ``image`` key, ``(128, 128)``, ``resize`` mode: area interpolation (block means when
    shrinking, pixel repetition when growing); the slice axis and 2D images alike; plain tensors out."""
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 3, 4, 2, generator=gen)
    out = ResizeInPlaned()({"image": volume})["image"]
    assert type(out) is torch.Tensor and out.shape == (1, 3, 128, 128)
    torch.testing.assert_close(out, volume.repeat_interleave(32, 2).repeat_interleave(64, 3))
    image = torch.rand(2, 8, 6, generator=gen)
    small = ResizeInPlaned(spatial_size=(4, 3))({"image": image})["image"]
    assert type(small) is torch.Tensor
    torch.testing.assert_close(small, image.reshape(2, 4, 2, 3, 2).mean(dim=(2, 4)))


def test_in_plane_crop_pad_mode_centre_crops_and_zero_pads():
    """``crop_pad`` cuts the centre of a larger plane and pads a smaller one with zeros, slices untouched."""
    gen = torch.Generator().manual_seed(0)
    volume = torch.rand(1, 3, 8, 4, generator=gen)
    out = ResizeInPlaned(spatial_size=(6, 6), mode="crop_pad")({"image": volume})["image"]
    assert type(out) is torch.Tensor and out.shape == (1, 3, 6, 6)
    torch.testing.assert_close(out[..., 1:5], volume[:, :, 1:7], rtol=0, atol=0)
    assert torch.count_nonzero(out[..., 0]) == 0 and torch.count_nonzero(out[..., 5]) == 0
    image = torch.rand(1, 8, 4, generator=gen)
    flat = ResizeInPlaned(spatial_size=(6, 6), mode="crop_pad")({"image": image})["image"]
    assert type(flat) is torch.Tensor and flat.shape == (1, 6, 6)
    torch.testing.assert_close(flat[..., 1:5], image[:, 1:7], rtol=0, atol=0)


def test_in_plane_resize_argument_rules():
    ResizeInPlaned(spatial_size=(1, 1))
    with pytest.raises(ValueError, match="spatial_size must be an integer >= 1"):
        ResizeInPlaned(spatial_size=(0, 4))
    with pytest.raises(ValueError, match="mode must be 'resize' or 'crop_pad'"):
        ResizeInPlaned(mode="pad")


def test_random_policies_select_the_first_window_before_any_draw():
    assert SliceSequenced(num_slices=3, policy="random").select(7).tolist() == [0, 1, 2]
    assert SliceSequenced(num_slices=3, policy="random_stride").select(9).tolist() == [0, 3, 6]
