"""Throughput, MFU and peak memory of a training run, measured the same way on CPUs and GPUs.

``ThroughputCallback`` times training so every training log carries tokens/s (all ranks), the peak memory since
training began (this rank) and an MFU estimate; the helpers are shared with the benchmarks.
"""

from __future__ import annotations

import resource
import time
from typing import Any

from transformers import TrainerCallback


def count_parameters(model: Any) -> int:
    """Parameters of the whole model, also when ZeRO-3 has already partitioned them at load time (zero.Init)."""
    return sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters())


# Dense bf16 peak FLOP/s per device (vendor datasheets), for the MFU estimate when peak_flops is not set. The first
# key contained in the device name wins, so a key that is part of another ("L4" of "L40S") comes after it. H200 and
# GH200 are the H100's Hopper chip: the same dense bf16 rate.
PEAK_FLOPS_BY_DEVICE = {
    "H100": 989e12,
    "H200": 989e12,
    "A100": 312e12,
    "A10G": 125e12,
    "L40S": 362e12,
    "L4": 121e12,
    "V100": 125e12,
}


def peak_flops_for(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a device by its name (``torch.cuda.get_device_name()``); None when not in the table."""
    return next((flops for key, flops in PEAK_FLOPS_BY_DEVICE.items() if key in device_name), None)


def device_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return peak_flops_for(torch.cuda.get_device_name())


def reset_peak_memory() -> None:
    """Restart the peak that peak_memory_gib reports from the current usage (CUDA allocator; Linux RSS high-water
    mark), so loading and set-up peaks do not hide the training peak."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak stays the process lifetime's


def process_status_bytes(key: str) -> int | None:
    """A memory field of /proc/self/status (VmHWM, VmRSS, RssFile, ...) in bytes; None where /proc is not there."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def peak_memory_gib() -> float:
    """Peak memory of this process since the last reset_peak_memory: CUDA allocations on a GPU, the resident set size
    high-water mark on CPU (the lifetime ru_maxrss where /proc is not available)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    peak = process_status_bytes("VmHWM")
    if peak is not None:
        return peak / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class ThroughputCallback(TrainerCallback):
    """Times training so LongContextTrainer.log can add tokens/s (all ranks), peak memory since training began (this
    rank) and an MFU estimate (6 N tokens/s / peak FLOP/s) to every training log, before W&B and trainer_state.json
    see it.

    Under sequence parallelism a batch's tokens are shared by sp_size ranks, so the global count per optimizer step
    is tokens per micro-batch x gradient accumulation x data-parallel ranks.
    """

    def __init__(self, tokens_per_step: int, num_parameters: int, world_size: int, peak_flops: float | None) -> None:
        self.tokens_per_step = tokens_per_step
        self.num_parameters = num_parameters
        self.world_size = world_size
        self.peak_flops = peak_flops
        self._start: float | None = None
        self._start_step = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._start is None:
            reset_peak_memory()  # the model, engine and optimizer are set up: report the training peak
            self._start = time.perf_counter()
            self._start_step = state.global_step

    def metrics(self, global_step: int) -> dict[str, float]:
        """tokens_per_second, peak_memory_gib and (with a peak FLOP/s) mfu since training (or resuming) began."""
        steps = global_step - self._start_step
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        if steps <= 0 or elapsed <= 0:
            return {}
        tokens_per_second = steps * self.tokens_per_step / elapsed
        metrics = {"tokens_per_second": round(tokens_per_second, 2), "peak_memory_gib": round(peak_memory_gib(), 3)}
        if self.peak_flops:
            mfu = 6 * self.num_parameters * tokens_per_second / (self.peak_flops * self.world_size)
            metrics["mfu"] = round(mfu, 5)
        return metrics
