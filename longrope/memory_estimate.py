"""The per-GPU memory estimate of a training config (``train.py --estimate_memory true``), from the config alone.

The model is the one train.py would train, built on the meta device by :func:`longrope.modeling.prepare_model`
(LoRA adapters and frozen weights counted by PEFT itself), so the estimate cannot describe another model than the
run. Activations follow the checkpointed-layer model described in :func:`estimate_memory`; measured against
``benchmarks/train_scaling.py`` it errs high (about 1.4x the activation peaks).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longrope.errors import LongRopeError

# CUDA context, NCCL buffers and allocator fragmentation: a rule of thumb, not derived from the config.
OVERHEAD_GIB = 3.0


@dataclass
class MemoryEstimate:
    """Per-GPU memory of a training config: ``rows`` of (component, GPU GiB, CPU GiB per rank, how it was counted)."""

    rows: list[tuple[str, float, float, str]]
    world_size: int
    seq_len: int
    num_parameters: int
    trainable_parameters: int

    @property
    def gpu_gib(self) -> float:
        return sum(row[1] for row in self.rows)

    @property
    def cpu_gib(self) -> float:
        return sum(row[2] for row in self.rows)

    def table(self) -> str:
        lines = ["| component | GPU GiB | CPU GiB / rank | counted as |", "|---|---:|---:|---|"]
        lines += [f"| {name} | {gpu:.2f} | {cpu:.2f} | {note} |" for name, gpu, cpu, note in self.rows]
        lines.append(f"| **total per GPU** | **{self.gpu_gib:.2f}** | {self.cpu_gib:.2f} | |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "num_parameters": self.num_parameters,
            "trainable_parameters": self.trainable_parameters,
            "rows": [{"component": r[0], "gpu_gib": r[1], "cpu_gib": r[2], "note": r[3]} for r in self.rows],
            "total_gpu_gib": self.gpu_gib,
            "total_cpu_gib_per_rank": self.cpu_gib,
        }


def _deepspeed_settings(args: Any) -> dict[str, Any]:
    from longrope.train_args import read_deepspeed_config

    config = args.deepspeed
    if isinstance(config, str):
        config = read_deepspeed_config(config)
    return config or {}


def _parameter_counts(model_args: Any, config: Any, args: Any) -> tuple[int, int, int, int]:
    """(all parameters, trained ones, one decoder layer's, the largest embedding matrix's) of the model train.py
    would build, on the meta device (no memory)."""
    import torch

    from longrope.lora import zero3_init_disabled
    from longrope.modeling import prepare_model

    with zero3_init_disabled(getattr(args, "hf_deepspeed_config", None)), torch.device("meta"):
        model = prepare_model(model_args, None, args, config=config)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
    embedding = max(model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel())
    return total, trainable, layer, embedding


def estimate_memory(config: Any, args: Any, seq_len: int, world_size: int, model_args: Any = None) -> MemoryEstimate:
    """Per-GPU memory of training ``config`` at ``seq_len`` on ``world_size`` GPUs, from the config alone.

    Model states: 16 bytes per trained parameter (bf16 weight and gradient, fp32 master weight and Adam moments; fp32
    training has no master copy but 4-byte weights and gradients: also 16), 2 (or 4) per frozen LoRA base weight,
    divided by the world size under ZeRO-3; DeepSpeed CPU offload moves the fp32 optimizer part (offload_optimizer)
    and the weight shards (offload_param) to CPU. Activations, per micro-batch at the local length seq_len / sp_size:
    with activation checkpointing one hidden state per layer plus one layer's recompute working set (its saved
    tensors and their gradients: attention linear in length, as with flash/sdpa kernels; the MLP intermediates
    divided by the tiles with tiled_mlp); without it every layer's working set. Logits: a loss_chunk_size x vocab
    chunk (or the whole local length) as bf16 logits, fp32 log-probabilities and fp32 gradients.
    """
    zero = _deepspeed_settings(args).get("zero_optimization", {})
    zero3 = zero.get("stage") == 3
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device") == "cpu"
    offload_param = (zero.get("offload_param") or {}).get("device") == "cpu"
    half = getattr(args, "half_precision_requested", bool(args.bf16 or args.fp16))
    width = 2 if half else 4  # bytes of one weight or activation element
    if model_args is None:
        from longrope.args import ModelArguments

        model_args = ModelArguments()
    total, trainable, layer_params, embedding_params = _parameter_counts(model_args, config, args)
    frozen = total - trainable
    shards = world_size if zero3 else 1
    gib = 2.0**30
    rows: list[tuple[str, float, float, str]] = []

    weights_and_grads = (trainable * 2 * width + frozen * width) / shards
    optimizer = trainable * (16 - 2 * width) / shards  # fp32 master (mixed precision only) + Adam m and v
    gpu_states, cpu_states = weights_and_grads + optimizer, 0.0
    where = f"/ {shards} ranks (ZeRO-3)" if zero3 else "replicated (no ZeRO-3)"
    note = f"16 B x {trainable / 1e9:.2f}B trained" + (f" + {width} B x {frozen / 1e9:.2f}B frozen" if frozen else "")
    if offload_optimizer:
        gpu_states, cpu_states = weights_and_grads, optimizer
        note += ", optimizer on CPU"
    if offload_param:
        moved = (trainable + frozen) * width / shards
        gpu_states, cpu_states = gpu_states - moved, cpu_states + moved
        note += ", weights on CPU"
    rows.append(("model states (weights, grads, Adam)", gpu_states / gib, cpu_states / gib, f"{note}, {where}"))
    if zero3:
        gathered = 2 * max(layer_params, embedding_params) * width
        rows.append(("ZeRO-3 gathered weights", gathered / gib, 0.0, "largest module (layer or vocab matrix) x 2"))

    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    intermediate = config.intermediate_size
    layers = config.num_hidden_layers
    local = seq_len // args.sp_size * args.per_device_train_batch_size
    # Saved per token by one decoder layer: 2 norms' outputs, q, k, v, rotated q and k, attention output, o_proj and
    # down_proj outputs (hidden each). Under Ulysses the attention kernel saves the all-to-all'd q, k, v instead of
    # the local ones: the same bytes per rank (the all-to-all buffers themselves are transient).
    attention = 2 * hidden + 2 * q + 3 * kv
    attention_bytes = local * attention * width * 2 + local * heads * 4  # x2: their gradients; + fp32 softmax stats
    tiles = 1
    if args.tiled_mlp:
        tiles = args.tiled_mlp_shards or max(1, math.ceil(local / hidden))
    mlp_bytes = (local * 2 * hidden + math.ceil(local / tiles) * 4 * intermediate) * width * 2
    if args.activation_checkpointing:
        checkpoints = layers * local * hidden * width
        gpu_checkpoints, cpu_checkpoints = checkpoints, 0.0
        if args.offload_activations:
            # DeepSpeed keeps the newest input on the GPU and two copies in flight.
            gpu_checkpoints = min(layers, 3) * local * hidden * width
            cpu_checkpoints = checkpoints
        rows.append(
            (
                "checkpointed hidden states",
                gpu_checkpoints / gib,
                cpu_checkpoints / gib,
                f"{layers} layers x {local} tokens x {hidden}"
                + (", offloaded to CPU" if args.offload_activations else ""),
            )
        )
        rows.append(
            ("layer recompute: attention", attention_bytes / gib, 0.0, "one layer, linear in length (flash/sdpa)")
        )
        rows.append(("layer recompute: MLP", mlp_bytes / gib, 0.0, f"one layer, {tiles} tile(s)"))
    else:
        rows.append(
            (
                "activations (no checkpointing)",
                layers * (attention_bytes + mlp_bytes) / 2 / gib,
                0.0,
                f"{layers} layers' saved tensors, linear in length (flash/sdpa)",
            )
        )
    vocab = config.vocab_size
    chunk = min(args.loss_chunk_size or local, local)
    logits = chunk * vocab * (width + 8)
    label = f"{chunk} x {vocab} " + ("(loss_chunk_size)" if args.loss_chunk_size else "(whole local length)")
    rows.append(("logits and loss", logits / gib, 0.0, label))
    rows.append(("overhead", OVERHEAD_GIB, 0.0, "CUDA context, NCCL buffers, fragmentation (rule of thumb)"))
    return MemoryEstimate(rows, world_size, seq_len, total, trainable)


def estimate_for_config(model_args: Any, data_args: Any, rope_args: Any, args: Any) -> MemoryEstimate:
    """estimate_memory for a parsed train.py config: the sequence length from estimate_seq_len, max_seq_len,
    target_length or the prepared dataset; the world size from estimate_world_size, the launch, or sp_size."""
    from longrope.architectures import architecture_config
    from longrope.distributed import launched_world_size
    from longrope.modeling import new_model_config

    if model_args.model_name_or_path is None and model_args.model_config is None:
        raise LongRopeError("estimate_memory: needs model_name_or_path or model_config (the architecture)")
    if model_args.model_name_or_path is not None:
        config = architecture_config(
            model_args.model_name_or_path, args.dry_run_architecture, model_args.config_overrides
        )
    else:
        config = new_model_config(model_args, None)  # without a tokenizer: the architecture's default vocabulary
    seq_len = args.estimate_seq_len or data_args.max_seq_len or rope_args.target_length
    if seq_len is None and data_args.dataset_path and Path(data_args.dataset_path).is_dir():
        from longrope.data import load_prepared_dataset

        seq_len = len(load_prepared_dataset(data_args.dataset_path)["train"][0]["input_ids"])
    if seq_len is None:
        raise LongRopeError("estimate_seq_len: cannot tell the training length; set estimate_seq_len or max_seq_len")
    world_size = args.estimate_world_size or (launched_world_size() if "WORLD_SIZE" in os.environ else args.sp_size)
    if world_size % args.sp_size:
        raise LongRopeError(f"estimate_world_size: {world_size} is not a multiple of sp_size {args.sp_size}")
    return estimate_memory(config, args, seq_len, world_size, model_args)
