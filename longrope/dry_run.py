"""``train.py --dry_run true``: check a training recipe without weights, data or GPUs.

The recipe's architecture (:mod:`longrope.architectures`) is shrunk to 2 tiny layers with its real heads, head_dim and
RoPE, built by the same :func:`longrope.modeling.prepare_model` as a real run (RoPE, LoRA, TiledMLP), and takes one
optimizer step on random tokens with the recipe's activation checkpointing and offload.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from longrope import rope, sequence_parallel
from longrope.architectures import dry_run_config
from longrope.errors import LongRopeError
from longrope.rope_config import ResolvedRope, resolve_rope


def dry_run(model_args: Any, rope_args: Any, export_args: Any, args: Any) -> dict[str, Any]:
    """Install the configured RoPE into the shrunk architecture and take one optimizer step on random tokens.

    Factors files that do not exist yet (the search has not run) are replaced by PI factors of the right shape,
    and the report says so; everything else (method, geometry, sp_size against the heads) is checked for real.
    """
    import torch
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from longrope.memory_options import activation_offload_context
    from longrope.modeling import prepare_model
    from longrope.training import check_trainable_rope

    if model_args.model_name_or_path is None:
        raise LongRopeError("dry_run: needs model_name_or_path (the architecture to shrink)")
    # Parsing a deepspeed key registered ZeRO-3 globally; the dry run builds a plain model in this one process.
    unset_hf_deepspeed_config()
    config = dry_run_config(model_args.model_name_or_path, args.dry_run_architecture, model_args.config_overrides)
    notes = []
    path = rope_args.rope_factors_path
    if path is not None and not Path(path).exists():
        notes.append(f"{path} does not exist yet; PI factors of the same shape stand in")
        geometry = rope.RopeGeometry.from_config(config, rope_args.original_max_position_embeddings)
        target = rope_args.target_length or 32 * geometry.original_max_position_embeddings
        resolved = ResolvedRope(rope.build_scaling("pi", geometry, target))
    else:
        resolved = resolve_rope(rope_args, config)
    check_trainable_rope(resolved, export_args, args)
    seq_len = 64 * args.sp_size
    sequence_parallel.validate(config, args.sp_size, seq_len, args.sp_size)
    torch.manual_seed(args.seed)
    cpu_model_args = dataclasses.replace(model_args, attn_implementation="sdpa", dtype="float32")
    model = prepare_model(cpu_model_args, resolved, args, export_args, config=config)
    if resolved.method != "none":
        # Long factors apply only past the original window, which a tiny dry run cannot reach on a CPU.
        rope.select_factors(model, "long")
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    input_ids = torch.randint(0, config.vocab_size, (1, seq_len))
    offload = activation_offload_context() if args.offload_activations else contextlib.nullcontext()
    with offload:
        loss = model(input_ids=input_ids, labels=input_ids, position_ids=torch.arange(seq_len)[None]).loss
        loss.backward()
    optimizer.step()
    loss = loss.detach()
    if not torch.isfinite(loss):
        raise LongRopeError(f"dry_run: the loss is {loss.item()}; check the rope keys")
    return {
        "dry_run_loss": loss.item(),
        "architecture": config.model_type,
        "num_attention_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "rope": rope_args.method,
        "rope_factors_used": list(resolved.scaling.long_factors) if resolved.method != "none" else None,
        "notes": notes,
    }
