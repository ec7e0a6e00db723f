"""PrototypeHandler: the loss decides whether a level's prototypes train (SwAV) or stay frozen (DC-v2)."""

import pytest
import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from jointssl_monai.handlers import PrototypeHandler
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks import JointSSLNet


@pytest.fixture(scope="module")
def net() -> JointSSLNet:
    sizes = dict(d_model=16, proj_hidden_dim=16, proj_dim=8, num_layers=1, ff_dim=16, heads=2, dim_head=8)
    return JointSSLNet.from_settings("resnet10", intra_prototypes=4, inter_prototypes=[2, 2, 2], **sizes)


def _gradients_after_backward(handler: PrototypeHandler, iterations: int) -> list[bool]:
    """For each iteration: whether the level's prototypes still hold a gradient after BACKWARD_COMPLETED."""
    engine = Engine(lambda engine, batch: None)
    engine.register_events(*IterationEvents)
    handler.attach(engine)
    kept = []
    for iteration in range(1, iterations + 1):
        engine.state.iteration = iteration
        for weight in handler.prototypes.weights():
            weight.grad = torch.ones_like(weight)
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        kept.append(all(w.grad is not None for w in handler.prototypes.weights()))
    return kept


def test_swav_prototypes_freeze_for_the_first_iterations_then_train(net):
    loss = JointSSLLoss("swav", "deepcluster", embedding_dim=8, inter_bank_size=10)
    assert _gradients_after_backward(PrototypeHandler(net, loss, "intra", freeze_iterations=2), 4) == [
        False,
        False,
        True,
        True,
    ]


def test_deepcluster_prototypes_never_train_whatever_the_freeze_setting(net):
    loss = JointSSLLoss("swav", "deepcluster", embedding_dim=8, inter_bank_size=10)
    handler = PrototypeHandler(net, loss, "inter", freeze_iterations=0)
    assert _gradients_after_backward(handler, 3) == [False, False, False]


def test_a_level_the_loss_does_not_use_is_left_alone(net):
    loss = JointSSLLoss("swav", "none")
    handler = PrototypeHandler(net, loss, "inter", freeze_iterations=None)
    assert _gradients_after_backward(handler, 2) == [True, True]
