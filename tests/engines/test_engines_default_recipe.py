"""The default optimiser trains the slice encoder in the steps a user runs; the authors' one is kept."""

from __future__ import annotations

import torch
from monai.bundle import ConfigParser

from jointssl_monai.apps.bundle_commands import find_bundle_dir
from jointssl_monai.engines import build_optimizer
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks import JointSSLNet

CONFIGS = find_bundle_dir() / "configs"


def _recipe(*extra: str) -> dict:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "pretrain.json"), *(str(CONFIGS / e) for e in extra)])
    return {key: parser.get_parsed_content(key) for key in ("optimizer", "lr", "weight_decay")}


def _encoder_change(recipe: dict, steps: int = 5) -> float:
    """Relative change ``||W_T - W_0|| / ||W_0||`` of the encoder's ResNet convolutions after ``steps``."""
    torch.manual_seed(0)
    net = JointSSLNet.from_settings(
        "resnet10",
        d_model=32,
        proj_hidden_dim=32,
        proj_dim=16,
        intra_prototypes=8,
        inter_prototypes=2,
        num_layers=1,
        ff_dim=32,
        heads=2,
        dim_head=8,
    )
    loss = JointSSLLoss(diagnostics=False)
    optimizer = build_optimizer(
        net, name=recipe["optimizer"], lr=recipe["lr"], weight_decay=recipe["weight_decay"]
    )
    weights = [p for n, p in net.encoder.resnet.named_parameters() if p.ndim == 4]
    start = [w.detach().clone() for w in weights]
    gen = torch.Generator().manual_seed(1)
    volumes = torch.randn(4, 1, 6, 32, 32, generator=gen).cumsum(dim=2)  # correlated slices
    for _ in range(steps):
        views = [volumes + 0.3 * torch.randn(volumes.shape, generator=gen) for _ in range(2)]
        out = loss(net(views, torch.tensor([6, 6, 6, 6])))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    moved = sum(float((w.detach() - w0).pow(2).sum()) for w, w0 in zip(weights, start, strict=True))
    return (moved / sum(float(w0.pow(2).sum()) for w0 in start)) ** 0.5


def test_default_recipe_moves_the_encoder_and_the_authors_recipe_is_available():
    default, authors = _recipe(), _recipe("authors_optimizer.json")
    assert authors == {"optimizer": "lars", "lr": 0.01, "weight_decay": 1e-6}
    moved_default, moved_authors = _encoder_change(default), _encoder_change(authors)
    # the authors' LARS (trust 1e-3 x lr 0.01) changes the weights by about 1e-5 per step
    assert moved_default > 0.01, f"default recipe moved the encoder by only {moved_default:.2e}"
    assert moved_default > 20 * moved_authors, (moved_default, moved_authors)
