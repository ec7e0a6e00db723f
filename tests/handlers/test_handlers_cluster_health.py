"""ClusterHealthHandler: collapse warnings that repeat while a collapse lasts, and the slice-token spread."""

import logging

import pytest
import torch
from ignite.engine import Engine

from jointssl_monai.handlers import ClusterHealthHandler
from jointssl_monai.losses import token_spread


def _run(outputs: list[dict], caplog: pytest.LogCaptureFixture, **kwargs) -> tuple[Engine, list[str]]:
    engine = Engine(lambda engine, batch: [outputs[engine.state.iteration - 1]])
    ClusterHealthHandler(interval=1, **kwargs).attach(engine)
    with caplog.at_level(logging.WARNING, logger="jointssl_monai.handlers.cluster_health"):
        engine.run(range(len(outputs)), max_epochs=1)
    return engine, [r.getMessage() for r in caplog.records]


def _stats(share: float, spread: float | None = None) -> dict:
    out = {"inter_normalized_entropy": 0.0, "inter_clusters_used": 1, "inter_largest_share": share}
    return out if spread is None else {**out, "mask_token_spread": spread}


def test_collapse_warning_repeats_while_it_lasts(caplog):
    outputs = [_stats(1.0)] * 25 + [_stats(0.2)] * 3 + [_stats(1.0)] * 3
    engine, messages = _run(outputs, caplog, patience=3, repeat_every=10)
    at = [int(m.split("iteration ")[1].split(")")[0]) for m in messages if "inter level" in m]
    assert at == [3, 13, 23, 31]  # at patience, every 10 checks while collapsed, and again after a recovery
    assert engine.state.metrics["inter_largest_share"] == 1.0


def test_token_spread_collapse_is_reported(caplog):
    outputs = [_stats(0.2, 1e-5)] * 4 + [_stats(0.2, 0.3)]
    engine, messages = _run(outputs, caplog, patience=2, min_token_spread=1e-3)
    assert len([m for m in messages if "slice-token collapse" in m]) == 1
    assert engine.state.metrics["mask_token_spread"] == pytest.approx(0.3)


def test_token_spread_measures_variation_across_slices():
    gen = torch.Generator().manual_seed(0)
    same = torch.randn(2, 1, 8, generator=gen).expand(2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool)
    assert token_spread(same, valid) == pytest.approx(0.0, abs=1e-12)
    centred = torch.randn(2, 5, 8, generator=gen)
    centred = centred - centred.mean(dim=1, keepdim=True)
    assert token_spread(centred, valid) == pytest.approx(1.0)
    # scale-free, padded slices ignored, one-slice volumes left out
    noisy = same + 0.1 * torch.randn(2, 5, 8, generator=gen)
    padded = torch.cat([noisy, 100 * torch.ones(2, 3, 8)], dim=1)
    mask = torch.cat([valid, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    assert token_spread(padded, mask) == pytest.approx(token_spread(7 * noisy, valid))
    one = mask.clone()
    one[1, 1:] = False
    assert token_spread(padded, one) == pytest.approx(token_spread(noisy[:1], valid[:1]))
