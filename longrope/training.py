"""One training run of train.py: every check first, then model, Trainer, checkpoints and the saved model.

Everything that can be checked before weights load is (data, sequence parallelism against the heads, the RoPE keys
against the model's geometry, and whether output_dir may receive this run), so a refused run costs seconds and writes
nothing. A run resumes from the last complete checkpoint in its output_dir; a checkpoint of another model or RoPE is
refused, naming the key that differs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from longrope import distributed, rope, sequence_parallel
from longrope import factors as factors_io
from longrope.errors import LongRopeError
from longrope.rope_config import SHA256_CONFIG_KEY, ResolvedRope, config_with_rope, resolve_rope

logger = logging.getLogger("train")

# The file every train.py output_dir holds (what it was trained on); its presence marks the folder as a run's.
INPUTS_FILE = "inputs.json"
# Keys a resumed run must share with the checkpoint it resumes (besides every rope_parameters entry).
RESUME_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    SHA256_CONFIG_KEY,
)


def check_trainable_rope(resolved: ResolvedRope, export_args: Any, training_args: Any) -> None:
    """The RoPE a training run may use: one fixed factor set a checkpoint config can hold."""
    entry = rope.method(resolved.method)
    if not entry.fixed:
        trainable = ", ".join(rope.methods_with(fixed=True))
        raise LongRopeError(
            f"rope_method: {entry.name} has no fixed factor set, so no checkpoint config could hold what was trained; "
            f"use one of {trainable}"
        )
    if resolved.scaling.start_tokens and not export_args.allow_start_tokens:
        raise LongRopeError(
            f"rope_factors_path: {resolved.factors_path} keeps {resolved.scaling.start_tokens} start tokens, which the "
            "saved config cannot express; set allow_start_tokens: true to train with them anyway, or use factors "
            "with start tokens 0"
        )
    if factors_io.has_own_short_mscale(resolved.scaling) and not export_args.allow_shared_mscale:
        raise LongRopeError(
            f"rope_factors_path: {resolved.factors_path} gives the short set mscale "
            f"{resolved.scaling.short_set_mscale:.4g} but the long set {resolved.scaling.mscale:.4g}, which the saved "
            "config (one attention_factor) cannot express; set allow_shared_mscale: true to train with them anyway, "
            "or use factors without short_mscale"
        )
    if training_args.mixed_context_windows and resolved.method == "none":
        raise LongRopeError("mixed_context_windows: needs a rope_method (the long factors); set rope_method")


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that the Trainer finished writing, or None.

    trainer_state.json is the last file a checkpoint receives, and without it the Trainer would restart at step 0
    with the checkpoint's weights; a newer folder lacking it (the run was killed while saving) is passed over.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import sort_checkpoints

    for path in reversed(sort_checkpoints(str(output_dir))):  # by step number, newest first
        if (Path(path) / TRAINER_STATE_NAME).is_file():
            return path
        logger.warning("%s has no %s (killed while saving?); an older checkpoint is used", path, TRAINER_STATE_NAME)
    return None


def _differing_key(saved: dict[str, Any], current: dict[str, Any]) -> tuple[str, Any, Any] | None:
    for key in RESUME_KEYS:
        if saved.get(key) != current.get(key):
            return key, saved.get(key), current.get(key)
    saved_rope, current_rope = saved.get("rope_parameters") or {}, current.get("rope_parameters") or {}
    for key in sorted(set(saved_rope) | set(current_rope)):
        if saved_rope.get(key) != current_rope.get(key):
            return f"rope_parameters.{key}", saved_rope.get(key), current_rope.get(key)
    return None


def check_output_dir(output_dir: str | Path, run_config: Any, resume_from_checkpoint: str | None) -> str | None:
    """Whether this run may write into ``output_dir``, decided before anything is written; returns the checkpoint
    to resume from.

    An output_dir of another train.py run is accepted only with the same model and RoPE (``run_config``: the config
    this run's model will have), whether it resumes a checkpoint or retrains a finished model; a non-empty folder
    train.py did not write is refused.
    """
    from longrope.io import check_output_dir as check_writable

    output_dir = check_writable(output_dir)
    checkpoint = resume_from_checkpoint
    if output_dir.is_dir() and any(output_dir.iterdir()):
        ours = (output_dir / INPUTS_FILE).is_file() or any(output_dir.glob("checkpoint-*"))
        if not ours:
            shown = ", ".join(sorted(entry.name for entry in output_dir.iterdir())[:3])
            raise LongRopeError(
                f"output_dir: {output_dir} holds files train.py did not write ({shown}); choose a new folder"
            )
        if checkpoint is None:
            checkpoint = last_complete_checkpoint(output_dir)
    sources = [Path(checkpoint)] if checkpoint is not None else []
    sources.append(output_dir)
    current = run_config.to_dict()
    for source in sources:
        saved_path = source / "config.json"
        if not saved_path.is_file():
            continue
        difference = _differing_key(json.loads(saved_path.read_text()), current)
        if difference is not None:
            key, saved, now = difference
            raise LongRopeError(
                f"output_dir: {source} was trained with {key} = {saved!r} but this run has {now!r}; use another "
                "output_dir or the same model and rope keys"
            )
    return checkpoint


def train(model_args: Any, rope_args: Any, export_args: Any, data_args: Any, training_args: Any) -> dict[str, float]:
    """Run training as configured; returns the train (and eval) metrics that are also saved to output_dir."""
    import transformers
    import yaml
    from transformers import set_seed

    from longrope.config_parser import resolved_config
    from longrope.data import PackedCollator, load_prepared_dataset, prepare_hint, read_summary
    from longrope.io import atomic_write_json, atomic_write_text
    from longrope.modeling import load_config, load_tokenizer, new_model_config, prepare_model
    from longrope.throughput import ThroughputCallback, count_parameters, device_peak_flops
    from longrope.tracking import configure_wandb, finish_wandb_run
    from longrope.trainer import (
        FactorsCopyCallback,
        LongContextTrainer,
        SequenceParallelRopeCallback,
        write_factors_copy,
    )

    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())

    ###############
    # Data (checked before any model is built)
    ###############
    if data_args.dataset_path is None:
        raise LongRopeError("dataset_path: required; the folder data/prepare.py wrote the training segments to")
    hint = prepare_hint(data_args.dataset_path)
    dataset = load_prepared_dataset(data_args.dataset_path, prepare_hint=hint)
    if "train" not in dataset:
        raise LongRopeError(f"dataset_path: '{data_args.dataset_path}' has no train split; {hint}")
    eval_dataset = dataset.get("validation")
    if eval_dataset is not None and training_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(training_args.max_eval_samples, len(eval_dataset))))
    eval_strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if eval_strategy != "no" and eval_dataset is None:
        raise LongRopeError(
            f"eval_strategy: {eval_strategy} needs a validation split, and '{data_args.dataset_path}' has "
            "none; prepare with validation_fraction > 0 or set eval_strategy: no"
        )
    if "input_ids" not in dataset["train"].column_names:
        raise LongRopeError(f"dataset_path: '{data_args.dataset_path}' has no input_ids column; {hint}")
    seq_len = len(dataset["train"][0]["input_ids"])
    if data_args.max_seq_len is not None and data_args.max_seq_len != seq_len:
        raise LongRopeError(
            f"max_seq_len: {data_args.max_seq_len}, but the rows of '{data_args.dataset_path}' hold {seq_len} tokens; "
            "prepare the dataset again with this max_seq_len or drop the key"
        )
    if training_args.deepspeed and "WORLD_SIZE" not in os.environ:
        # DeepSpeed reads its rank from a launcher's environment and otherwise tries MPI (mpi4py), deep in model loading.
        raise LongRopeError(
            "deepspeed: a DeepSpeed run needs a launcher; start it with `accelerate launch --num_processes N train.py` "
            "or `torchrun --nproc_per_node N train.py` (N may be 1), or drop deepspeed from the config"
        )
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    world_size = distributed.launched_world_size()
    data_parallel = max(1, world_size // training_args.sp_size)
    if len(dataset["train"]) < global_batch * data_parallel:
        raise LongRopeError(
            f"dataset_path: '{data_args.dataset_path}' holds {len(dataset['train'])} training rows, fewer than one "
            f"global batch ({global_batch * data_parallel}); prepare more data or lower per_device_train_batch_size"
        )
    tokenizer = load_tokenizer(model_args.tokenizer_path)

    ###############
    # Model config, RoPE and output_dir: checked before loading any weights
    ###############
    if model_args.model_name_or_path is not None:
        model_config = load_config(model_args)
        sequence_parallel.validate(model_config, training_args.sp_size, seq_len, world_size)
        resolved = resolve_rope(rope_args, model_config)
        check_trainable_rope(resolved, export_args, training_args)
        if training_args.mixed_context_windows:
            from longrope.rope_config import with_original_short_factors

            resolved = with_original_short_factors(resolved)
        run_config = model_config
        if resolved.method != "none":
            run_config = config_with_rope(
                model_config, resolved, export_args.allow_start_tokens, export_args.allow_shared_mscale
            )
    elif model_args.model_config is not None:
        if rope_args.method != "none" or training_args.sp_size > 1 or training_args.lora_r:
            raise LongRopeError(
                "rope_method / sp_size / lora_r: fine-tuning keys; set model_name_or_path (a checkpoint)"
            )
        resolved = None
        run_config = new_model_config(model_args, tokenizer)
    else:
        raise LongRopeError(
            "model_name_or_path / model_config: set one (a checkpoint to fine-tune, or a config to pretrain from "
            "scratch)"
        )
    if distributed.is_main() and resolved is not None:
        for note in resolved.notes:
            logger.warning(note)
    output_dir = Path(training_args.output_dir)
    checkpoint = check_output_dir(output_dir, run_config, training_args.resume_from_checkpoint)

    ###############
    # Model
    ###############
    configure_wandb(training_args.report_to, training_args.output_dir)
    set_seed(training_args.seed)
    # RoPE is installed after loading and before the Trainer wraps (and shards) the model; the config then
    # describes it, so every checkpoint loads in stock transformers.
    model = prepare_model(model_args, resolved, training_args, export_args, tokenizer=tokenizer)
    num_parameters = count_parameters(model)
    logger.info(
        "model: %s, %.2fM parameters, attention %s",
        type(model).__name__,
        num_parameters / 1e6,
        model.config._attn_implementation,
    )
    if resolved is not None and resolved.method != "none":
        logger.info("rope: %s", resolved.summary())
    logger.info(
        "processes: %d (sequence parallel %d x data parallel %d), precision %s",
        training_args.world_size,
        training_args.sp_size,
        data_parallel,
        "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
    )
    if training_args.lora_r:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("lora: rank %d, %.2fM trainable parameters", training_args.lora_r, trainable / 1e6)

    ###############
    # Trainer
    ###############
    callbacks = [
        ThroughputCallback(
            tokens_per_step=seq_len * global_batch * data_parallel,
            num_parameters=num_parameters,
            world_size=world_size,
            peak_flops=training_args.peak_flops or device_peak_flops(),
        ),
        SequenceParallelRopeCallback(),
    ]
    if resolved is not None and resolved.method != "none":
        callbacks.append(FactorsCopyCallback(resolved))
    trainer = LongContextTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=eval_dataset,
        data_collator=PackedCollator(),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        resolved_keys = resolved_config(model_args, rope_args, export_args, data_args, training_args)
        resolved_keys.pop("parallelism_config", None)  # rebuilt from sp_size
        if getattr(training_args, "deepspeed_config_path", None):
            resolved_keys["deepspeed"] = training_args.deepspeed_config_path
        config_text = yaml.safe_dump(resolved_keys, sort_keys=False)
        atomic_write_text(
            output_dir / "config.yaml", "# Resolved config of this run; --config it to repeat.\n" + config_text
        )
        atomic_write_json(
            output_dir / INPUTS_FILE,
            {
                "dataset_path": data_args.dataset_path,
                "dataset_fingerprints": {name: split._fingerprint for name, split in dataset.items()},
                "dataset_summary": {k: v for k, v in read_summary(data_args.dataset_path).items() if k != "config"},
                "model_name_or_path": model_args.model_name_or_path,
                "tokenizer": model_args.tokenizer_path,
                "rope_factors_path": None if resolved is None else resolved.factors_path,
                "rope_factors_sha256": None if resolved is None else resolved.sha256,
            },
        )
        if resolved is not None and resolved.method != "none":
            write_factors_copy(resolved, output_dir)
    if checkpoint is not None:
        logger.info("resuming from %s", checkpoint)

    ###############
    # Train, evaluate, save
    ###############
    result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = dict(result.metrics)
    metrics["train_tokens_per_second"] = metrics.get("train_samples_per_second", 0.0) * seq_len
    metrics["num_parameters"] = num_parameters
    metrics["seq_len"] = seq_len
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    if eval_dataset is not None:
        eval_metrics = trainer.evaluate()
        eval_loss = eval_metrics.get("eval_loss", math.inf)
        eval_metrics["eval_perplexity"] = math.exp(eval_loss) if eval_loss < 700 else math.inf  # exp overflows ~709
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    if training_args.lora_r:
        from longrope.lora import save_merged_lora

        # The adapters merged into the starting weights: one stock transformers model, rope config included.
        save_merged_lora(trainer, model_args, output_dir)
    else:
        # Training runs without the KV cache; the saved model should generate with it.
        model.config.use_cache = True
        trainer.save_model(str(output_dir))
    # DeepSpeed's autograd hooks tie the engine and the ZeRO-3 parameters together through native references the
    # garbage collector cannot see; only engine.destroy() unties them, so their process groups (and threads) can
    # be freed before interpreter exit rather than in its arbitrary teardown order.
    trainer.accelerator.free_memory()
    finish_wandb_run()
    return metrics
