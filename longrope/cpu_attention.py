"""``attn_implementation: cpu_bf16``: a causal attention kernel for bf16 models on x86 CPUs with AVX512-BF16.

Why: PyTorch's CPU flash attention (what ``sdpa`` runs) widens bf16 to fp32 for its block products, so on a CPU
without AMX a bf16 model's attention is no faster than an fp32 one's, and from 16k tokens on attention is most of a
forward (``python -m benchmarks.cpu_precision``). The kernel (``longrope/csrc/cpu_attention.cpp``) computes both
block products with bf16 dot-product instructions and fp32 accumulation, the softmax in fp32, and serves the key
and value heads of grouped-query attention once for all the query heads they serve.

It is registered with transformers' public ``AttentionInterface`` (and ``AttentionMaskInterface``, with sdpa's mask
builder, so a plain causal batch arrives with no mask at all). A call it does not cover goes to the registered
``sdpa`` function unchanged: tensors that need a gradient (training: the kernel has no backward), a mask
(padding, packed documents), another dtype or device, dropout, a sliding window or softcapping, a head size other
than 32/64/128/256. Each reason is logged once.

The shared library is compiled on first use with the system C++ compiler (about 2 seconds) into
``$LONGROPE_KERNEL_CACHE`` (default ``~/.cache/longrope``), named by the source's hash, written atomically.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from longrope import cpu_features
from longrope.errors import LongRopeError

logger = logging.getLogger(__name__)

NAME = "cpu_bf16"
SOURCE = Path(__file__).with_name("csrc") / "cpu_attention.cpp"
HEAD_DIMS = (32, 64, 128, 256)
# Instruction sets the kernel is compiled for; /proc/cpuinfo spells them this way.
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16")
COMPILE_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-pthread",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mfma",
)
PROFILER_LABEL = "longrope::cpu_bf16_attention"
_KEY_TILE = 64  # the kernel reads keys in groups of 64 (csrc: kKeyGroup); the packed copies are padded to it
_reported: set[str] = set()


def unavailable_reason() -> str | None:
    """Why this machine cannot run the kernel, or None when it can."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return f"needs an x86-64 CPU, this is {platform.machine()}"
    missing = [flag for flag in CPU_FLAGS if flag not in cpu_features.cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C++ compiler found (set CXX or install g++)"
    return None


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def cache_dir() -> Path:
    return Path(os.environ.get("LONGROPE_KERNEL_CACHE", Path.home() / ".cache" / "longrope"))


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The compiled kernel, built once per source version and machine; a failure is one line naming the cause."""
    reason = unavailable_reason()
    if reason is not None:
        raise LongRopeError(f"attn_implementation: {NAME} {reason}; use sdpa")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(COMPILE_FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"cpu_attention-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            command = [_compiler(), *COMPILE_FLAGS, str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                first = (result.stderr.strip().splitlines() or ["no output"])[0]
                raise LongRopeError(f"attn_implementation: {NAME} failed to compile ({first}); use sdpa")
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    function = lib.longrope_causal_attention_bf16
    function.restype = ctypes.c_int
    function.argtypes = [
        ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
        ctypes.c_float, ctypes.c_int,
    ]  # fmt: skip
    return lib


def pack_keys(key: torch.Tensor) -> torch.Tensor:
    """[B, G, L, D] -> [B, G, L64 / 16, D / 2, 16, 2]: tiles of 16 keys, each 64-byte row one pair of dimensions."""
    batch, heads, length, dim = key.shape
    padded = torch.nn.functional.pad(key, (0, 0, 0, -length % _KEY_TILE))
    tiles = padded.reshape(batch, heads, padded.shape[2] // 16, 16, dim // 2, 2)
    return tiles.permute(0, 1, 2, 4, 3, 5).contiguous()


def pack_values(value: torch.Tensor) -> torch.Tensor:
    """[B, G, L, D] -> [B, G, L64 / 2, D, 2]: pairs of keys, each 64-byte row 16 dimensions of both."""
    batch, heads, length, dim = value.shape
    padded = torch.nn.functional.pad(value, (0, 0, 0, -length % _KEY_TILE))
    pairs = padded.reshape(batch, heads, padded.shape[2] // 2, 2, dim)
    return pairs.permute(0, 1, 2, 4, 3).contiguous()


def causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + causal) v for bf16 CPU tensors: query [B, Hq, Lq, D], key and value [B, G, Lk, D]
    (G divides Hq; Lq <= Lk, query i at position Lk - Lq + i). Returns [B, Lq, Hq, D], as transformers' attention
    functions do."""
    batch, q_heads, q_len, dim = query.shape
    _, kv_heads, k_len, _ = key.shape
    if query.stride(-1) != 1:
        query = query.contiguous()
    # A named range, so torch.profiler attributes the kernel's time (benchmarks/cpu_precision.py reads it).
    with torch.profiler.record_function(PROFILER_LABEL):
        keys, values = pack_keys(key), pack_values(value)
        out = torch.empty(batch, q_len, q_heads, dim, dtype=torch.bfloat16)
        status = library().longrope_causal_attention_bf16(
            query.data_ptr(), query.stride(0), query.stride(1), query.stride(2),
            keys.data_ptr(), values.data_ptr(), out.data_ptr(),
            batch, q_heads, kv_heads, q_len, k_len, dim, scale, torch.get_num_threads(),
        )  # fmt: skip
    if status != 0:
        raise LongRopeError(f"attn_implementation: {NAME} has no kernel for head size {dim}; use sdpa")
    return out


def _unsupported(module: Any, query: torch.Tensor, key: torch.Tensor, mask: Any, dropout: float, kwargs: dict) -> str:
    """Why this call goes to sdpa, or '' when the kernel covers it."""
    tensors = (query, key)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "a gradient is needed (the kernel has no backward: training runs sdpa)"
    if mask is not None:
        return "the batch has an attention mask (padding or packed documents)"
    if any(t.device.type != "cpu" or t.dtype != torch.bfloat16 for t in tensors):
        return f"it runs bf16 CPU tensors only, not {query.dtype} on {query.device.type}"
    if query.shape[-1] not in HEAD_DIMS:
        return f"head size {query.shape[-1]} (kernels: {', '.join(map(str, HEAD_DIMS))})"
    if query.shape[1] % key.shape[1] or query.shape[2] > key.shape[2]:
        return "the query and key shapes are not causal grouped-query attention"
    if dropout and module.training:
        return "attention dropout"
    if kwargs.get("sliding_window") or kwargs.get("softcap") or not getattr(module, "is_causal", True):
        return "a sliding window, softcapping or non-causal attention"
    return ""


def attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (see ``transformers.integrations.sdpa_attention``)."""
    reason = _unsupported(module, query, key, attention_mask, dropout, kwargs)
    if reason:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if reason not in _reported:
            _reported.add(reason)
            logger.warning("attn_implementation %s: this call runs sdpa, because %s", NAME, reason)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return causal_attention(query, key, value, float(scale)), None


def register() -> None:
    """Make ``cpu_bf16`` an attention implementation transformers accepts (idempotent); compiles the kernel."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    library()
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
