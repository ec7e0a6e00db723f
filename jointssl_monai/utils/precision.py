"""Which autocast setting a device runs fastest without changing what is learned.

bf16 autocast keeps float32's exponent range (no gradient scaler) and, where the hardware multiplies bfloat16
matrices natively (recent GPUs; CPUs with AVX-512 BF16 or AMX), roughly halves a pretraining step; without
native support it is emulated and slower than float32. ``amp="auto"`` picks bf16 exactly where it is native.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["BF16_CPU_FLAGS", "bf16_native", "cpu_fields", "cpu_flags", "resolve_amp"]

#: CPU flags that give bfloat16 matrix products in hardware (AVX-512 BF16, AMX).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


@lru_cache(maxsize=1)
def cpu_fields() -> dict[str, str]:
    """The first core's fields in ``/proc/cpuinfo`` (``"model name"``, ``"flags"``, ...; empty where there is
    no such file)."""
    cpuinfo = Path("/proc/cpuinfo")
    fields: dict[str, str] = {}
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if not line.strip():
                break  # the blank line that ends the first core's block
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> tuple[str, ...]:
    """The first core's CPU flags (empty where ``/proc/cpuinfo`` is missing)."""
    return tuple(cpu_fields().get("flags", "").split())


def bf16_native(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (GPU: ``torch.cuda.is_bf16_supported``;
    CPU: one of :data:`BF16_CPU_FLAGS`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)
    return False


def resolve_amp(amp: str, device: torch.device | str) -> str:
    """``"auto"`` -> ``"bf16"`` where :func:`bf16_native`, else ``"none"``; other settings unchanged."""
    if amp == "auto":
        return "bf16" if bf16_native(device) else "none"
    return amp
