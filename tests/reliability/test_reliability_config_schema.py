"""The pretraining hyper-parameters are validated before any work, with every violation named at once."""

from __future__ import annotations

import copy
import re

import pytest
from jsonschema import Draft202012Validator
from monai.bundle import ConfigParser

from jointssl_monai.utils.config_schema import PRETRAIN_SCHEMA, is_expression, validate_pretrain_config

VALID = {
    "bundle_root": ".",
    "dataset_dir": None,
    "datalist": "$@bundle_root + '/configs/datalist.json'",
    "output_dir": "$@bundle_root + '/models/ssl'",
    "backbone": "resnet18",
    "in_channels": 1,
    "d_model": 256,
    "num_layers": 2,
    "ff_dim": 1024,
    "attention": "deformable",
    "num_slices": 8,
    "spatial_size": [96, 96],
    "batch_size": 16,
    "intra_queue_length": 0,
    "inter_queue_length": 256,
    "image_fraction": 0.5,
    "intra_method": "swav",
    "inter_method": "deepcluster",
    "intra_prototypes": 300,
    "inter_prototypes": [300, 300, 300],
    "temperature": 0.1,
    "sinkhorn_epsilon": 0.05,
    "sinkhorn_iterations": 3,
    "freeze_prototypes_iterations": 313,
    "mask_ratio": 0.5,
    "mask_loss_on": "masked",
    "w_intra": 1.0,
    "w_inter": 1.0,
    "w_mask": 0,
    "optimizer": "lars",
    "lr": "$0.6 * @batch_size / 256",
    "weight_decay": 1e-6,
    "max_epochs": 100,
    "warmup_epochs": 10,
    "amp": "bf16",
    "grad_clip_norm": None,
    "num_workers": 4,
    "cache": "memory",
    "skip_bad_inputs": True,
    "resume": False,
    "seed": 0,
    "checkpoint_interval": 1,
    "network_def": {"_target_": "SomeNet"},  # other ids of the bundle are not the schema's business
    "run": ["$1 / 0"],  # never evaluated by the validation (it would raise)
    "training": "%run",
}


def _with(**changes) -> dict:
    config = copy.deepcopy(VALID)
    config.update(changes)
    return config


def test_schema_is_valid_draft_2020_12_and_covers_every_pretraining_id():
    Draft202012Validator.check_schema(PRETRAIN_SCHEMA)
    assert set(PRETRAIN_SCHEMA["properties"]) <= set(VALID)
    assert all("description" in rule for rule in PRETRAIN_SCHEMA["properties"].values())


def test_valid_config_passes_as_dict_and_as_parser():
    validate_pretrain_config(VALID)
    validate_pretrain_config(ConfigParser(copy.deepcopy(VALID)))
    validate_pretrain_config({})  # absent ids are MONAI's to report where they are referenced
    validate_pretrain_config(_with(grad_clip_norm=1.0, intra_prototypes=[2], dataset_dir="/data", w_mask=0.5))


def test_volume_level_swav_needs_two_volumes_or_a_queue():
    one_volume = {"inter_method": "swav", "batch_size": 2, "image_fraction": 0.5}
    with pytest.raises(ValueError, match="codes of a single row are uniform"):
        validate_pretrain_config(_with(**one_volume, inter_queue_length=0))
    validate_pretrain_config(_with(**one_volume, inter_queue_length=64))
    validate_pretrain_config(
        _with(inter_method="swav", batch_size=4, image_fraction=0.5, inter_queue_length=0)
    )


