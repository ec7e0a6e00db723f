"""The value benchmark's page: paired gains and their 95 % intervals against hand-computed values."""

from __future__ import annotations

import json
import math

import pytest
from conftest import require_module

from jointssl_monai.apps.value_report import (
    _t95,
    ablation_table,
    load_value_results,
    markdown_table,
    paired_gain,
    training_table,
    value_table,
)


def _rows(gains, seeds=None):
    seeds = list(range(len(gains))) if seeds is None else seeds
    rows = [{"task": "t", "setting": "s", "init": "random", "seed": s, "score": 0.5} for s in seeds]
    rows += [
        {"task": "t", "setting": "s", "init": "ssl", "seed": s, "score": 0.5 + g}
        for s, g in zip(seeds, gains, strict=True)
    ]
    return rows


def test_paired_gain_is_the_mean_difference_with_a_student_t_interval():
    gains = [0.02, 0.05, -0.01, 0.04, 0.03]
    result = paired_gain(_rows(gains))
    mean = sum(gains) / 5
    sd = math.sqrt(sum((g - mean) ** 2 for g in gains) / 4)
    half = 2.776 * sd / math.sqrt(5)  # t(0.975, df=4)
    assert result["pairs"] == 5
    assert result["gain"] == pytest.approx(mean) and result["low"] == pytest.approx(mean - half)
    assert result["high"] == pytest.approx(mean + half)
    # only seeds present in both arms are paired; one pair is no interval
    unpaired = [
        *_rows([0.1, 0.2, 0.3]),
        {"task": "t", "setting": "s", "init": "ssl", "seed": 9, "score": 9.0},
    ]
    assert paired_gain(unpaired)["gain"] == pytest.approx(0.2)
    assert paired_gain(_rows([0.1])) is None


def test_table_lists_every_initialisation_and_the_gain():
    rows = [
        *_rows([0.1, 0.1, 0.1]),
        {"task": "t", "setting": "s", "init": "threshold", "seed": 0, "score": 0.9},
    ]
    header, table = value_table(rows)
    assert header[2:4] == ["ssl (mean, n)", "random (mean, n)"] and header[4] == "threshold (mean, n)"
    assert table == [["t", "s", "0.600 (3)", "0.500 (3)", "0.900 (1)", "+0.100 [+0.100, +0.100] (3 pairs)"]]
    markdown = markdown_table(rows).splitlines()
    assert markdown[0] == "| " + " | ".join(header) + " |" and markdown[1] == "|---|---|---|---|---|---|"
    assert markdown[2] == "| t | s | 0.600 (3) | 0.500 (3) | 0.900 (1) | +0.100 [+0.100, +0.100] (3 pairs) |"


def test_ablation_table_gives_each_objectives_paired_gain_over_random():
    rows = _rows([0.1, 0.3]) + [
        {"task": "t", "setting": "s", "init": "ssl intra", "seed": s, "score": 0.5 - g}
        for s, g in enumerate([0.2, 0.4])
    ]
    rows += [
        {"task": "t", "setting": "only one", "init": i, "seed": 0, "score": 0.5} for i in ("ssl", "random")
    ]
    lines = ablation_table(rows, ["ssl", "ssl intra", "ssl intra+mask"]).splitlines()
    assert lines[0] == "| task | setting | ssl - random | ssl intra - random | ssl intra+mask - random |"
    # gains 0.1, 0.3: mean 0.2, sd 0.1414, t(df=1) 12.706 -> half width 1.271; the second setting has no pairs
    assert lines[2:] == ["| t | s | +0.200 [-1.071, +1.471] | -0.300 [-1.571, +0.971] | - |"]


def test_training_table_says_how_each_fine_tuning_ended():
    runs = [(400, 1.0, 0.02), (300, 1.0, 0.01), (3000, 0.0, 0.2)]
    rows = [
        {"task": "t", "setting": "s", "init": "ssl", "seed": i, "score": 0.5, "steps": n, "converged": c,
         "final_loss": loss}
        for i, (n, c, loss) in enumerate(runs)
    ]  # fmt: skip
    rows.append({"task": "t", "setting": "s", "init": "intensity", "seed": 0, "score": 0.4})  # no training
    lines = training_table(rows).splitlines()
    assert lines[0] == "| task | setting | init | converged | steps (median, range) | last loss |"
    assert lines[2:] == ["| t | s | ssl | 2 of 3 | 400 (300-3000) | 0.020 |"]


def test_bad_result_files_are_named(tmp_path):
    path = tmp_path / "ssl_value.json"
    path.write_text(json.dumps({"rows": [{"task": "t", "setting": "s", "init": "ssl", "seed": 0}]}))
    with pytest.raises(ValueError, match=r"ssl_value\.json: rows\[0\] lacks \['score'\]"):
        load_value_results(path)
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="non-empty 'rows'"):
        load_value_results(path)


def test_t_quantiles_equal_scipys():
    """The interval's Student-t quantiles against scipy's; between table entries the next smaller degree of
    freedom is used, which can only widen the interval."""
    stats = require_module("scipy.stats", distribution="scipy")  # installed with mlflow (dev extra)

    for df in (*range(1, 16), 20, 30, 60, 120):
        assert _t95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df
    for df in (17, 25, 45, 100):
        assert _t95(df) >= stats.t.ppf(0.975, df)
    assert _t95(1000) == pytest.approx(stats.norm.ppf(0.975), abs=1e-3)
