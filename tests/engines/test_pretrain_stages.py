"""The authors' three-stage recipe chained through the bundle: stage A -> B -> C on real images.

Each stage is a real ``python -m monai.bundle run training`` of ``pretrain.json`` + ``stage_*.json`` for one
short epoch; stages B and C start from the previous stage's ``checkpoint_final.pt`` (``init_checkpoint``).
"""

from __future__ import annotations

import pytest
import torch
from pretrain_bundle_runs import CONFIGS, run_bundle, small_real_datalist

from jointssl_monai.networks import JointSSLNet
from jointssl_monai.utils.checkpoints import load_network_checkpoint

STAGES = {"a": "stage_a_2d.json", "b": "stage_b_mask.json", "c": "stage_c_3d.json"}


def _final_network(root, stage: str) -> dict[str, torch.Tensor]:
    path = root / "models" / "ssl" / f"stage_{stage}" / "checkpoints" / "checkpoint_final.pt"
    return torch.load(path, map_location="cpu", weights_only=True)["network"]


def _exported_encoder(root, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(root / "models" / "ssl" / f"stage_{stage}" / "encoder.pt", weights_only=True)


def _module(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith(prefix + ".")}


def _max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    """Largest absolute change over the floating-point tensors of a module (BatchNorm buffers skipped)."""
    assert before.keys() == after.keys()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    changes = [
        (after[k].float() - before[k].float()).abs().max().item()
        for k in before
        if before[k].is_floating_point() and not k.endswith(buffers)
    ]
    return max(changes)


def _differing(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    """The keys whose tensors differ (buffers included); empty when bit-identical."""
    assert before.keys() == after.keys()
    return [k for k in before if not torch.equal(before[k], after[k])]


@pytest.mark.slow
def test_stages_a_b_c_chain_through_init_checkpoint(tmp_path, itk_t1, pydicom_ct_series):
    datalist = small_real_datalist(tmp_path)
    # Volume-level clustering in stage C: 4 volumes, 2 per step, 2 prototypes (well below the rows clustered).
    common = {"datalist": str(datalist), "max_epochs": 1, "inter_prototypes": 2}
    for stage, config in STAGES.items():
        run_bundle(tmp_path, [CONFIGS / config], **common)
        assert (
            tmp_path / "models" / "ssl" / f"stage_{stage}" / "checkpoints" / "checkpoint_final.pt"
        ).is_file()
    a, b, c = (_final_network(tmp_path, s) for s in STAGES)
    # one key set, but for the volume-level prototype banks: stage C clusters volumes with DeepCluster-v2's
    # three heads (the default), where A and B keep one unused bank
    assert a.keys() == b.keys()
    assert {k for k in c if not k.startswith("inter_prototypes.")} == {
        k for k in b if not k.startswith("inter_prototypes.")
    }
    assert sum(k.startswith("inter_prototypes.") for k in c) == 3

    # Stage B starts from A's final weights and freezes the slice encoder: its encoder (BatchNorm statistics
    # included) and the intra-level head and prototypes it does not train are A's final ones, bit for bit.
    for prefix in ("encoder", "intra_head", "intra_prototypes"):
        assert not _differing(_module(a, prefix), _module(b, prefix)), prefix
    assert not _differing(_exported_encoder(tmp_path, "a"), _exported_encoder(tmp_path, "b"))
    # ... while it trains masked slice modelling and the aggregator.
    b_mask = _max_change(_module(a, "masked_modeling"), _module(b, "masked_modeling"))
    b_aggregator = _max_change(_module(a, "aggregator"), _module(b, "aggregator"))
    assert b_mask > 0 and b_aggregator > 0, (b_mask, b_aggregator)

    # Stage C starts from B's final weights: what C does not train (masked modelling, intra level) is B's.
    for prefix in ("masked_modeling", "intra_head", "intra_prototypes"):
        assert not _differing(_module(b, prefix), _module(c, prefix)), prefix
    # Stage C optimises the whole ResNet_Trans, the slice encoder included (the authors' ssl_swav_3D.py /
    # ssl_deepcluster_3D.py): encoder weights, aggregator and volume-level head all move.
    c_encoder = _max_change(_module(b, "encoder"), _module(c, "encoder"))
    c_aggregator = _max_change(_module(b, "aggregator"), _module(c, "aggregator"))
    c_head = _max_change(_module(b, "inter_head"), _module(c, "inter_head"))
    exported = _max_change(_exported_encoder(tmp_path, "b"), _exported_encoder(tmp_path, "c"))
    print(
        f"stage B: mask {b_mask:.3g} aggregator {b_aggregator:.3g}; stage C: encoder {c_encoder:.3g} "
        f"(exported {exported:.3g}) aggregator {c_aggregator:.3g} inter_head {c_head:.3g}"
    )
    assert c_encoder > 0 and exported > 0, "stage C left the slice encoder unchanged (frozen?)"
    assert c_aggregator > 0 and c_head > 0, (c_aggregator, c_head)


def _tiny_net(**kwargs) -> JointSSLNet:
    settings = {"backbone": "resnet10", "d_model": 16, "proj_hidden_dim": 16, "proj_dim": 8, "num_layers": 1}
    settings |= {"ff_dim": 16, "heads": 2, "dim_head": 8, "intra_prototypes": 4, "inter_prototypes": 2}
    return JointSSLNet.from_settings(**(settings | kwargs))


def test_init_checkpoint_takes_another_prototype_layout_and_nothing_else(tmp_path):
    # Stage B (no volume-level clustering: one bank) -> stage C with volume-level DeepCluster-v2 (3 heads).
    torch.manual_seed(0)
    stage_b = _tiny_net(use_intra=False, use_inter=False, freeze_encoder=True)
    path = tmp_path / "checkpoint_final.pt"
    torch.save({"network": stage_b.state_dict(), "trainer": {"epoch": 1}}, path)
    stage_c = _tiny_net(use_intra=False, use_mask=False, inter_prototypes=[2, 2, 2])
    fresh_banks = {k: v.clone() for k, v in stage_c.state_dict().items() if k.startswith("inter_prototypes.")}
    loaded = load_network_checkpoint(stage_c, path)
    assert loaded == len(stage_b.state_dict()) - 1
    after, before = stage_c.state_dict(), stage_b.state_dict()
    assert all(torch.equal(after[k], v) for k, v in fresh_banks.items())
    assert not [
        k for k in before if not k.startswith("inter_prototypes.") and not torch.equal(before[k], after[k])
    ]
    # Any other mismatch means the wrong file.
    with pytest.raises(ValueError, match="does not fit"):
        load_network_checkpoint(_tiny_net(d_model=32), path)
