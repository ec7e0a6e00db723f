"""Every bad pretraining hyper-parameter is refused by the component that uses it, naming the key and the
rule, before any training: the bundle's own config is parsed with one bad value at a time. The line a
``jointssl`` command prints for it (``error_summary``, exit status 2, no traceback) is that rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engines"))
from pretrain_bundle_runs import CONFIGS, TINY, small_real_datalist

from jointssl_monai.utils.errors import error_summary

#: What a run instantiates before its first step, in the order the bundle needs them.
COMPONENTS = (
    "network_def",
    "loss",
    "optimizer_def",
    "train#dataset",
    "train#dataloader",
    "train#lr_scheduler",
    "train#trainer",
)

BAD = [
    ("backbone", "resnet19", "unknown backbone 'resnet19'"),
    ("in_channels", 0, "in_channels must be an integer >= 1, got 0"),
    ("batch_size", 3.0, "batch_size must be an integer >= 1, got 3.0"),
    ("batch_size", True, "batch_size must be an integer >= 1, got True"),
    ("batch_size", "16", "batch_size must be an integer >= 1, got '16'"),
    ("d_model", 0, "d_model must be an integer >= 1, got 0"),
    ("attention", "sparse", "attention must be 'deformable' or 'full'"),
    ("spatial_size", [96, 96, 96], "spatial_size must be a list of 2 integers >= 1"),
    ("spatial_size", [96, 0], "spatial_size must be an integer >= 1, got 0"),
    ("spatial_size", 96, "spatial_size must be a list of 2 integers >= 1"),
    ("num_slices", 0, "num_slices must be an integer >= 1, got 0"),
    ("image_fraction", 1.5, "image_fraction must be a number >= 0 and <= 1, got 1.5"),
    ("intra_method", "byol", "intra_method must be one of ['swav', 'deepcluster', 'none']"),
    ("intra_prototypes", 1, "intra_prototypes must be an integer >= 2, got 1"),
    ("inter_prototypes", [], "inter_prototypes must be an integer >= 2 or a non-empty list of them"),
    ("inter_prototypes", [300, 1], "inter_prototypes must be an integer >= 2, got 1"),
    ("temperature", 0, "temperature must be a number > 0, got 0"),
    ("sinkhorn_epsilon", -0.05, "sinkhorn_epsilon must be a number > 0, got -0.05"),
    ("sinkhorn_iterations", 0, "sinkhorn_iterations must be an integer >= 1, got 0"),
    ("mask_ratio", 1.0, "mask_ratio must be in [0, 1)"),
    ("mask_ratio", 0, "mask_ratio must be > 0 when masked slice modelling is on"),
    ("mask_loss_on", "none", "reduction must be 'masked' or 'all'"),
    ("w_inter", -1.0, "w_inter must be a number >= 0, got -1.0"),
    ("optimizer", "adam", "optimizer must be one of 'lars', 'sgd', 'adamw'"),
    ("lr", 0.0, "lr must be a number > 0, got 0.0"),
    ("weight_decay", -1e-4, "weight_decay must be a number >= 0, got -0.0001"),
    ("max_epochs", 0, "max_epochs must be an integer >= 1, got 0"),
    ("warmup_epochs", 200, "warmup_epochs must be <= max_epochs (100), got 200"),
    ("amp", "fp8", "amp must be 'none', 'auto', 'bf16' or 'fp16'"),
    ("grad_clip_norm", 0, "grad_clip_norm must be a number > 0, got 0"),
    ("cache", "gpu", "cache must be one of 'none', 'memory', 'disk'; got 'gpu'"),
    ("skip_bad_inputs", "yes", "skip_bad_inputs must be true or false, got 'yes'"),
    ("seed", -1, "seed must be an integer >= 0, got -1"),
]


@pytest.fixture(scope="module")
def datalist(tmp_path_factory) -> Path:
    return small_real_datalist(tmp_path_factory.mktemp("bad_hyperparameters"))


def _parser(data: Path, root: Path, **changes) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "pretrain.json"))
    for key, value in {**TINY, "cache": "none", "max_epochs": 100, "datalist": str(data),
                       "bundle_root": str(root), **changes}.items():  # fmt: skip
        parser[key] = value
    return parser


def _messages(error: BaseException) -> list[str]:
    """The messages of an error and of every error it was raised from (MONAI wraps them)."""
    found = []
    while error is not None:
        found.append(str(error))
        error = error.__cause__ or error.__context__
    return found


def test_the_bundle_defaults_with_the_small_settings_build(datalist, tmp_path):
    parser = _parser(datalist, tmp_path)
    for component in COMPONENTS:
        assert parser.get_parsed_content(component) is not None


@pytest.mark.parametrize(("key", "value", "rule"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_each_bad_value_is_refused_naming_key_and_rule(key, value, rule, datalist, tmp_path):
    parser = _parser(datalist, tmp_path, **{key: value})
    with pytest.raises((ValueError, TypeError, RuntimeError)) as err:
        for component in COMPONENTS:
            parser.get_parsed_content(component)
    messages = _messages(err.value)
    assert any(rule in message for message in messages), messages[-1]
    code, line = error_summary(err.value)  # what `jointssl pretrain` prints, and its exit status
    assert code == 2 and rule in line and "\n" not in line, line


def test_rules_between_keys(datalist, tmp_path):
    nothing = _parser(datalist, tmp_path, w_intra=0, w_inter=0.0, w_mask=0)
    with pytest.raises(RuntimeError) as err:
        nothing.get_parsed_content("network_def")
    assert "at least one of use_intra, use_inter, use_mask" in error_summary(err.value)[1]
    no_data = _parser(datalist, tmp_path, datalist=None, dataset_dir=3)
    with pytest.raises(RuntimeError) as err:
        no_data.get_parsed_content("loss")
    assert error_summary(err.value) == (2, "error: dataset_dir must be a path string or null, got 3")
