"""Does bf16 autocast train like float32? Short real-data pretraining runs of the demo (the bundle, the demo's
real images and model) under both settings and several seeds, their loss curves compared against the spread
between seeds."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from jointssl_monai.apps.bundle_commands import run_demo

__all__ = ["compare_curves", "run_amp_check"]

#: the per-epoch losses compared
LOSS_KEYS = ("loss", "loss_intra", "loss_inter", "loss_mask")


def compare_curves(curves: dict[str, list[list[dict[str, float]]]]) -> dict[str, Any]:
    """Compare the loss curves of two settings run with the same seeds.

    Args:
        curves: setting (``"none"``, ``"bf16"``) -> one history per seed (a list of per-epoch dicts holding
            :data:`LOSS_KEYS`), seeds in the same order under both settings.

    Returns:
        per loss: the last epoch's mean and standard deviation over seeds for each setting, the largest
        per-epoch gap between the settings' means, and the typical seed spread (the median over epochs of the
        float32 standard deviation); ``within_seed_noise`` says whether every last-epoch gap is at most twice
        the last epoch's float32 seed spread.
    """
    reference, other = curves["none"], curves["bf16"]
    if len(reference) != len(other) or len(reference) < 2:
        raise ValueError("need the same seeds (at least 2) under both settings")
    epochs = min(len(h) for h in reference + other)
    report: dict[str, Any] = {"seeds": len(reference), "epochs": epochs, "losses": {}}
    within = True
    for key in LOSS_KEYS:
        if not all(key in h[0] for h in reference + other):
            continue

        def at(histories: list[list[dict[str, float]]], epoch: int, k: str = key) -> list[float]:
            return [h[epoch][k] for h in histories]

        gaps = [abs(statistics.mean(at(other, e)) - statistics.mean(at(reference, e))) for e in range(epochs)]
        spread = [statistics.stdev(at(reference, e)) for e in range(epochs)]
        last = epochs - 1
        entry = {
            "fp32_last_mean": statistics.mean(at(reference, last)),
            "fp32_last_sd": statistics.stdev(at(reference, last)),
            "bf16_last_mean": statistics.mean(at(other, last)),
            "bf16_last_sd": statistics.stdev(at(other, last)),
            "last_gap": gaps[last],
            "largest_gap": max(gaps),
            "median_seed_sd": statistics.median(spread),
        }
        entry["last_gap_over_seed_sd"] = entry["last_gap"] / max(entry["fp32_last_sd"], 1e-12)
        within = within and entry["last_gap"] <= 2 * entry["fp32_last_sd"]
        report["losses"][key] = entry
    report["within_seed_noise"] = within
    return report


def run_amp_check(
    work_dir: str | Path, seeds: tuple[int, ...] = (0, 1, 2), max_epochs: int = 20
) -> dict[str, Any]:
    """Pretrain the demo (:func:`~jointssl_monai.apps.bundle_commands.run_demo`) under ``amp="none"`` and
    ``amp="bf16"`` for each seed (interleaved: seed 0 both settings, then seed 1, ...), and compare the loss
    curves (:func:`compare_curves`)."""
    curves: dict[str, list[list[dict[str, float]]]] = {"none": [], "bf16": []}
    minutes: dict[str, list[float]] = {"none": [], "bf16": []}
    for seed in seeds:
        for amp in ("none", "bf16"):
            output = Path(work_dir) / f"{amp}_seed{seed}"
            run = run_demo(output, max_epochs=max_epochs, report=False, amp=amp, seed=seed)
            minutes[amp].append(run["minutes"])
            history = json.loads(Path(run["loss_history"]).read_text())["epochs"]
            curves[amp].append([{k: e[k] for k in LOSS_KEYS if k in e} for e in history])
    report = compare_curves(curves)
    report.update({"max_epochs": max_epochs, "seed_list": list(seeds), "minutes": minutes, "curves": curves})
    return report
