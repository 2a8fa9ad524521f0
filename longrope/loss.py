"""The memory-linear causal-LM loss, shared by training (train.py) and scoring (search.py, evaluate.py).

The output head and cross-entropy run over ``loss_chunk_size`` hidden rows at a time, so no ``length x vocab`` logits
tensor ever exists: the peak is linear in the length with a ``loss_chunk_size x vocab`` constant. In training the
backward pass keeps the same bound: a trained head's chunks are recomputed in backward (activation checkpointing of
the head); a frozen head's (LoRA) gradient with respect to the hidden rows is formed chunk by chunk in forward, so
backward never needs the head again (under ZeRO-3 a frozen head is not gathered for a recompute in backward).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Tokens per lm_head + cross-entropy chunk unless a config says otherwise (the loss_chunk_size key).
DEFAULT_LOSS_CHUNK_SIZE = 4096


def _chunk_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, head: Any) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


class _FrozenHeadNllSum(torch.autograd.Function):
    """Sum of token NLLs of one chunk through a frozen head (weight, bias), with d(sum)/d(hidden) computed in forward:
    (softmax(logits) - onehot(target)) @ weight, zero for ignored rows."""

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias: Any
    ) -> torch.Tensor:
        logits = F.linear(hidden, weight, bias).float()
        total = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if ctx.needs_input_grad[0]:
            scored = targets != IGNORE_INDEX
            grad_logits = logits.softmax(dim=-1)
            grad_logits[scored, targets[scored]] -= 1.0
            grad_logits[~scored] = 0.0
            ctx.save_for_backward((grad_logits.to(weight.dtype) @ weight).to(hidden.dtype))
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        return grad_total.to(grad_hidden.dtype) * grad_hidden, None, None, None


def _whole_parameters(module: Any) -> Any:
    """A context in which ``module``'s parameters are whole: DeepSpeed ZeRO-3 gathers its partitioned ones (one
    collective on every rank, which calls this once per loss), anything else already is."""
    if not any(hasattr(p, "ds_id") for p in module.parameters()):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)


def chunked_nll(
    hidden: torch.Tensor,
    head: Any,
    targets: torch.Tensor,
    loss_chunk_size: int | None,
    *,
    recompute: bool = False,
    accumulate: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token NLLs, number of scored tokens) of ``head(hidden)`` against ``targets``.

    ``hidden`` holds one row per position (any leading shape) and ``targets`` the token each row predicts
    (``-100``: not scored). Rows are moved to the head's device (a model spread over GPUs). ``loss_chunk_size`` None
    scores all rows at once. ``recompute`` (training) keeps no chunk's logits for backward (see the module docstring);
    ``accumulate`` is the dtype the chunk sums are added up in (evaluation sums in float64).
    """
    from torch.utils.checkpoint import checkpoint

    frozen_head = recompute and not any(p.requires_grad for p in head.parameters())
    device = head.weight.device
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(device)
    step = loss_chunk_size or max(rows.shape[0], 1)
    total = torch.zeros((), dtype=accumulate, device=device)
    # A frozen head is used through its weight tensors, not its module, so ZeRO-3's module hooks cannot release them
    # between chunks.
    with _whole_parameters(head) if frozen_head else contextlib.nullcontext():
        for start in range(0, rows.shape[0], step):
            chunk_targets = targets[start : start + step]
            if not bool((chunk_targets != IGNORE_INDEX).any()):
                continue
            chunk_rows = rows[start : start + step].to(device)
            if frozen_head:
                value = _FrozenHeadNllSum.apply(chunk_rows, chunk_targets, head.weight, getattr(head, "bias", None))
            elif recompute:
                value = checkpoint(_chunk_nll_sum, chunk_rows, chunk_targets, head, use_reentrant=False)
            else:
                value = _chunk_nll_sum(chunk_rows, chunk_targets, head)
            total = total + value.to(accumulate)
    return total, (targets != IGNORE_INDEX).sum()
