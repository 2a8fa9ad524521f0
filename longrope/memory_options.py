"""Activation-memory options of training (DeepSpeed ALST): TiledMLP and activation-checkpoint offload."""

from __future__ import annotations

import math
from typing import Any

from longrope.errors import LongRopeError


def enable_tiled_mlp(model: Any, shards: int | None = None) -> int:
    """Run every gated MLP (gate_proj/up_proj/down_proj) through DeepSpeed's TiledMLP; returns how many.

    ``shards`` slices per call, default ceil(local length / hidden size) as DeepSpeed suggests. Every rank computes the
    same count from its sequence shard (packed rows all have max_seq_len tokens, SP shards are equal), which ZeRO-3
    needs: each slice gathers the MLP's parameters, a collective.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiled = 0
    for module in model.modules():
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
            continue
        untiled_forward = module.forward

        def call_untiled(mlp: Any, x: Any, untiled_forward: Any = untiled_forward) -> Any:
            return untiled_forward(x)

        def tiled_forward(x: Any, mlp: Any = module, call_untiled: Any = call_untiled) -> Any:
            count = shards or max(1, math.ceil(x.shape[-2] / x.shape[-1]))
            if count == 1:
                return call_untiled(mlp, x)
            return TiledMLP.apply(call_untiled, mlp, x, count, list(mlp.parameters()))

        module.forward = tiled_forward
        tiled += 1
    if not tiled:
        raise LongRopeError("tiled_mlp: the model has no gated MLP (gate_proj, up_proj, down_proj); turn it off")
    return tiled


def activation_offload_context() -> Any:
    """DeepSpeed's saved-tensor hooks that move each checkpointed decoder-layer input to (pinned) CPU memory until
    backward; everything else stays on the device. On a CPU-only machine it marks the tensors and moves nothing."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )

    return get_checkpoint_hidden_states_offloading_ctx_manager()
