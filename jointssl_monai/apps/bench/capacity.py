"""The largest batch that fits: how many volumes one pretraining step can take on a device, and the memory a
volume costs there."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch

from jointssl_monai.apps.bench.machine import PeakMemory

__all__ = ["is_out_of_memory", "largest_fitting"]


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says the device (or the host) ran out of memory."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def largest_fitting(
    step_for: Callable[[int], Callable[[], Any]], limit: int = 1024, device: torch.device | str = "cuda"
) -> dict[str, Any]:
    """The largest ``n <= limit`` for which one step of ``step_for(n)`` runs without running out of memory.

    Doubles ``n`` from 1 until a step fails or ``limit`` is reached, then bisects between the last ``n`` that
    fitted and the first that did not. Every try builds its step afresh and frees it (and the device cache)
    afterwards, so a failure leaves nothing behind for the next try.

    Returns:
        ``largest`` (0 if not even one fits), ``tries`` (``n`` -> whether it fitted, in order) and
        ``gib_per_volume``: the peak memory of the largest step divided by its ``n``.
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    tries: dict[int, bool] = {}
    peaks: dict[int, float] = {}

    def fits(n: int) -> bool:
        step = None
        try:
            step = step_for(n)
            with PeakMemory(device) as peak:
                step()
            if peak.gib is not None:
                peaks[n] = peak.gib
            tries[n] = True
        except Exception as error:  # only running out of memory is an answer; anything else is a bug
            if not is_out_of_memory(error):
                raise
            tries[n] = False
        finally:
            del step
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        return tries[n]

    good, bad, n = 0, None, 1
    while n <= limit and fits(n):
        good, n = n, 2 * n
    if n <= limit:
        bad = n
    elif good < limit and fits(limit):
        good = limit
    else:
        bad = limit if good < limit else None
    while bad is not None and bad - good > 1:
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    per_volume = peaks[good] / good if good in peaks else None
    return {"largest": good, "tries": tries, "gib_per_volume": per_volume}
