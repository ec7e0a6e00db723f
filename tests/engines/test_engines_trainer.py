"""The pretraining trainer: memory-bank keys, the non-finite loss guard, prototype freezing, gradient
clipping, autocast and the gradient scaler (and its checkpointing)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from monai.engines.utils import IterationEvents
from monai.handlers import CheckpointLoader
from torch import nn

from jointssl_monai.engines import JointSSLTrainer, NonFiniteLossError, build_optimizer
from jointssl_monai.handlers import AtomicCheckpointSaver, PrototypeHandler
from jointssl_monai.losses import JointSSLLoss
from jointssl_monai.networks import JointSSLNet
from jointssl_monai.utils import precision

SLICES = 4


def tiny_net() -> JointSSLNet:
    torch.manual_seed(0)
    return JointSSLNet.from_settings(
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
        super().__init__("swav", "swav")
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
    loss = JointSSLLoss()
    trainer = make_trainer(net, loss, 4)
    PrototypeHandler(net, loss, "intra", freeze_iterations=2).attach(trainer)
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


@dataclass
class Step:
    """One training iteration of the tiny network: gradients at ``BACKWARD_COMPLETED`` (as back-propagated,
    before unscaling and clipping) and after the step, the weights before and after, the iteration output."""

    trainer: JointSSLTrainer
    backward: dict = field(default_factory=dict)
    grads: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)


def one_step(amp: str = "none", grad_clip_norm: float | None = None, init_scale: float | None = None) -> Step:
    net = tiny_net()
    trainer = JointSSLTrainer(
        device="cpu", max_epochs=1, train_data_loader=[batch(0)], network=net, amp=amp,
        optimizer=torch.optim.SGD(net.parameters(), lr=0.1),  # plain SGD: the update is -lr * gradient
        loss_function=JointSSLLoss(), slices_per_sample=SLICES, grad_clip_norm=grad_clip_norm,
    )  # fmt: skip
    if init_scale is not None:  # the same scaler class, on the same device, with another initial scale
        trainer.scaler = type(trainer.scaler)(trainer.state.device.type, init_scale=init_scale)
    step = Step(trainer, before={n: p.detach().clone() for n, p in net.named_parameters()})

    def grads() -> dict:
        return {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None}

    trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, lambda _: step.backward.update(grads()))
    torch.manual_seed(1)  # the same masks in every call
    trainer.run()
    step.grads, step.output = grads(), trainer.state.output[0]
    step.after = {n: p.detach().clone() for n, p in net.named_parameters()}
    return step


def norm(tensors: dict) -> float:
    return float(
        torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors.values()]))
    )


def test_grad_clip_norm_clips_the_gradient_and_the_step_to_the_limit():
    limit = 0.05
    free, clipped = one_step(), one_step(grad_clip_norm=limit)
    full = norm(free.grads)
    assert full > 10 * limit and "grad_norm" not in free.output
    assert float(clipped.output["grad_norm"]) == pytest.approx(full, rel=1e-5)  # reported before clipping
    assert norm(clipped.grads) == pytest.approx(limit, rel=1e-4)
    assert free.grads.keys() == clipped.grads.keys()
    for name, grad in free.grads.items():
        torch.testing.assert_close(clipped.grads[name], grad * (limit / full), rtol=1e-3, atol=1e-9, msg=name)
        # the step taken is the clipped one (up to float32 rounding of weights near 1)
        step = clipped.before[name] - clipped.after[name]
        torch.testing.assert_close(step, 0.1 * clipped.grads[name], rtol=1e-3, atol=1e-6, msg=name)


def run_recording_conv_dtypes(amp: str) -> tuple[JointSSLTrainer, nn.Module, set[torch.dtype]]:
    """Run one epoch of a tiny network; return the dtypes its first convolution's outputs had."""
    net = tiny_net()
    trainer = make_trainer(net, JointSSLLoss(), 1, amp=amp)
    conv = next(m for m in net.encoder.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    dtypes = []
    conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    trainer.run()
    assert dtypes
    return trainer, net, set(dtypes)


def test_bf16_autocast_runs_the_encoder_in_bf16_with_a_finite_loss_and_no_scaler():
    trainer, net, dtypes = run_recording_conv_dtypes("bf16")
    assert dtypes == {torch.bfloat16}
    assert torch.isfinite(trainer.state.output[0]["loss"])
    assert not trainer.scaler.is_enabled()  # bf16 keeps float32's exponent range
    assert all(p.dtype == torch.float32 for p in net.parameters())  # autocast, not a bf16 model


NATIVE_BF16, NO_BF16 = ("avx2", "avx512_bf16"), ("avx2",)


@pytest.mark.parametrize("flags, expected", [(NATIVE_BF16, torch.bfloat16), (NO_BF16, torch.float32)])
def test_auto_amp_takes_bf16_only_where_the_cpu_computes_it_natively(monkeypatch, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    trainer, _, dtypes = run_recording_conv_dtypes("auto")
    assert dtypes == {expected} and not trainer.scaler.is_enabled()
    assert trainer.amp == ("bf16" if expected is torch.bfloat16 else "none")


def test_fp16_scales_the_loss_and_unscales_before_clipping_on_the_trainers_device():
    # This tiny network's fp16 backward overflows at the default initial scale (65536: the scaler would
    # skip the step and halve it), so it starts at 64.
    limit, scale = 0.05, 64.0
    step = one_step(amp="fp16", grad_clip_norm=limit, init_scale=scale)
    scaler = step.trainer.scaler
    assert scaler.is_enabled() and scaler.get_scale() == scale  # no overflow: the step was taken
    true_norm = float(step.output["grad_norm"])
    assert true_norm > 10 * limit and torch.isfinite(step.output["loss"])
    # back-propagated from the scaled loss ...
    assert norm(step.backward) == pytest.approx(scale * true_norm, rel=1e-3)
    # ... unscaled before clipping, so that the limit applies to the true gradients
    assert norm(step.grads) == pytest.approx(limit, rel=1e-3)
    name = next(iter(step.grads))
    torch.testing.assert_close(
        step.before[name] - step.after[name], 0.1 * step.grads[name], rtol=1e-3, atol=1e-6
    )
    # the default trainer makes its scaler on its own device (here the CPU), enabled for fp16 only
    for amp, enabled in (("fp16", True), ("bf16", False), ("none", False)):
        trainer = make_trainer(tiny_net(), JointSSLLoss(), 1, amp=amp)
        assert trainer.scaler.is_enabled() == enabled and trainer.scaler._device == "cpu", amp


def test_the_gradient_scaler_is_checkpointed_and_resumed(tmp_path):
    configs = Path(__file__).resolve().parents[2] / "bundle" / "configs"
    objects = ConfigParser.load_config_file(configs / "pretrain.json")["checkpoint_objects"]
    assert objects["scaler"] == "$@train#trainer.scaler"  # saved and resumed with the trainer

    def trainer(amp: str) -> JointSSLTrainer:
        return make_trainer(tiny_net(), JointSSLLoss(), 1, amp=amp)

    saved = trainer("fp16")
    saved.scaler.scale(torch.ones(()))  # the scale exists from the first scaled loss on
    saved.scaler.update(new_scale=96.0)
    path = AtomicCheckpointSaver(tmp_path, {"trainer": saved, "scaler": saved.scaler}).save_periodic(saved)
    resumed = trainer("fp16")
    assert resumed.scaler.get_scale() != 96.0
    CheckpointLoader(str(path), {"trainer": resumed, "scaler": resumed.scaler})(resumed)
    assert resumed.scaler.get_scale() == 96.0
    # a checkpoint of a run without fp16 (a disabled scaler, empty state) resumes with fp16 at the initial
    # scale, and the other way round the saved scale is ignored
    plain = trainer("none")
    path = AtomicCheckpointSaver(tmp_path / "plain", {"scaler": plain.scaler}).save_periodic(plain)
    switched = trainer("fp16")
    CheckpointLoader(str(path), {"scaler": switched.scaler})(switched)
    assert switched.scaler.is_enabled() and switched.scaler.get_scale() == 65536.0
