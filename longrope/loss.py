"""The memory-linear causal-LM loss, shared by training (train.py) and scoring (search.py, evaluate.py).

The output head and cross-entropy run over ``loss_chunk_size`` hidden rows at a time, so no ``length x vocab`` logits
tensor ever exists: the peak is linear in the length with a ``loss_chunk_size x vocab`` constant. Training recomputes each
chunk in backward (activation checkpointing of the head), so the backward pass keeps the same bound.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Tokens per lm_head + cross-entropy chunk unless a config says otherwise (the loss_chunk_size key).
DEFAULT_LOSS_CHUNK_SIZE = 4096


def _chunk_nll_sum(hidden: torch.Tensor, targets: torch.Tensor, head: Any) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


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
    scores all rows at once. ``recompute`` (training) recomputes each chunk's logits in backward instead of keeping them;
    ``accumulate`` is the dtype the chunk sums are added up in (evaluation sums in float64).
    """
    from torch.utils.checkpoint import checkpoint

    device = head.weight.device
    rows = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1).to(device)
    step = loss_chunk_size or max(rows.shape[0], 1)
    total = torch.zeros((), dtype=accumulate, device=device)
    for start in range(0, rows.shape[0], step):
        chunk_targets = targets[start : start + step]
        if not bool((chunk_targets != IGNORE_INDEX).any()):
            continue
        chunk_rows = rows[start : start + step].to(device)
        if recompute:
            value = checkpoint(_chunk_nll_sum, chunk_rows, chunk_targets, head, use_reentrant=False)
        else:
            value = _chunk_nll_sum(chunk_rows, chunk_targets, head)
        total = total + value.to(accumulate)
    return total, (targets != IGNORE_INDEX).sum()
