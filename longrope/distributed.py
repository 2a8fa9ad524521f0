"""torch.distributed helpers shared by the scripts: works alone, under ``torchrun`` and ``accelerate launch``.

search.py and evaluate.py use plain process groups (gloo on CPU, nccl on GPUs); train.py lets accelerate set them up.
"""

from __future__ import annotations

import gc
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_world_size() -> int:
    """Processes in this launch: the process group's size once it exists, else WORLD_SIZE (torchrun/accelerate)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


_cpu_deepspeed_state = False


def init_cpu_deepspeed() -> None:
    """Multi-process training on CPU: give Accelerate a gloo process group it counts. Call where train.py starts,
    before its arguments are parsed (transformers' TrainingArguments sets up devices while it is parsed).

    Without a GPU, Accelerate picks no backend for a DeepSpeed launch, so every rank believes it is the only process
    (all write outputs, no data sharding). A PartialState built with backend gloo first, and reused by the training
    arguments (``use_configured_state``), has the true world size; a run without DeepSpeed reuses its process group.
    """
    global _cpu_deepspeed_state
    if torch.cuda.is_available() or not launched_distributed() or _cpu_deepspeed_state:
        return
    skip_deepspeed_inference_all_reduce_build()
    from accelerate import PartialState

    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        PartialState(backend="gloo")
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
    _cpu_deepspeed_state = True


# DeepSpeed's CPU comm backend JIT-compiles this op when it starts (g++, about a minute of one core, once per machine).
DEEPSPEED_INFERENCE_ALL_REDUCE_OP = "deepspeed_shm_comm"


def skip_deepspeed_inference_all_reduce_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce kernel on a CPU: only ``inference_all_reduce``
    (DeepSpeed's tensor-parallel inference) calls it, never ZeRO training, which reduces over gloo. A kernel already
    built stays unused either way. A library internal (README "Private APIs"): the probed table of compatible ops."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__[DEEPSPEED_INFERENCE_ALL_REDUCE_OP] = False


def cpu_deepspeed_state_ready() -> bool:
    """Whether :func:`init_cpu_deepspeed` created the gloo state the training arguments should reuse."""
    return _cpu_deepspeed_state


def init_distributed() -> None:
    """Join the process group torchrun/accelerate describe in the environment (no-op for a single process)."""
    if not launched_distributed() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def shutdown_distributed() -> None:
    """End the process group and free every process group object libraries still hold.

    ``destroy_process_group`` only unregisters the groups: ZeRO-3 parameters, the DeepSpeed engine, accelerate's
    state and deepspeed's module globals keep the gloo/nccl groups (and their native threads) alive until interpreter
    exit, where their teardown order is arbitrary and can abort a rank ("terminate called without an active
    exception") after the work is done. Collect them here, while every rank is alive.
    """
    global _cpu_deepspeed_state
    _cpu_deepspeed_state = False
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # the Trainer/engine reference cycles that still hold ZeRO-3 parameters
    dist.destroy_process_group()
    _forget_library_process_groups()
    gc.collect()


# Modules whose globals cache process groups (ZeRO, Ulysses sequence parallelism, its all-to-all groups).
_LIBRARY_GROUP_CACHES = (
    "deepspeed.utils.groups",
    "deepspeed.runtime.sequence_parallel.parallel_state_sp",
    "deepspeed.sequence.layer",
)


def _forget_library_process_groups() -> None:
    for module_name in _LIBRARY_GROUP_CACHES:
        module = sys.modules.get(module_name)
        for name, value in vars(module).items() if module is not None else ():
            if isinstance(value, dist.ProcessGroup):
                setattr(module, name, None)
            elif isinstance(value, (dict, list)):
                values = value.values() if isinstance(value, dict) else value
                if any(isinstance(item, dist.ProcessGroup) for item in values):
                    value.clear()
    attention = sys.modules.get("transformers.modeling_utils")
    if attention is not None:
        # Ulysses replaces the core attention (e.g. sdpa) in place with a wrapper holding its group; restore it.
        overrides = attention.ALL_ATTENTION_FUNCTIONS._local_mapping
        for key in [key for key, fn in overrides.items() if getattr(fn, "__module__", "").endswith(".ulysses_sp")]:
            del overrides[key]
    zero_offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if zero_offload is not None:
        zero_offload.FWD_MODULE_STACK.clear()  # holds the last ZeRO-3 module, so its parameters' groups
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None:
        accelerate_state.AcceleratorState._reset_state(reset_partial_state=True)  # its device mesh holds groups


def free_port() -> int:
    """A TCP port free right now on this host, for a launcher's --master_port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (the value itself when alone)."""
    if world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, source: int = 0) -> Any:
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=source)
    return box[0]


def device_for_rank(gpus_per_process: int = 1) -> torch.device:
    """The first device this process evaluates on (its group of ``gpus_per_process`` GPUs starts there)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() * gpus_per_process)
    return torch.device("cpu")
