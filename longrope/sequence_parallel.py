"""Ulysses sequence parallelism (DeepSpeed ALST) for training and evaluation: checks, the group, resumable data.

Each sequence is split into ``sp_size`` contiguous shards, one per rank of a sequence-parallel group; DeepSpeed's
Ulysses attention all-to-alls heads for sequence inside attention. This module holds what the project adds around
it: the one-line checks of an ``sp_size`` against a model and a launch (before any weights load), the group every rank
of a sequence agrees on (the RoPE long/short choice and the chunked loss reduce over it), Ulysses registration for
evaluate.py, and the two things DeepSpeed's Ulysses data loader adapter does not do for the Trainer: start each
epoch on a fresh, reshuffled pass, and skip already-trained batches when a run resumes.
"""

from __future__ import annotations

import contextlib
from typing import Any

from longrope.distributed import skip_deepspeed_inference_all_reduce_build
from longrope.errors import LongRopeError


def check_heads(config: Any, sp_size: int, key: str = "sp_size") -> None:
    """DeepSpeed Ulysses splits attention heads over the sequence-parallel ranks: the query heads must divide evenly,
    and the KV heads either divide evenly or are fewer and divide sp_size (then DeepSpeed replicates them)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % sp_size:
        raise LongRopeError(
            f"{key}: {sp_size} does not divide the model's num_attention_heads ({heads}); use a divisor"
        )
    if kv_heads % sp_size and sp_size % kv_heads:
        raise LongRopeError(
            f"{key}: {sp_size} and the model's num_key_value_heads ({kv_heads}) must divide one another (DeepSpeed "
            "Ulysses replicates KV heads only by a whole factor); use a divisor or a multiple of it"
        )


def validate(config: Any, sp_size: int, seq_len: int, world_size: int) -> None:
    """One-line errors for an sp_size that cannot split this model, these sequences or this launch."""
    if sp_size == 1:
        return
    if world_size % sp_size:
        raise LongRopeError(
            f"sp_size: {sp_size} does not divide the {world_size} launched process(es); launch a multiple of "
            f"{sp_size} processes (torchrun --nproc_per_node {sp_size}) or lower sp_size"
        )
    check_heads(config, sp_size)
    if seq_len % sp_size:
        raise LongRopeError(
            f"sp_size: {sp_size} does not divide the sequence length {seq_len}; prepare the data with a "
            f"max_seq_len divisible by {sp_size}"
        )


def group() -> Any:
    """The sequence-parallel group of this rank, once DeepSpeed has built it (the Trainer's accelerator.prepare,
    or :func:`register_for_evaluation`). Raises when it does not exist: a silent None would let the ranks of one
    sequence choose different RoPE factors."""
    from deepspeed.runtime.sequence_parallel import parallel_state_sp

    return parallel_state_sp.get_sequence_parallel_group()


def register_for_evaluation(model: Any, sp_size: int, world_size: int) -> Any:
    """Register DeepSpeed Ulysses attention on ``model`` for evaluation and return the group (None when 1)."""
    if sp_size == 1:
        return None
    if world_size != sp_size:
        raise LongRopeError(
            f"sp_size: {sp_size} but {world_size} processes were launched; use torchrun --nproc_per_node {sp_size}"
        )
    check_heads(model.config, sp_size)
    import deepspeed
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF

    on_gpu = next(model.parameters()).device.type == "cuda"
    if not on_gpu:
        skip_deepspeed_inference_all_reduce_build()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    mpu = UlyssesSPAttentionHF.register_with_transformers(
        model_name_or_path=model,
        core_attn_implementation=model.config._attn_implementation,
        sequence_parallel_size=sp_size,
        micro_batch_size=1,
        seq_length_is_variable=True,
    )
    return mpu.get_sequence_parallel_group()


# ----------------------------------------------------------------------------------------------------------------
# The Ulysses data loader adapter across epochs and resumes (private DeepSpeed attributes: see README "Private APIs")


def is_ulysses_loader(dataloader: Any) -> bool:
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    except ImportError:
        return False
    return isinstance(dataloader, UlyssesSPDataLoaderAdapter)


def restart_epoch(adapter: Any, epoch: int) -> None:
    """Start DeepSpeed's Ulysses adapter on a fresh pass over its data loader, shuffled for ``epoch``, as ``iter()``
    does for a plain data loader at each epoch.

    The adapter is its own iterator and forwards no set_epoch. Left alone, each epoch after the first starts by
    draining the previous pass's spent iterator (one update step with no batch: an uninterrupted run trains a step
    less per epoch boundary than max_steps), and a resumed run's first epoch would shuffle as epoch 0.
    """
    adapter.dl.set_epoch(epoch)
    adapter.micro_batches.clear()
    adapter.iter = iter(adapter.dl)


def skip_first_batches(adapter: Any, num_batches: int) -> Any:
    """A fresh Ulysses adapter over ``adapter``'s data loader that yields what ``adapter`` yields after its first
    ``num_batches`` micro-batches, without computing anything for the skipped ones.

    Each batch of the wrapped (data-parallel) loader becomes sp_size micro-batches: one per rank of the SP group, each
    sequence-sharded over the whole group. So whole loader batches are skipped in its batch sampler (accelerate's
    skip_first_batches: no rows are read for them), and the micro-batches of a partly trained loader batch are drawn
    and dropped (every rank of the group does so: the adapter's all-gathers stay matched).
    """
    from accelerate import skip_first_batches as skip_loader_batches
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    whole, partial = divmod(num_batches, adapter.sp_world_size)
    skipped = UlyssesSPDataLoaderAdapter(
        skip_loader_batches(adapter.dl, whole) if whole else adapter.dl,
        sp_rank=adapter.sp_rank,
        sp_group=adapter.sp_group,
        sp_world_size=adapter.sp_world_size,
        device=adapter.device,
    )
    for _ in range(partial):
        next(skipped)
    return skipped


@contextlib.contextmanager
def trainer_skips_ulysses_batches() -> Any:
    """Within the block, the Trainer's resume skip (``transformers.trainer.skip_first_batches``, accelerate's, which
    rebuilds a torch DataLoader and cannot see through DeepSpeed's Ulysses adapter) handles the adapter too.

    transformers has no hook for this; the swap is scoped to one ``_run_epoch`` call and guarded by a test that fails
    when transformers moves the name (tests/test_private_apis.py).
    """
    import transformers.trainer as trainer_module

    plain = trainer_module.skip_first_batches  # AttributeError, not a silent no-op, if transformers moves it

    def skip(dataloader: Any, num_batches: int = 0) -> Any:
        if is_ulysses_loader(dataloader):
            return skip_first_batches(dataloader, num_batches)
        return plain(dataloader, num_batches)

    trainer_module.skip_first_batches = skip
    try:
        yield
    finally:
        trainer_module.skip_first_batches = plain
