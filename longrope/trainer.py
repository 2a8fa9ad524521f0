"""The Trainer of long-context fine-tuning and the callbacks that keep its checkpoints self-describing.

``LongContextTrainer`` is transformers' Trainer with the memory-linear loss (:mod:`longrope.loss`, also under Ulysses
sequence parallelism), throughput metrics in every log, DeepSpeed checkpoint offload per step, LoRA checkpoints that
hold the fully trained modules, and Ulysses data loading that survives epochs and resumes
(:mod:`longrope.sequence_parallel`). Its private-method overrides (``_run_epoch``, ``_save``,
``_load_from_checkpoint``) are guarded by tests/test_private_apis.py and listed in the README.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback

from longrope import factors as factors_io
from longrope import rope, sequence_parallel
from longrope.errors import LongRopeError
from longrope.lora import LORA_TRAINABLE_FILE_NAME, is_peft, lora_extra_trainable_names
from longrope.loss import chunked_nll
from longrope.memory_options import activation_offload_context
from longrope.rope_config import ResolvedRope
from longrope.throughput import ThroughputCallback


class LongContextTrainer(Trainer):
    """The Trainer, with the memory-linear loss when ``loss_chunk_size`` is set (also under Ulysses SP, where each
    rank scores its shard and the per-rank sums are combined by token count, as transformers does for SP), and
    throughput metrics in every training log when a ThroughputCallback is among its callbacks.

    With ``offload_activations`` each training step (forward and backward) runs inside DeepSpeed's checkpoint-offload
    hooks; ``activation_offload_totals`` sums their counters over the run. A LoRA model's checkpoints also hold the
    fully trained modules (PEFT's adapter files do not), and a resume without DeepSpeed loads them back.

    Under Ulysses SP every epoch restarts DeepSpeed's data loader adapter and a resumed epoch skips the micro-batches
    already trained on (:mod:`longrope.sequence_parallel`), so a resumed run sees the batches of the uninterrupted one
    in the same order.
    """

    activation_offload_totals: dict[str, int] | None = None

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if not getattr(self.args, "offload_activations", False):
            return super().training_step(model, inputs, num_items_in_batch)
        offload = activation_offload_context()
        with offload:
            loss = super().training_step(model, inputs, num_items_in_batch)
            stats = dataclasses.asdict(offload.stats)  # reset when the context exits
        totals = self.activation_offload_totals or {}
        self.activation_offload_totals = {key: totals.get(key, 0) + value for key, value in stats.items()}
        return loss

    def _run_epoch(self, **kwargs: Any) -> Any:
        loader = kwargs.get("train_dataloader")
        if not sequence_parallel.is_ulysses_loader(loader):
            return super()._run_epoch(**kwargs)
        sequence_parallel.restart_epoch(loader, kwargs["epoch"])
        with sequence_parallel.trainer_skips_ulysses_batches():
            return super()._run_epoch(**kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if not (self.args.should_save and is_peft(model)):
            return
        from safetensors.torch import save_file

        names = set(lora_extra_trainable_names(model))
        source = state_dict if state_dict else dict(model.named_parameters())
        extra = {name: tensor.detach().cpu().contiguous() for name, tensor in source.items() if name in names}
        if extra:
            save_file(extra, str(Path(output_dir or self.args.output_dir) / LORA_TRAINABLE_FILE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.accelerator.unwrap_model(self.model)
        path = Path(resume_from_checkpoint) / LORA_TRAINABLE_FILE_NAME
        if is_peft(model) and path.is_file():
            from safetensors.torch import load_file

            result = model.load_state_dict(load_file(str(path)), strict=False)
            if result.unexpected_keys:
                raise LongRopeError(
                    f"resume_from_checkpoint: {path} holds {result.unexpected_keys[:3]}, not parameters of this run"
                )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, ThroughputCallback):
                    logs = {**logs, **callback.metrics(self.state.global_step)}
        super().log(logs, *args, **kwargs)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        chunk_size = getattr(self.args, "loss_chunk_size", None)
        if not chunk_size or not model.training:
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule for its own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # A per-micro-batch token mean: the Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        import torch
        import torch.nn.functional as F

        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        if shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        causal_lm = self.accelerator.unwrap_model(model)
        captured: dict[str, Any] = {}

        # The decoder's last hidden state (the lm_head input of every position) is taken from the base model.
        def keep_hidden(module: Any, args: Any, output: Any) -> None:
            captured["hidden"] = output[0]

        handle = causal_lm.get_decoder().register_forward_hook(keep_hidden)
        try:
            # Only the last position's logits are computed by the model; the chunked loss scores all positions.
            outputs = model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        nll_sum, tokens = chunked_nll(
            captured["hidden"], causal_lm.get_output_embeddings(), shift_labels, chunk_size, recompute=True
        )
        if sequence_parallel_enabled(self):
            group = sequence_parallel.group()
            nll_sum = torch.stack(torch.distributed.nn.functional.all_gather(nll_sum, group=group)).sum()
            tokens = torch.stack(torch.distributed.nn.functional.all_gather(tokens, group=group)).sum()
        loss = nll_sum / tokens.clamp(min=1)
        return (loss, outputs) if return_outputs else loss


def sequence_parallel_enabled(trainer: Any) -> bool:
    """Whether the Trainer runs DeepSpeed Ulysses sequence parallelism (accelerate's parallelism config)."""
    pc = getattr(trainer.accelerator, "parallelism_config", None)
    return pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled


class SequenceParallelRopeCallback(TrainerCallback):
    """Once the Trainer has built the sequence-parallel group (before the first step), every installed RoPE module
    decides long vs short factors from the group's global sequence length, so all ranks of a sequence agree."""

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(args, "sp_size", 1) > 1 and rope.installed_modules(model):
            rope.set_sequence_parallel_group(model, sequence_parallel.group())


def write_factors_copy(resolved: ResolvedRope, directory: str | os.PathLike) -> None:
    """Copy the training factors into ``directory`` (the output folder or a checkpoint) as longrope_factors.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / factors_io.FACTORS_FILE_NAME
    temporary = target.with_name(f".{target.name}.tmp")
    if resolved.factors_path is not None and not resolved.factors_path.endswith(".csv"):
        shutil.copyfile(resolved.factors_path, temporary)
        os.replace(temporary, target)
    else:
        factors_io.save(target, resolved.scaling, {"source": resolved.factors_path or "computed by train.py"})


class FactorsCopyCallback(TrainerCallback):
    """Every checkpoint folder gets the factors file beside its config (the config carries its sha256); with W&B on,
    the factors file is also logged as an artifact when training begins."""

    def __init__(self, resolved: ResolvedRope) -> None:
        self.resolved = resolved

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            log_factors_artifact(args.report_to, self.resolved)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                write_factors_copy(self.resolved, checkpoint)


def log_factors_artifact(report_to: Any, resolved: ResolvedRope | None) -> None:
    """The factors file as a W&B artifact when W&B is on (the run exists once the Trainer has started)."""
    if resolved is None or resolved.factors_path is None or "wandb" not in (report_to or []):
        return
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    artifact = wandb.Artifact(f"factors-{(resolved.sha256 or 'computed')[:12]}", type="longrope-factors")
    artifact.add_file(resolved.factors_path, name=factors_io.FACTORS_FILE_NAME)
    wandb.run.log_artifact(artifact)
