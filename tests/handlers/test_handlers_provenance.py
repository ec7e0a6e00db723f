"""RunProvenanceHandler: one record per run, naming the checkpoint a resumed run loaded and its start."""

import json

import pytest
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader

from jointssl_monai.handlers import RunProvenanceHandler


def _engine() -> Engine:
    return Engine(lambda engine, batch: None)


def _runs(path) -> list[dict]:
    return json.loads(path.read_text())["runs"]


def test_a_fresh_run_then_a_resumed_one_from_its_checkpoint(tmp_path):
    out, checkpoint = tmp_path / "provenance.json", tmp_path / "checkpoint_iteration=6.pt"
    first = _engine()
    RunProvenanceHandler(out).attach(first)
    first.run(range(3), max_epochs=2)
    torch.save({"trainer": first.state_dict()}, checkpoint)

    resumed = _engine()
    loader = CheckpointLoader(load_path=str(checkpoint), load_dict={"trainer": resumed})
    loader.attach(resumed)  # before the provenance handler, as in pretrain.json
    RunProvenanceHandler(out, checkpoint_loader=loader).attach(resumed)
    resumed.run(range(3), max_epochs=5)

    fresh, second = _runs(out)
    assert fresh == {"resumed_from": None, "start_iteration": 0, "start_epoch": 0, "epoch_length": 3,
                     "max_epochs": 2, "end_iteration": 6, "end_epoch": 2, "iterations_run": 6,
                     "completed": True, "skipped_inputs": [], "skipped_steps": 0}  # fmt: skip
    assert second == {"resumed_from": str(checkpoint), "start_iteration": 6, "start_epoch": 2,
                      "epoch_length": 3, "max_epochs": 5, "end_iteration": 15, "end_epoch": 5,
                      "iterations_run": 9, "completed": True, "skipped_inputs": [],
                      "skipped_steps": 0}  # fmt: skip


def test_an_interrupted_run_leaves_its_start_and_the_position_after_every_started_handler(tmp_path):
    out = tmp_path / "provenance.json"
    engine = _engine()
    RunProvenanceHandler(out).attach(engine)

    @engine.on(Events.STARTED)  # after the handler, like the trainer's epoch-length adaptation
    def move(engine):
        engine.state.iteration, engine.state.epoch = 4, 2

    @engine.on(Events.ITERATION_COMPLETED(once=5))
    def crash(engine):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.run(range(2), max_epochs=4)
    [run] = _runs(out)
    assert run["resumed_from"] is None and (run["start_iteration"], run["start_epoch"]) == (4, 2)
    assert not run["completed"] and run["end_iteration"] is None


def test_checkpoint_loader_must_be_a_loader(tmp_path):
    with pytest.raises(TypeError, match="CheckpointLoader"):
        RunProvenanceHandler(tmp_path / "p.json", checkpoint_loader=object())


def test_bad_inputs_met_again_and_again_are_recorded_once(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "engines"))
    from test_engines_trainer import SLICES, batch, tiny_net

    from jointssl_monai.engines import JointSSLTrainer, build_optimizer
    from jointssl_monai.losses import JointSSLLoss

    bad = [("a.nii.gz", "a.nii.gz: unreadable image"), ("b.png", "b.png: truncated")]
    empty = {**dict.fromkeys(batch(0)), "skipped_inputs": bad}  # both items of a batch were bad
    batches = [{**batch(0), "skipped_inputs": bad[:1]}, empty, {**batch(1), "skipped_inputs": []}]
    net, out = tiny_net(), tmp_path / "provenance.json"
    trainer = JointSSLTrainer(
        device="cpu", max_epochs=2, train_data_loader=batches, network=net,
        optimizer=build_optimizer(net, "sgd", lr=0.1), loss_function=JointSSLLoss(), slices_per_sample=SLICES,
    )  # fmt: skip
    RunProvenanceHandler(out).attach(trainer)
    trainer.run()
    [record] = _runs(out)
    assert record["skipped_inputs"] == [{"image": name, "reason": why} for name, why in bad]
    assert record["skipped_steps"] == 2  # the empty batch, in each of the 2 epochs
