"""Set-ups in which a clustering level or a projection head cannot learn are refused before any work."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from jointssl_monai.apps.bundle_commands import find_bundle_dir
from jointssl_monai.engines.setup_check import check_pretrain_setup, queue_room
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks import JointSSLNet


def _net(intra=16, inter=(4, 4, 4), **kwargs) -> JointSSLNet:
    torch.manual_seed(0)
    sizes = dict(d_model=16, proj_hidden_dim=16, proj_dim=8, num_layers=1, ff_dim=16, heads=2, dim_head=8)
    return JointSSLNet.from_settings(
        "resnet10", intra_prototypes=intra, inter_prototypes=inter, **sizes, **kwargs
    )


def _deepcluster_inter(num_volumes: int, k) -> JointSSLLoss:
    return JointSSLLoss("swav", "deepcluster", inter_prototypes=list(k), embedding_dim=8,
                        intra_queue_length=64, inter_bank_size=num_volumes)  # fmt: skip


def test_volume_level_deepcluster_with_more_clusters_than_volumes_is_refused():
    # the measured failure: 300 volumes into 3 x 3000 clusters -> every volume its own cluster
    with pytest.raises(ValueError, match=r"inter_prototypes = 3000 with deepcluster: .* bank of 300 volumes"):
        check_pretrain_setup(
            _net(inter=[3000] * 3), _deepcluster_inter(300, [3000] * 3), 1, 1, 16, 300, 10, 1
        )
    # the authors' 3 x 4 passes on the same data, and needs 8 volumes at least
    check_pretrain_setup(_net(), _deepcluster_inter(300, [4] * 3), 1, 1, 16, 300, 10, 1)
    with pytest.raises(ValueError, match="use at most 3 prototypes per head"):
        check_pretrain_setup(_net(), _deepcluster_inter(7, [4] * 3), 1, 1, 16, 7, 10, 1)


def test_swav_level_needs_rows_and_a_queue_without_stale_copies():
    net = _net(inter=8)
    loss = JointSSLLoss(intra_queue_length=0, inter_queue_length=256, embedding_dim=8)
    # intra: 1 volume x 4 slices + 1 image = 5 rows per step, no queue, 16 prototypes
    with pytest.raises(ValueError, match=r"intra_prototypes = 16 with swav: Sinkhorn clusters 5 slice/image"):
        check_pretrain_setup(net, loss, 1, 1, 4, 1000, 10, 1)
    # inter: a 256-row queue over 32 volumes holds 8 stale copies of every volume
    with pytest.raises(ValueError, match=r"inter_queue_length = 256 with 32 volumes .* use at most 31"):
        check_pretrain_setup(net, loss, 1, 1, 4, 32, 10, 1)
    assert queue_room(32, 1) == 31 and queue_room(32, 2, world_size=2) == 14
    fine = JointSSLLoss(intra_queue_length=100, inter_queue_length=31, embedding_dim=8)
    check_pretrain_setup(net, fine, 1, 1, 4, 32, 10, 1)
    # two processes double the rows per step: the same queue would now hold stale copies
    with pytest.raises(ValueError, match="inter_queue_length = 31"):
        check_pretrain_setup(net, fine, 1, 1, 4, 32, 10, 2)


def test_batch_norm_over_too_few_rows_is_refused():
    loss = _deepcluster_inter(300, [4] * 3)
    with pytest.raises(ValueError, match=r"inter_proj_batch_norm = true: .* 2 rows per process"):
        check_pretrain_setup(_net(inter_proj_batch_norm=True), loss, 1, 1, 16, 300, 10, 1)
    check_pretrain_setup(_net(inter_proj_batch_norm=True), loss, 4, 1, 16, 300, 10, 1)  # 8 rows: allowed
    with pytest.raises(ValueError, match=r"proj_batch_norm = true: the intra .* 6 rows"):  # 3 2D images only
        check_pretrain_setup(_net(), loss, 0, 3, 16, 300, 10, 1)


def test_bundle_volume_level_defaults_follow_the_authors(tmp_path):
    """pretrain.json: volume-level DeepCluster-v2 gets the authors' 3 heads of 4 prototypes, and the Python
    network has no BatchNorm in its volume head, like the bundle."""
    parser = ConfigParser()
    parser.read_config(find_bundle_dir() / "configs" / "pretrain.json")
    small = {"backbone": "resnet10", "d_model": 32, "ff_dim": 32, "proj_hidden_dim": 32, "proj_dim": 16}
    small |= {"num_layers": 1, "num_slices": 4, "intra_prototypes": 16, "batch_size": 2}
    for key, value in small.items():
        parser[key] = value
    parser["datalist_entries"] = [{"image": f"v{i}.nii", "dims": 3} for i in range(20)]
    parser["datalist_entries"] += [{"image": f"i{i}.png", "dims": 2} for i in range(10)]
    parser["inter_method"] = "deepcluster"
    assert parser.get_parsed_content("network_def#inter_prototypes#num_prototypes") == [4, 4, 4]
    parser["inter_method"] = "swav"
    assert parser.get_parsed_content("network_def#inter_prototypes#num_prototypes") != [4, 4, 4]
    assert parser.get_parsed_content("inter_proj_batch_norm") is False
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in _net().inter_head.modules())
    # and what the defaults do: the bundle's own network and loss, on 20 volumes and 10 images, pass the
    # set-up check at the volume level (the former default, 3 x 3000 prototypes, is refused there)
    parser["inter_method"] = "deepcluster"
    ids = ("network_def", "loss", "volumes_per_batch", "images_per_batch", "num_slices", "num_volumes")
    args = [parser.get_parsed_content(k) for k in ids] + [parser.get_parsed_content("num_images"), 1]
    check_pretrain_setup(*args)
    parser["inter_prototypes"] = 3000
    args = [parser.get_parsed_content(k, lazy=False) for k in ids] + [10, 1]
    with pytest.raises(ValueError, match="inter_prototypes = 3000 with deepcluster"):
        check_pretrain_setup(*args)
