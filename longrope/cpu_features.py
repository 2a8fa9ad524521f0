"""What this machine's CPU computes natively: read once from /proc/cpuinfo (Linux x86; elsewhere nothing is known
and nothing is claimed)."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from pathlib import Path

# Either one gives the CPU bf16 dot products in hardware; without both, PyTorch computes a bf16 matmul in a scalar
# fallback (an AVX2 EPYC: 0.57 GFLOP/s in bf16 against 139 in fp32, benchmarks/results/cpu_precision-avx2.md).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
_warned = False


def parse_cpuinfo(text: str) -> dict[str, str]:
    """The first processor's block of /proc/cpuinfo (it describes them all), as key -> value."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


@lru_cache(maxsize=1)
def cpu_fields() -> dict[str, str]:
    """This machine's /proc/cpuinfo, read once (:func:`parse_cpuinfo`); empty where the file is missing."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text())
    except OSError:
        return {}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them; empty where that file is missing."""
    return frozenset(cpu_fields().get("flags", "").split())


def cpu_description(fields: dict[str, str] | None = None) -> str:
    """The CPU's model name with its family and model numbers: a virtual machine often reports only "AMD EPYC", and
    the family tells Zen 4 (25) from Zen 5 (26), whose bf16 rates differ by 2x."""
    fields = cpu_fields() if fields is None else fields
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields:
        name += f" (cpu family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def lacks_native_bf16() -> bool:
    """True only where the flags are known and name neither bf16 instruction set (an unknown CPU is not accused)."""
    flags = cpu_flags()
    return platform.machine() in ("x86_64", "AMD64") and bool(flags) and not flags & set(NATIVE_BF16_FLAGS)


def warn_if_bf16_is_emulated(key: str) -> None:
    """One line, once per process and on rank 0 only, when bf16 is asked of a CPU that would emulate it."""
    global _warned
    from longrope import distributed

    if _warned or not lacks_native_bf16() or not distributed.is_main() or int(os.environ.get("RANK", "0")) != 0:
        return
    _warned = True
    import warnings

    warnings.warn(
        f"{key}: bfloat16 on this CPU (no {' or '.join(NATIVE_BF16_FLAGS)}) runs matmuls hundreds of times slower "
        "than float32; set dtype: float32 (and attn_implementation: sdpa), or bf16: false for training",
        stacklevel=3,
    )
