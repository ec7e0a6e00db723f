"""What a benchmark ran on, and the machine's own yardsticks: peak memory of a call, dense matmul FLOP/s.

Absolute times on shared machines drift from run to run; a step's achieved FLOP/s divided by the machine's
dense matmul FLOP/s, both measured in the same run and dtype, is a utilisation that stays comparable.
"""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path
from typing import Any

import monai
import torch

from jointssl_monai.apps.bench.timing import time_call
from jointssl_monai.utils.precision import bf16_native, cpu_fields, cpu_flags

__all__ = ["PeakMemory", "describe_machine", "matmul_flops_per_s"]


def _cpu_info() -> dict[str, Any]:
    model = cpu_fields().get("model name") or platform.processor() or platform.machine()
    # the flags that decide the fast paths, not all ~150
    flags = sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))
    return {"model": model, "flags": flags}


def describe_machine(device: torch.device | str = "cpu") -> dict[str, Any]:
    """CPU model and flags, GPU, library versions, threads and the allocator settings in effect."""
    device = torch.device(device)
    description: dict[str, Any] = {
        "device": str(device),
        "cpu": _cpu_info(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        # glibc's allocator settings or a preloaded allocator move a CPU step by up to 2.5x on some machines
        "allocator": {
            "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
        },
        "bf16_native": bf16_native(device),
    }
    if device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
        description["cuda"] = torch.version.cuda
    return description


class PeakMemory:
    """Peak memory over a block: allocated device memory on a GPU, resident set size (RSS) on a CPU.

    On Linux the RSS high-water mark is reset by writing ``5`` to ``/proc/self/clear_refs``, so a peak belongs
    to the block, not to the whole process. ``gib`` is the peak, ``increase_gib`` the peak less what was in
    use when the block began (what the block itself needed); both are ``None`` where they cannot be read.

    Example::

        with PeakMemory(device) as peak:
            step()
        print(peak.gib, peak.increase_gib)
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.gib: float | None = None
        self.increase_gib: float | None = None
        self._start: float | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**30
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return self
        self._start = _proc_status_gib("VmRSS")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None:
            return
        if self.device.type == "cuda":
            self.gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            self.gib = _proc_status_gib("VmHWM")
        if self.gib is not None:
            self.increase_gib = self.gib - self._start


def _proc_status_gib(field: str) -> float | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 2**20  # kB
    return None


def matmul_flops_per_s(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5
) -> float:
    """The machine's dense matrix-product rate: median over ``repeats`` of ``size x size`` products
    (``2 * size**3`` operations each) after one warm-up."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = [time_call(lambda: a @ b, device) for _ in range(repeats + 1)][1:]
    return 2 * size**3 / statistics.median(times)
