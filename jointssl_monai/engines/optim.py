"""Optimiser and learning-rate schedule of the pretraining recipe.

The authors train with SGD wrapped by a LARS-style trust ratio (as SwAV does with LARC), a base learning rate
of 0.01, weight decay 1e-6, 10 warm-up epochs then a cosine decay (DESIGN.md §1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from jointssl_monai.utils.arguments import check_int, check_number

__all__ = ["LARS", "build_optimizer", "parameter_groups", "warmup_cosine_lambda", "warmup_cosine_scheduler"]


class LARS(torch.optim.SGD):
    """SGD whose per-tensor step is scaled by a layer-wise trust ratio.

    The trust ratio ``eta * ||w|| / (||g|| + wd * ||w||)`` (You et al., "Large Batch Training of Convolutional
    Networks", 2017) is applied to parameter groups with ``lars=True`` only; biases and normalisation weights
    are conventionally left out. With ``clip=True`` the effective rate is ``min(ratio, lr) / lr`` times the
    base rate, as in LARC's clipping mode.

    Args:
        params: parameters or parameter groups (a group may set ``lars``).
        lr: base learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty, folded into the gradient before the trust ratio.
        trust_coefficient: ``eta`` of the trust ratio.
        clip: clip the adapted rate at the base rate.
        eps: guards the ratio against zero norms.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        trust_coefficient: float = 0.001,
        clip: bool = False,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=0.0)
        for group in self.param_groups:
            group.setdefault("lars", True)
            group.setdefault("lars_weight_decay", weight_decay)
        self.trust_coefficient = trust_coefficient
        self.clip = clip
        self.eps = eps

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        for group in self.param_groups:
            decay = group["lars_weight_decay"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad
                if decay:
                    grad.add_(param, alpha=decay)
                if not group["lars"]:
                    continue
                weight_norm = torch.linalg.vector_norm(param)
                grad_norm = torch.linalg.vector_norm(grad)
                ratio = self.trust_coefficient * weight_norm / (grad_norm + self.eps)
                if self.clip:
                    ratio = torch.clamp(ratio / group["lr"], max=1.0)
                # Zero norms (fresh zero-initialised weights, vanishing gradients) keep the plain SGD step.
                ratio = torch.where((weight_norm > 0) & (grad_norm > 0), ratio, torch.ones_like(ratio))
                grad.mul_(ratio)
        return super().step(closure)


def parameter_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into two groups: weights (decayed, LARS-adapted) and biases/norms (neither).

    Frozen parameters (``requires_grad=False``) are left out.
    """
    decayed, plain = [], []
    for param in network.parameters():
        if not param.requires_grad:
            continue
        (plain if param.ndim <= 1 else decayed).append(param)
    return [
        {"params": decayed, "weight_decay": weight_decay, "lars_weight_decay": weight_decay, "lars": True},
        {"params": plain, "weight_decay": 0.0, "lars_weight_decay": 0.0, "lars": False},
    ]


def build_optimizer(
    network: nn.Module,
    name: str = "lars",
    lr: float = 0.01,
    weight_decay: float = 1e-6,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Make the optimiser named in the config: ``"lars"`` (SGD + trust ratio), ``"sgd"`` or ``"adamw"``."""
    check_number("lr", lr, 0, exclusive_minimum=True)
    check_number("weight_decay", weight_decay, 0)
    groups = parameter_groups(network, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        for group in groups:
            group.pop("lars")
            group.pop("lars_weight_decay")
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be one of 'lars', 'sgd', 'adamw', got {name!r}")


def warmup_cosine_lambda(warmup_iterations: int, total_iterations: int, final_ratio: float = 0.0):
    """Multiplier of the base rate: linear warm-up from ~0 to 1, then cosine decay to ``final_ratio``."""
    if total_iterations < 1:
        raise ValueError(f"total_iterations must be >= 1, got {total_iterations}")
    warmup_iterations = max(0, min(warmup_iterations, total_iterations))

    def multiplier(iteration: int) -> float:
        if iteration < warmup_iterations:
            return (iteration + 1) / warmup_iterations
        span = max(1, total_iterations - warmup_iterations)
        progress = min(1.0, (iteration - warmup_iterations) / span)
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_epochs: int,
    max_epochs: int,
    iterations_per_epoch: int,
    final_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-iteration warm-up + cosine schedule.

    Step it every iteration, e.g. with ``LrScheduleHandler(epoch_level=False)``.
    """
    check_int("max_epochs", max_epochs, 1)
    check_int("warmup_epochs", warmup_epochs, 0)
    if warmup_epochs > max_epochs:
        raise ValueError(f"warmup_epochs must be <= max_epochs ({max_epochs}), got {warmup_epochs}")
    total = max_epochs * iterations_per_epoch
    warmup = warmup_epochs * iterations_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine_lambda(warmup, total, final_ratio))
