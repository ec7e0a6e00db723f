"""The value benchmark's parts, on the real images: tasks, probes, retrieval, baselines, data, budget."""

from __future__ import annotations

import shutil

import pytest
import torch

from jointssl_monai.apps.slicewise import Volume
from jointssl_monai.apps.ssl_value import (
    LOBE_PREFIXES,
    ProbeFeatures,
    SliceTask,
    aal_lobes,
    brain_extraction_task,
    epoch_seconds,
    epochs_within_budget,
    finetune_dice,
    intensity_rule,
    linear_probe,
    pixel_embedding,
    position_retrieval,
    value_datalist,
)


@pytest.fixture(scope="module")
def brain(tmp_path_factory, colin27_t1, itk_t1) -> SliceTask:
    return brain_extraction_task(tmp_path_factory.mktemp("value"), pixdim=3.0)


class LabelEncoder(torch.nn.Module):
    """A stand-in encoder whose only feature map is what the probe is given to find: an oracle when
    ``answer`` holds the labels slice by slice, nothing when it is zero."""

    def __init__(self, answer: torch.Tensor) -> None:
        super().__init__()
        self.answer, self.calls = answer, 0

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.answer[self.calls : self.calls + len(x)]
        self.calls += len(x)
        return [maps]


def test_aal_regions_group_into_lobes(colin27_aal):
    lobes = aal_lobes(colin27_aal.with_name("aal.nii.txt"))
    assert len(lobes) == 116 and set(lobes.values()) == set(range(1, len(LOBE_PREFIXES) + 2))
    rows = [
        line.split() for line in colin27_aal.with_name("aal.nii.txt").read_text().splitlines() if line.strip()
    ]
    names = {row[1]: int(row[0]) for row in rows}
    expected = {"Precentral_L": 1, "Angular_R": 2, "Heschl_L": 3, "Calcarine_R": 4, "Vermis_3": 5}
    assert {name: lobes[names[name]] for name in expected} == expected
    assert lobes[names["Hippocampus_L"]] == lobes[names["Thalamus_R"]] == 6


def test_labelled_slices_are_seeded_distinct_and_from_the_candidates(brain):
    foreground = set(torch.nonzero(brain.train.label.flatten(0, 1).any(0)).flatten().tolist())
    picks = brain.picks(5, seed=3)
    assert picks == brain.picks(5, seed=3) and picks != brain.picks(5, seed=4)
    assert len(set(picks)) == 5 and set(picks) <= foreground
    thin = brain.labelled(2, seed=0)
    assert thin.image.shape[-1] == 2 and torch.equal(thin.label, brain.train.label[..., brain.picks(2, 0)])
    only = SliceTask("t", brain.train, brain.test, 2, candidates=[10, 11])
    assert sorted(only.picks(2, seed=9)) == [10, 11]


def test_the_probe_learns_from_the_features_and_scores_the_held_out_volume(brain):
    """An oracle feature map gives a perfect held-out Dice, an empty one the Dice of a constant guess."""
    size = 32

    def one_hot_labels(volume: Volume) -> torch.Tensor:
        from jointssl_monai.apps.ssl_value import _axial

        _, labels = _axial(volume, size)
        return torch.nn.functional.one_hot(labels, 2).permute(0, 3, 1, 2).float()

    oracle = torch.cat([one_hot_labels(brain.train), one_hot_labels(brain.test[0])])
    perfect = linear_probe(ProbeFeatures(brain, LabelEncoder(oracle), size), count=2, seed=0)
    blind = linear_probe(ProbeFeatures(brain, LabelEncoder(torch.zeros_like(oracle)), size), count=2, seed=0)
    assert perfect == pytest.approx(1.0, abs=1e-6)
    assert blind < 0.6


def test_finetuning_reports_whether_the_plateau_rule_or_the_step_cap_ended_it(brain):
    """The fine-tuning row says how training ended: stopped by the plateau rule (an improvement no window can
    reach stops it after the third window) or by the step cap, with the mean loss of its last window."""
    plateau = finetune_dice(brain, "resnet10", None, count=1, seed=0, size=32, max_steps=40, window=3,
                            min_delta=10.0)  # fmt: skip
    capped = finetune_dice(brain, "resnet10", None, count=1, seed=0, size=32, max_steps=4, window=3)
    assert (plateau["steps"], plateau["converged"]) == (9, 1.0)
    assert (capped["steps"], capped["converged"]) == (4, 0.0)
    assert 0.0 <= plateau["score"] <= 1.0 and plateau["final_loss"] > 0


def test_the_intensity_rule_is_a_real_baseline_on_brain_extraction(brain):
    """On the unstripped head, intensity alone finds much of the brain, not all of it (skull and scalp are
    bright too): the rule the networks must beat."""
    scores = [intensity_rule(brain, count=5, seed=s, size=32) for s in range(2)]
    assert all(0.3 < s < 0.95 for s in scores), scores


def test_position_retrieval_scores_position_errors(brain):
    """A subject retrieved against itself by its own pixels is placed exactly; a constant embedding puts
    every slice at one position."""
    same = position_retrieval(brain.train, brain.train, pixel_embedding, 32)
    constant = position_retrieval(brain.train, brain.test[0], lambda x: torch.ones(len(x), 4), 32)
    assert same == pytest.approx(1.0) and constant < 0.8


def test_value_datalist_leaves_out_atlases_fixtures_and_the_held_out_subject(
    tmp_path, colin27_t1, colin27_aal, itk_t1, nibabel_anatomical
):
    folder = tmp_path / "images"
    folder.mkdir()
    for source in (colin27_t1, colin27_aal, itk_t1, nibabel_anatomical):
        shutil.copy(source, folder / source.name)
    path, info = value_datalist(tmp_path / "datalist.json", [folder], min_in_plane=40)
    reasons = {entry["file"].split("/")[-1]: entry["reason"] for entry in info["left_out"]}
    assert info["volumes"] == 1 and info["images"] == 0 and path.is_file()
    assert reasons[itk_t1.name] == "held-out test subject"
    assert reasons[colin27_aal.name].startswith("label map")
    assert reasons[nibabel_anatomical.name].startswith("smaller than 40 pixels")


def test_the_budget_sizes_the_schedule_from_a_timed_calibration():
    log = "Epoch[1] Complete. Time taken: 00:00:30.000\nEpoch[2] Complete. Time taken: 00:00:10.500"
    assert epoch_seconds(log) == [30.0, 10.5]
    # 20 s start-up, a 30 s first epoch, then 10 s epochs: 600 s hold 1 + 55 epochs
    assert epochs_within_budget([30.0, 10.0], wall=60.0, budget_s=600.0) == 56
    assert epochs_within_budget([30.0, 10.0], wall=60.0, budget_s=30.0) == 2
