"""The pretraining trainer: memory-bank keys, the non-finite loss guard, prototype freezing."""

from __future__ import annotations

import copy

import pytest
import torch
from ignite.engine import Events

from jointssl_monai.engines import JointSSLTrainer, NonFiniteLossError, build_optimizer
from jointssl_monai.handlers import PrototypeHandler
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks import JointSSLNet

SLICES = 4


def tiny_net() -> JointSSLNet:
    torch.manual_seed(0)
    return JointSSLNet(
        backbone="resnet10", d_model=16, proj_hidden_dim=16, proj_dim=8, intra_prototypes=5,
        inter_prototypes=3, num_layers=1, ff_dim=16, heads=2, dim_head=8,
    )  # fmt: skip


def batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    volume = torch.rand(2, 1, SLICES, 32, 32, generator=g)
    images = torch.rand(2, 1, 32, 32, generator=g)
    return {
        "volume_views": [volume, volume.flip(-1)], "num_slices": torch.tensor([SLICES, 2]),
        "volume_index": torch.tensor([7, 3]), "image_views": [images, images.flip(-2)],
        "image_index": torch.tensor([0, 5]), "image_local_views": None,
    }  # fmt: skip


class PoisonedLoss(JointSSLLoss):
    """The joint loss, with its inter component turned into NaN from a given call on."""

    def __init__(self, poison_from: int) -> None:
        super().__init__(intra="swav", inter="swav")
        self.calls, self.poison_from = 0, poison_from

    def forward(self, output, **kwargs):
        self.calls += 1
        if self.calls >= self.poison_from:
            output.inter.scores[0][0] = output.inter.scores[0][0] * float("nan")
        return super().forward(output, **kwargs)


def make_trainer(net, loss, iterations: int, **kwargs) -> JointSSLTrainer:
    return JointSSLTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch(i) for i in range(iterations)], network=net,
        optimizer=build_optimizer(net, "sgd", lr=0.1), loss_function=loss, slices_per_sample=SLICES, **kwargs,
    )  # fmt: skip


def test_memory_keys_follow_dataset_index_and_slice():
    net = tiny_net()
    trainer = make_trainer(net, JointSSLLoss(), 1)
    output = net(**{k: v for k, v in batch(0).items() if "index" not in k})
    intra_keys, inter_keys = trainer.memory_keys(batch(0), output)
    # Volume 7 has 4 valid slices, volume 3 has 2, then the images 0 and 5 (slice 0).
    expected = [7 * SLICES + s for s in range(4)] + [3 * SLICES + s for s in range(2)] + [0, 5 * SLICES]
    assert intra_keys.tolist() == expected
    assert inter_keys.tolist() == [7, 3]


def test_nonfinite_loss_stops_before_the_step_naming_iteration_and_component():
    net = tiny_net()
    trainer = make_trainer(net, PoisonedLoss(poison_from=3), 5)
    weights_after_step_2 = {}

    @trainer.on(Events.ITERATION_COMPLETED(once=2))
    def keep(engine):
        weights_after_step_2.update(copy.deepcopy(net.state_dict()))

    with pytest.raises(NonFiniteLossError, match=r"iteration 3 .*component\(s\) inter") as err:
        trainer.run()
    assert "intra=" in str(err.value) and "last checkpoint is intact" in str(err.value)
    for key, value in net.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics move in forward
            torch.testing.assert_close(value, weights_after_step_2[key], msg=key)


def test_nonfinite_loss_skip_policy_drops_only_bad_steps():
    net = tiny_net()
    before = copy.deepcopy(net.state_dict())
    trainer = make_trainer(net, PoisonedLoss(poison_from=1), 3, nonfinite_policy="skip")
    trainer.run()
    assert trainer.state.skipped_steps == 3 and trainer.state.iteration == 3
    for key, value in net.state_dict().items():
        if "running" not in key and "num_batches" not in key:  # BatchNorm statistics move in forward
            torch.testing.assert_close(value, before[key], msg=key)


def test_prototypes_frozen_then_trained_and_kept_normalised():
    net = tiny_net()
    trainer = make_trainer(net, JointSSLLoss(), 4)
    PrototypeHandler(net, "intra_prototypes", freeze_iterations=2).attach(trainer)
    history, norms = [], []

    @trainer.on(Events.ITERATION_STARTED)
    def record_norms(engine):  # runs after the handler's normalisation, attached first
        norms.append(net.intra_prototypes.heads[0].weight.detach().norm(dim=1))

    @trainer.on(Events.ITERATION_COMPLETED)
    def record(engine):
        history.append(net.intra_prototypes.heads[0].weight.detach().clone())

    initial = net.intra_prototypes.heads[0].weight.detach().clone()
    trainer.run()
    torch.testing.assert_close(history[0], initial)
    torch.testing.assert_close(history[1], initial)
    assert not torch.allclose(history[2], history[1])
    # Back on the unit sphere at the start of every iteration, although the steps move them off it.
    for norm in norms:
        torch.testing.assert_close(norm, torch.ones(5))
    assert not torch.allclose(history[-1].norm(dim=1), torch.ones(5))


def test_a_batch_of_only_skipped_inputs_is_passed_over():
    net = tiny_net()
    trainer = JointSSLTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch(0), dict.fromkeys(batch(0)), batch(1)],
        network=net, optimizer=build_optimizer(net, "sgd", lr=0.1), loss_function=JointSSLLoss(),
        slices_per_sample=SLICES,
    )  # fmt: skip
    trainer.run()
    assert trainer.state.iteration == 3 and trainer.state.skipped_steps == 1
