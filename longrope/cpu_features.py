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


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as /proc/cpuinfo spells them; empty where that file is missing."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


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
