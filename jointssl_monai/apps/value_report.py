"""The value benchmark's results in the report: paired gains of SSL over random initialisation, per seed.

The benchmark writes ``bench_results/ssl_value.json``; this module defines the part of that file the report
reads, so that the benchmark and the page agree on one contract::

    {"metric": "dice",
     "rows": [{"task": "brain extraction", "setting": "probe", "init": "ssl", "seed": 0, "score": 0.81},
              {"task": "brain extraction", "setting": "probe", "init": "random", "seed": 0, "score": 0.77},
              {"task": "brain extraction", "setting": "probe", "init": "threshold", "seed": 0, ...}, ...]}

Every ``(task, setting)`` is one row of the table: the mean score of every initialisation, and the paired
gain ``ssl - random`` over the seeds both have, with its 95 % confidence interval (Student's t).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "VALUE_FILE",
    "ablation_table",
    "draw_value",
    "load_value_results",
    "markdown_table",
    "paired_gain",
    "training_table",
    "value_table",
]

#: Where the value benchmark writes its results, relative to a run folder.
VALUE_FILE = Path("bench_results") / "ssl_value.json"
_ROW_KEYS = ("task", "setting", "init", "seed", "score")
#: Two-sided 95 % quantiles of Student's t by degrees of freedom (beyond the table: the normal's 1.96).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
_T95 |= {11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000, 120: 1.980}


def _t95(df: int) -> float:
    known = [d for d in sorted(_T95) if d <= df]
    return _T95[known[-1]] if df <= 120 else 1.96  # the next smaller df: a slightly wider, honest interval


def load_value_results(path: str | Path) -> dict[str, Any]:
    """Read and check the value benchmark's JSON; the error names the file, the row and the missing key."""
    path = Path(path)
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{path}: expected an object with a non-empty 'rows' list")
    for i, row in enumerate(rows):
        missing = [k for k in _ROW_KEYS if not isinstance(row, Mapping) or k not in row]
        if missing:
            raise ValueError(f"{path}: rows[{i}] lacks {missing} (every row needs {list(_ROW_KEYS)})")
        if not isinstance(row["score"], (int, float)) or not math.isfinite(row["score"]):
            raise ValueError(f"{path}: rows[{i}] has a non-finite score {row['score']!r}")
    return data


def paired_gain(
    rows: Sequence[Mapping[str, Any]], treatment: str = "ssl", control: str = "random"
) -> dict[str, float] | None:
    """Mean of ``score(treatment) - score(control)`` over the seeds both have, and its 95 % interval.

    Returns ``None`` when fewer than two seeds are paired.
    """
    by_seed = {(r["init"], r["seed"]): float(r["score"]) for r in rows}
    seeds = sorted({s for i, s in by_seed if i == treatment} & {s for i, s in by_seed if i == control})
    if len(seeds) < 2:
        return None
    diffs = [by_seed[(treatment, s)] - by_seed[(control, s)] for s in seeds]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = _t95(len(diffs) - 1) * sd / math.sqrt(len(diffs))
    return {"gain": mean, "low": mean - half, "high": mean + half, "pairs": len(diffs)}


def _initialisations(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``ssl``, ``random``, then the baselines (e.g. ``threshold``) in name order."""
    first = {"ssl": 0, "random": 1}
    return sorted({str(r["init"]) for r in rows}, key=lambda i: (first.get(i, 2), i))


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault((str(row["task"]), str(row["setting"])), []).append(row)
    return groups


def value_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the page's table: task, setting, mean score per initialisation, paired gain."""
    inits = _initialisations(rows)
    header = ["task", "setting", *(f"{i} (mean, n)" for i in inits), "gain ssl - random [95 % CI]"]
    table = []
    for (task, setting), members in _groups(rows).items():
        cells = [task, setting]
        for init in inits:
            scores = [float(r["score"]) for r in members if r["init"] == init]
            cells.append(f"{sum(scores) / len(scores):.3f} ({len(scores)})" if scores else "-")
        gain = paired_gain(members)
        cells.append(
            f"{gain['gain']:+.3f} [{gain['low']:+.3f}, {gain['high']:+.3f}] ({gain['pairs']} pairs)"
            if gain
            else "fewer than 2 paired seeds"
        )
        table.append(cells)
    return header, table


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """:func:`value_table` as a Markdown table (for the README)."""
    return _markdown(*value_table(rows))


def _markdown(header: Sequence[str], table: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in table])


def ablation_table(rows: Sequence[Mapping[str, Any]], treatments: Sequence[str]) -> str:
    """The paired gain over random initialisation of each ``treatment`` (e.g. ``ssl``, ``ssl intra``), per
    ``(task, setting)``, as a Markdown table; ``-`` where a treatment has fewer than two paired seeds."""
    table = []
    for (task, setting), members in _groups(rows).items():
        gains = [paired_gain(members, treatment=t) for t in treatments]
        if any(gains):
            table.append([task, setting, *(
                f"{g['gain']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]" if g else "-" for g in gains
            )])  # fmt: skip
    return _markdown(["task", "setting", *(f"{t} - random" for t in treatments)], table)


def training_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """How the fine-tuning runs ended (rows with ``steps``, ``converged`` and ``final_loss``), per task,
    setting and initialisation: runs stopped by the convergence rule, the median and range of their steps, and
    the median training loss of their last window."""
    groups: dict[tuple[str, str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if "steps" in row:
            groups.setdefault((str(row["task"]), str(row["setting"]), str(row["init"])), []).append(row)
    table = []
    for (task, setting, init), members in groups.items():
        steps = sorted(int(r["steps"]) for r in members)
        losses = sorted(float(r["final_loss"]) for r in members)
        converged = sum(bool(r["converged"]) for r in members)
        spread = f"{_median(steps):.0f} ({steps[0]}-{steps[-1]})"
        table.append(
            [task, setting, init, f"{converged} of {len(members)}", spread, f"{_median(losses):.3f}"]
        )
    return _markdown(["task", "setting", "init", "converged", "steps (median, range)", "last loss"], table)


def _median(values: Sequence[float]) -> float:
    middle = len(values) // 2
    return float(values[middle]) if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def draw_value(ax, rows: Sequence[Mapping[str, Any]]) -> None:
    """Every seed's score per ``(task, setting)`` and initialisation on ``ax``, paired seeds joined."""
    groups = _groups(rows)
    inits = _initialisations(rows)
    width = 0.8 / max(1, len(inits))
    for g, members in enumerate(groups.values()):
        points: dict[tuple[str, Any], tuple[float, float]] = {}
        for j, init in enumerate(inits):
            x = g - 0.4 + width * (j + 0.5)
            mine = [(r["seed"], float(r["score"])) for r in members if r["init"] == init]
            points.update({(init, seed): (x, score) for seed, score in mine})
            ax.scatter([x] * len(mine), [v for _, v in mine], color=f"C{j}", label=init if g == 0 else None)
        for (init, seed), (x, y) in points.items():
            if init == "ssl" and ("random", seed) in points:
                x0, y0 = points[("random", seed)]
                ax.plot([x0, x], [y0, y], color="0.7", lw=0.8, zorder=0)
    ax.set_xticks(range(len(groups)), [f"{t}\n{s}" for t, s in groups], fontsize=8)
    ax.set_ylabel("score")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
