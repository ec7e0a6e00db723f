"""Decode every voxel of every datalist entry before training, in worker processes under a memory cap.

A datalist scan reads headers only, so a truncated gzip stream, broken PNG/JPEG data or a NIfTI/NRRD file
shorter than its header says would otherwise be found hours into a run. :func:`verify_entries` loads each
entry exactly as training does (:func:`~jointssl_monai.data.io.load_ssl_image`: every check on the values
included) in ``num_workers`` spawned processes, each limited to ``memory_limit_gb`` of address space beyond
what it held after start-up, so that one absurd file cannot take the machine's memory. A worker that dies
(a decoder crash, the kernel's OOM killer) takes only the entry it was reading with it: the entries it left
unfinished are retried one at a time in fresh workers, and the one that kills its worker is reported.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import logging
import multiprocessing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jointssl_monai.data.checks import DEFAULT_MAX_VOXELS, BadInputError, describe_path
from jointssl_monai.utils.arguments import check_bool, check_int, check_number

__all__ = ["VerifyReport", "decode_entry", "verify_entries"]

logger = logging.getLogger(__name__)


@dataclass
class VerifyReport:
    """What :func:`verify_entries` found: the entries that decode, and ``(entry number, file, reason)`` for
    every one that does not."""

    good: list[dict[str, Any]] = field(default_factory=list)
    bad: list[tuple[int, str, str]] = field(default_factory=list)

    def summary(self) -> str:
        total = len(self.good) + len(self.bad)
        lines = [f"{len(self.good)} of {total} entries decode"]
        lines += [f"  entry {i}: {name}: {reason}" for i, name, reason in self.bad]
        return "\n".join(lines)

    def usable(self, skip_bad_inputs: bool = False, source: str = "the datalist") -> list[dict[str, Any]]:
        """The entries to train on: all good ones; bad ones are left out with a logged reason
        (``skip_bad_inputs``) or refused together in one :class:`BadInputError` naming ``source``."""
        check_bool("skip_bad_inputs", skip_bad_inputs)
        if self.bad and not skip_bad_inputs:
            raise BadInputError(source, f"{len(self.bad)} entries do not decode (skip_bad_inputs leaves them "
                                        f"out):\n{self.summary()}")  # fmt: skip
        if self.bad:
            logger.warning("verification: %s; those are left out", self.summary())
        else:
            logger.info("verification: all %d entries decode", len(self.good))
        return self.good

    def as_dict(self) -> dict[str, Any]:
        bad = [{"entry": i, "image": name, "reason": reason} for i, name, reason in self.bad]
        return {"entries": len(self.good) + len(self.bad), "good": len(self.good), "bad": bad}


def _start_worker(limit_bytes: int | None) -> None:
    # Each worker imports the readers first, then caps its address space beyond what it already holds.
    import jointssl_monai.data.io  # noqa: F401

    if limit_bytes is None:
        return
    import resource

    with open("/proc/self/status") as status:
        held = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (held + limit_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))


def decode_entry(entry: Mapping[str, Any], max_voxels: int = DEFAULT_MAX_VOXELS) -> str | None:
    """``None`` if the entry loads as training loads it, else why not (the default check of
    :func:`verify_entries`)."""
    from jointssl_monai.data.io import load_ssl_image

    try:
        load_ssl_image(entry["image"], int(entry["dims"]), max_voxels=max_voxels)
    except BadInputError as err:
        return err.problem
    except MemoryError:
        return "needs more memory to decode than the verification's cap (memory_limit_gb)"
    except Exception as err:  # any other failure is the file's too: say what it was
        return f"{type(err).__name__}: {err}"
    return None


def _run(
    entries: Sequence[Mapping[str, Any]],
    indices: Sequence[int],
    workers: int,
    limit: int | None,
    check_entry: Callable[[Mapping[str, Any], int], str | None],
    max_voxels: int,
) -> tuple[dict[int, str | None], list[int]]:
    """Check ``indices``; return the results and the indices a dead worker left without one."""
    results: dict[int, str | None] = {}
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
    with futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_start_worker, initargs=(limit,)
    ) as pool:
        jobs = {pool.submit(check_entry, dict(entries[i]), max_voxels): i for i in indices}
        for job in futures.as_completed(jobs):
            with contextlib.suppress(futures.process.BrokenProcessPool):  # retried one by one
                results[jobs[job]] = job.result()
    return results, [i for i in indices if i not in results]


def verify_entries(
    entries: Sequence[Mapping[str, Any]],
    num_workers: int = 2,
    memory_limit_gb: float | None = 8.0,
    max_voxels: int = DEFAULT_MAX_VOXELS,
    check_entry: Callable[[Mapping[str, Any], int], str | None] = decode_entry,
) -> VerifyReport:
    """Decode every entry as training does; report those that do not decode and why.

    Args:
        entries: datalist entries (``image``, ``dims``) with resolved paths.
        num_workers: processes that decode in parallel (at least 1).
        memory_limit_gb: address space each worker may take beyond its start-up size (``None``: no cap).
        max_voxels: refuse headers that claim more values than this, as training does.
        check_entry: ``check_entry(entry, max_voxels)`` gives ``None`` for a good entry, else the reason;
            a module-level function (it is sent to spawned processes). Default: :func:`decode_entry`.
    """
    check_int("num_workers", num_workers, 1)
    if memory_limit_gb is not None:
        check_number("memory_limit_gb", memory_limit_gb, 0, exclusive_minimum=True)
    limit = None if memory_limit_gb is None else int(memory_limit_gb * 2**30)
    results, lost = _run(entries, range(len(entries)), num_workers, limit, check_entry, max_voxels)
    for i in lost:  # one at a time, in a fresh worker each: the one that kills its worker is named
        single, dead = _run(entries, [i], 1, limit, check_entry, max_voxels)
        results[i] = (
            "the process decoding it died (a decoder crash, or out of memory: see memory_limit_gb)"
            if dead
            else single[i]
        )
    report = VerifyReport()
    for i, entry in enumerate(entries):
        if results[i] is None:
            report.good.append(dict(entry))
        else:
            report.bad.append((i, describe_path(entry["image"]), results[i]))
    return report
