"""LARS trust ratio and the warm-up + cosine schedule."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from jointssl_monai.engines.optim import LARS, build_optimizer, parameter_groups, warmup_cosine_lambda


def test_lars_step_scales_by_trust_ratio():
    weight = nn.Parameter(torch.tensor([3.0, 4.0]).reshape(1, 2))  # ||w|| = 5
    weight.grad = torch.tensor([[0.6, 0.8]])  # ||g|| = 1
    optimizer = LARS([{"params": [weight]}], lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=0.02)
    optimizer.step()
    ratio = 0.02 * 5.0 / 1.0
    torch.testing.assert_close(
        weight.detach(), torch.tensor([[3.0 - 0.1 * ratio * 0.6, 4.0 - 0.1 * ratio * 0.8]])
    )


def test_lars_leaves_bias_and_norm_groups_plain():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    groups = parameter_groups(net, weight_decay=1e-4)
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert all(p.ndim == 1 for p in groups[1]["params"]) and len(groups[1]["params"]) == 3
    bias = groups[1]["params"][0]
    bias.grad = torch.ones_like(bias)
    before = bias.detach().clone()
    optimizer = LARS(groups, lr=0.5, momentum=0.0, weight_decay=1e-4)
    optimizer.step()
    # Plain SGD on the bias: no trust ratio, no weight decay.
    torch.testing.assert_close(bias.detach(), before - 0.5)


def test_frozen_parameters_are_not_optimised():
    net = nn.Linear(2, 2)
    net.weight.requires_grad_(False)
    groups = parameter_groups(net, 0.0)
    assert sum(len(g["params"]) for g in groups) == 1


@pytest.mark.parametrize(
    "name, kind", [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)]
)
def test_build_optimizer(name, kind):
    assert isinstance(build_optimizer(nn.Linear(2, 2), name=name), kind)


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        build_optimizer(nn.Linear(2, 2), name="adam")


def test_warmup_then_cosine():
    schedule = warmup_cosine_lambda(warmup_iterations=4, total_iterations=14, final_ratio=0.1)
    values = [schedule(i) for i in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(values[4:]))
    assert schedule(14) == pytest.approx(0.1)
    assert schedule(9) == pytest.approx(0.1 + 0.9 * 0.5)