BAD = [
    ("backbone", "resnet19", "one of 'resnet10', 'resnet18'"),
    ("in_channels", 0, "an integer >= 1"),
    ("batch_size", 3.0, "an integer >= 1"),
    ("batch_size", True, "an integer >= 1"),
    ("batch_size", "16", "an integer >= 1"),
    ("d_model", 4, "an integer >= 8"),
    ("attention", "sparse", "one of 'deformable', 'full'"),
    ("spatial_size", [96, 96, 96], "a list of 2 integers >= 16"),
    ("spatial_size", [96, 8], "[1]: 8 is less than the minimum of 16"),
    ("spatial_size", 96, "a list of 2 integers >= 16"),
    ("image_fraction", 1.5, "a number in [0, 1]"),
    ("intra_method", "byol", "one of 'swav', 'deepcluster', 'none'"),
    ("intra_prototypes", 1, "an integer >= 2 or a non-empty list"),
    ("inter_prototypes", [], "an integer >= 2 or a non-empty list"),
    ("inter_prototypes", [300, 1], "an integer >= 2 or a non-empty list"),
    ("temperature", 0, "a number > 0"),
    ("sinkhorn_epsilon", -0.05, "a number > 0"),
    ("sinkhorn_iterations", 0, "an integer >= 1"),
    ("mask_ratio", 1.0, "strictly between 0 and 1"),
    ("mask_ratio", 0, "strictly between 0 and 1"),
    ("mask_loss_on", "none", "one of 'masked', 'all'"),
    ("w_inter", -1.0, "a number >= 0"),
    ("optimizer", "adam", "one of 'lars', 'sgd', 'adamw'"),
    ("lr", 0.0, "a number > 0"),
    ("weight_decay", -1e-4, "a number >= 0"),
    ("max_epochs", 0, "an integer >= 1"),
    ("amp", "fp8", "one of 'none', 'bf16', 'fp16'"),
    ("grad_clip_norm", 0, "null (no clipping) or a number > 0"),
    ("cache", "gpu", "one of 'none', 'memory', 'disk'"),
    ("skip_bad_inputs", "yes", "true or false"),
    ("seed", -1, "an integer >= 0"),
    ("checkpoint_interval", 0, "an integer >= 1"),
    ("dataset_dir", 3, "a path string or null"),
    ("output_dir", None, "a path string"),
]


@pytest.mark.parametrize(("key", "value", "rule"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_each_violation_names_key_value_and_rule(key, value, rule):
    with pytest.raises(ValueError) as err:
        validate_pretrain_config(_with(**{key: value}), source="configs/pretrain.json")
    message = str(err.value)
    assert message.startswith("invalid pretraining config configs/pretrain.json (1 problems)")
    line = message.splitlines()[1]
    assert line.startswith(f"  - {key} = {value!r}: must be "), line
    assert rule in line, line


def test_rules_between_ids():
    with pytest.raises(ValueError, match=r"warmup_epochs = 20: must be <= max_epochs \(10\)"):
        validate_pretrain_config(_with(max_epochs=10, warmup_epochs=20))
    with pytest.raises(ValueError, match=r"w_intra = 0, w_inter = 0.0, w_mask = 0: must not all be zero"):
        validate_pretrain_config(_with(w_intra=0, w_inter=0.0, w_mask=0))
    validate_pretrain_config(_with(w_intra=0, w_inter=0, w_mask="$@w_intra"))  # not known yet: not judged


def test_all_violations_are_reported_together():
    config = _with(batch_size=0, lr=-1.0, amp="fp8", warmup_epochs=200, spatial_size=[8])
    with pytest.raises(ValueError) as err:
        validate_pretrain_config(config)
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid pretraining config (5 problems):"
    assert [re.match(r"  - (\w+) = ", line).group(1) for line in lines[1:]] == [
        "spatial_size",
        "batch_size",
        "lr",
        "amp",
        "warmup_epochs",
    ]


def test_expressions_are_skipped_in_raw_dicts_and_evaluated_by_the_parser():
    assert is_expression("$1 + 1") and is_expression("@batch_size") and is_expression("%file.json#x")
    assert not is_expression("resnet18") and not is_expression(3) and not is_expression("")
    bad_lr = _with(lr="$-0.1 * @batch_size / 256")
    validate_pretrain_config(bad_lr)  # raw: the expression is not judged
    with pytest.raises(ValueError, match=r"lr = -0.00625: must be a number > 0"):
        validate_pretrain_config(ConfigParser(bad_lr))
    parser = ConfigParser(copy.deepcopy(VALID))
    parser["batch_size"] = 0  # a command-line override
    with pytest.raises(ValueError) as err:
        validate_pretrain_config(parser)
    assert "batch_size = 0: must be an integer >= 1" in str(err.value)
    assert "lr = 0.0: must be a number > 0" in str(err.value)  # lr follows batch_size
    broken = ConfigParser(_with(max_epochs="$undefined_name + 1"))
    with pytest.raises(
        ValueError, match=r"max_epochs = '\$undefined_name \+ 1': cannot be evaluated \(RuntimeError"
    ):
        validate_pretrain_config(broken)
    with pytest.raises(TypeError, match="list"):
        validate_pretrain_config([("lr", 1.0)])
