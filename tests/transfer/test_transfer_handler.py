"""PretrainedEncoderLoader: opt-in, logs the number of keys, never overwrites a fine-tuned model.pt."""

from __future__ import annotations

import logging

import pytest
import torch
from ignite.engine import Engine
from monai.handlers import CheckpointLoader
from monai.networks.nets import FlexibleUNet, ResNetFeatures

from jointssl_monai.handlers import PretrainedEncoderLoader


@pytest.fixture
def encoder_file(tmp_path):
    encoder = ResNetFeatures("resnet10", pretrained=False, spatial_dims=2, in_channels=1)
    for p in encoder.parameters():
        torch.nn.init.normal_(p)
    path = tmp_path / "ssl" / "encoder.pt"
    path.parent.mkdir()
    torch.save(encoder.state_dict(), path)
    return path


def _unet(spatial_dims: int = 2) -> FlexibleUNet:
    return FlexibleUNet(1, 2, backbone="resnet10", spatial_dims=spatial_dims)


def _run(engine: Engine) -> None:
    engine.run([0], max_epochs=1)


def test_loads_and_logs_number_of_keys(encoder_file, caplog):
    unet = _unet(spatial_dims=3)  # inflated on the way
    engine = Engine(lambda e, b: None)
    handler = PretrainedEncoderLoader(encoder_file, network=unet, name="ssl_test")
    handler.attach(engine)
    with caplog.at_level(logging.INFO, logger="ssl_test"):
        _run(engine)
    n = len([k for k in unet.state_dict() if k.startswith("encoder.")])
    assert handler.report is not None and handler.report.num_loaded == n
    assert f"loaded {n} keys" in caplog.text
    state = torch.load(encoder_file, weights_only=True)
    torch.testing.assert_close(unet.encoder.conv1.weight.detach().sum(-1), state["conv1.weight"])


def test_disabled_does_nothing_even_without_a_file(tmp_path, caplog):
    unet = _unet()
    before = unet.encoder.conv1.weight.clone()
    engine = Engine(lambda e, b: None)
    handler = PretrainedEncoderLoader(tmp_path / "missing.pt", network=unet, enabled=False, name="ssl_test")
    handler.attach(engine)
    with caplog.at_level(logging.INFO, logger="ssl_test"):
        _run(engine)
    torch.testing.assert_close(unet.encoder.conv1.weight, before)
    assert handler.report is None and "disabled" in caplog.text


def test_enabled_with_missing_file_fails_early(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        PretrainedEncoderLoader(tmp_path / "missing.pt", network=_unet())


@pytest.mark.parametrize("loader_first", [True, False])
def test_never_overwrites_a_fine_tuned_model(encoder_file, tmp_path, caplog, loader_first):
    finetuned = _unet()
    torch.nn.init.constant_(finetuned.encoder.conv1.weight, 0.5)
    model_pt = tmp_path / "model.pt"
    torch.save({"model": finetuned.state_dict()}, model_pt)

    unet = _unet()
    engine = Engine(lambda e, b: None)
    ckpt = CheckpointLoader(load_path=str(model_pt), load_dict={"model": unet})
    ssl = PretrainedEncoderLoader(encoder_file, network=unet, name="ssl_test")
    for handler in [ckpt, ssl] if loader_first else [ssl, ckpt]:  # MONAI Label inserts it at index 0
        handler.attach(engine)
    with caplog.at_level(logging.INFO, logger="ssl_test"):
        _run(engine)
    assert torch.all(unet.encoder.conv1.weight == 0.5)
    assert ssl.report is None and "skipped" in caplog.text and "model.pt" in caplog.text
