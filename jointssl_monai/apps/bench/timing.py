"""Interleaved timing: every case once per round (A B C, then B C A, ...), so that load on a shared machine
falls on all cases alike; speed-ups are ratios of the same round's times."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["interleaved_times", "paired_ratio", "time_call"]


def time_call(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds one call of ``fn`` takes, a GPU synchronised before and after."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def interleaved_times(
    cases: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    clock: Callable[[Callable[[], Any], torch.device | str], float] = time_call,
) -> dict[str, list[float]]:
    """Time each case ``rounds`` times, interleaved, after ``warmup`` untimed calls of each.

    The order rotates from round to round (round ``r`` starts at case ``r mod n``), so that no case always
    runs right after the same other one (a cache or allocator left warm by a neighbour favours one order).

    Returns:
        case name -> its ``rounds`` times in seconds, in round order.
    """
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        start = r % len(names)
        for name in names[start:] + names[:start]:
            times[name].append(clock(cases[name], device))
    return times


def paired_ratio(baseline: list[float], case: list[float]) -> dict[str, float]:
    """Speed-up of ``case`` over ``baseline`` round by round (``baseline[r] / case[r]``): median, min, max."""
    if len(baseline) != len(case) or not baseline:
        raise ValueError(f"need the same non-zero number of rounds, got {len(baseline)} and {len(case)}")
    ratios = [b / c for b, c in zip(baseline, case, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
