"""Train a causal LM with the Hugging Face Trainer: pretrain the tiny embedded model, or fine-tune a checkpoint.

Pretrain the tiny embedded model on CPU (prepare its data first), from the repository root:

    python -m data.prepare --config configs/tiny/data.yaml
    python train.py --config configs/tiny/pretrain.yaml

Any key can be overridden on the command line:

    python train.py --config configs/tiny/pretrain.yaml --learning_rate 1e-3 --max_steps 50 --output_dir outputs/try

Fine-tune with LongRoPE factors (rope_method / rope_factors_path / target_length), DeepSpeed ZeRO-3 and Ulysses
sequence parallelism (sp_size), e.g. the tiny model 256 -> 2048 on 2 CPU processes:

    torchrun --nproc_per_node 2 train.py --config configs/tiny/finetune-8x.yaml

Several GPUs (topology in its own accelerate config, hyper-parameters and sp_size in the training YAML):

    accelerate launch --config_file configs/accelerate/<topology>.yaml train.py --config configs/<model>/<stage>.yaml

Check a recipe without weights, data or GPUs (its architecture shrunk to 2 tiny layers, one step on random tokens):

    python train.py --config configs/llama2-7b/finetune-128k.yaml --dry_run true

Estimate its per-GPU memory (nothing is trained; --estimate_world_size / --estimate_seq_len ask "what if"):

    python train.py --config configs/llama2-7b/finetune-256k.yaml --estimate_memory true

LoRA instead of full fine-tuning (PEFT; embeddings and norms train in full, output_dir gets the merged model):

    torchrun --nproc_per_node 2 train.py --config configs/tiny/finetune-8x-lora.yaml

Keys: longrope/args.py (ModelArguments, DataArguments) and longrope/training.py (LongRopeTrainingArguments:
transformers' TrainingArguments plus the RoPE, sequence-parallel, loss and dry-run keys). output_dir receives the
model and tokenizer (stock transformers format; a fine-tune's config.json has rope_type longrope and the factors
file's sha256, and longrope_factors.json sits beside it and in every checkpoint), config.yaml (the resolved config:
``--config`` it to repeat the run), inputs.json (what was trained on), train_results.json / eval_results.json /
all_results.json, trainer_state.json and checkpoints; a killed run resumes from its last complete checkpoint when
started again with the same output_dir, with the batches already trained on skipped (also under sequence parallelism
and LoRA), so it follows the loss trajectory of an uninterrupted run; ``--ignore_data_skip true`` restarts the data
order instead. A checkpoint of another model or RoPE is refused, naming the key that differs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from longrope import training
from longrope.args import DataArguments, ModelArguments, parse_config, resolved_config
from longrope.data import PackedCollator, load_prepared_dataset, read_summary
from longrope.distributed import shutdown_distributed
from longrope.errors import LongRopeError
from longrope.io import atomic_write_json, atomic_write_text
from longrope.modeling import build_model, load_tokenizer
from longrope.tracking import configure_wandb
from longrope.training import LongRopeTrainingArguments

logger = logging.getLogger("train")

PREPARE_HINT = "prepare it first, e.g. python -m data.prepare --config configs/tiny/data.yaml"


def train(model_args: ModelArguments, data_args: DataArguments, training_args: Any) -> dict[str, float]:
    """Run training as configured; returns the train (and eval) metrics that are also saved to output_dir."""
    import transformers
    import yaml
    from transformers import set_seed

    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())

    ###############
    # Data (checked before any model is built)
    ###############
    if data_args.dataset_path is None:
        raise LongRopeError(f"dataset_path: required; {PREPARE_HINT}")
    dataset = load_prepared_dataset(data_args.dataset_path, prepare_hint=PREPARE_HINT)
    if "train" not in dataset:
        raise LongRopeError(f"dataset_path: '{data_args.dataset_path}' has no train split; {PREPARE_HINT}")
    eval_dataset = dataset.get("validation")
    eval_strategy = getattr(training_args.eval_strategy, "value", training_args.eval_strategy)
    if eval_strategy != "no" and eval_dataset is None:
        raise LongRopeError(
            f"eval_strategy: {eval_strategy} needs a validation split, and '{data_args.dataset_path}' has "
            "none; prepare with validation_fraction > 0 or set eval_strategy: no"
        )
    if "input_ids" not in dataset["train"].column_names:
        raise LongRopeError(f"dataset_path: '{data_args.dataset_path}' has no input_ids column; {PREPARE_HINT}")
    seq_len = len(dataset["train"][0]["input_ids"])
    if data_args.max_seq_len is not None and data_args.max_seq_len != seq_len:
        raise LongRopeError(
            f"max_seq_len: {data_args.max_seq_len}, but the rows of '{data_args.dataset_path}' hold {seq_len} tokens; "
            "prepare the dataset again with this max_seq_len or drop the key"
        )
    global_batch = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    world_size = training.launched_world_size()
    data_parallel = max(1, world_size // training_args.sp_size)
    if len(dataset["train"]) < global_batch * data_parallel:
        raise LongRopeError(
            f"dataset_path: '{data_args.dataset_path}' holds {len(dataset['train'])} training rows, fewer than one "
            f"global batch ({global_batch * data_parallel}); prepare more data or lower per_device_train_batch_size"
        )
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path or model_args.model_name_or_path)
    if model_args.model_name_or_path is not None:
        # Sequence-parallel and RoPE checks need only the config: fail before loading any weights.
        from transformers import AutoConfig

        try:
            model_config = AutoConfig.from_pretrained(
                model_args.model_name_or_path,
                trust_remote_code=model_args.trust_remote_code,
                **(model_args.config_overrides or {}),
            )
        except OSError as error:
            raise LongRopeError(
                f"model_name_or_path: cannot load '{model_args.model_name_or_path}' ({str(error).splitlines()[0]})"
            ) from None
        training.validate_sequence_parallel(model_config, training_args.sp_size, seq_len, world_size)
        resolved_rope = training.resolve_rope(training_args, model_config)
    elif training_args.rope_method != "none" or training_args.sp_size > 1 or training_args.lora_r:
        raise LongRopeError("rope_method / sp_size / lora_r: fine-tuning keys; set model_name_or_path (a checkpoint)")
    else:
        resolved_rope = None

    ###############
    # Model
    ###############
    configure_wandb(training_args.report_to, training_args.output_dir)
    set_seed(training_args.seed)
    model = build_model(model_args, tokenizer)
    num_parameters = training.count_parameters(model)
    logger.info(
        "model: %s, %.2fM parameters, attention %s",
        type(model).__name__,
        num_parameters / 1e6,
        model.config._attn_implementation,
    )

    ###############
    # RoPE: after loading and before the Trainer wraps (and shards) the model; the config then describes it, so
    # every checkpoint loads in stock transformers.
    ###############
    callbacks = [
        training.ThroughputCallback(
            tokens_per_step=seq_len
            * training_args.per_device_train_batch_size
            * training_args.gradient_accumulation_steps
            * data_parallel,
            num_parameters=num_parameters,
            world_size=world_size,
            peak_flops=training_args.peak_flops or training.device_peak_flops(),
        )
    ]
    if resolved_rope is not None:
        training.install_rope(model, resolved_rope, allow_start_tokens=training_args.allow_start_tokens)
        callbacks.append(training.FactorsCopyCallback(resolved_rope))
        logger.info("rope: %s", rope_summary(resolved_rope))

    ###############
    # Memory options: LoRA wraps the model with its RoPE installed; the tiles wrap whatever MLP results.
    ###############
    if training_args.lora_r:
        model = training.apply_lora(model, training_args)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        logger.info("lora: rank %d, %.2fM trainable parameters", training_args.lora_r, trainable / 1e6)
    if training_args.tiled_mlp:
        logger.info("tiled_mlp: %d MLPs tiled", training.enable_tiled_mlp(model, training_args.tiled_mlp_shards))

    ###############
    # Trainer
    ###############
    trainer = training.LongContextTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=eval_dataset,
        data_collator=PackedCollator(),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        resolved = resolved_config(model_args, data_args, training_args)
        resolved.pop("parallelism_config", None)  # rebuilt from sp_size
        if getattr(training_args, "deepspeed_config_path", None):
            resolved["deepspeed"] = training_args.deepspeed_config_path
        config_text = yaml.safe_dump(resolved, sort_keys=False)
        atomic_write_text(
            output_dir / "config.yaml", "# Resolved config of this run; --config it to repeat.\n" + config_text
        )
        atomic_write_json(
            output_dir / "inputs.json",
            {
                "dataset_path": data_args.dataset_path,
                "dataset_fingerprints": {name: split._fingerprint for name, split in dataset.items()},
                "dataset_summary": {k: v for k, v in read_summary(data_args.dataset_path).items() if k != "config"},
                "model_name_or_path": model_args.model_name_or_path,
                "tokenizer": data_args.tokenizer_name_or_path or model_args.model_name_or_path,
                "rope_factors_path": None if resolved_rope is None else resolved_rope.factors_path,
                "rope_factors_sha256": None if resolved_rope is None else resolved_rope.sha256,
            },
        )
        if resolved_rope is not None:
            training.write_factors_copy(resolved_rope, output_dir)

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and output_dir.is_dir():
        checkpoint = training.last_complete_checkpoint(output_dir)
        if checkpoint is not None:
            logger.info("resuming from %s", checkpoint)
    if checkpoint is not None:
        training.check_resume_compatible(checkpoint, model.config)

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
        eval_metrics["eval_perplexity"] = (
            math.exp(eval_loss) if eval_loss < 700 else math.inf
        )  # exp overflows past ~709
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    if training_args.lora_r:
        # The adapters merged into the starting weights: one stock transformers model, rope config included.
        training.save_merged_lora(trainer, model_args, output_dir)
    else:
        # Training runs without the KV cache; the saved model should generate with it.
        model.config.use_cache = True
        trainer.save_model(str(output_dir))
    # DeepSpeed's autograd hooks tie the engine and the ZeRO-3 parameters together through native references the
    # garbage collector cannot see; only engine.destroy() unties them, so their process groups (and threads) can
    # be freed before interpreter exit rather than in its arbitrary teardown order.
    trainer.accelerator.free_memory()
    return metrics


def rope_summary(resolved: training.ResolvedRope) -> str:
    scaling = resolved.scaling
    source = resolved.factors_path or "computed"
    return f"{scaling.method} {scaling.scale:g}x to {scaling.max_position_embeddings}, mscale {scaling.mscale:.4f} ({source})"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: sys.argv) and train (or dry-run); a configuration mistake exits with one line."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        model_args, data_args, training_args = parse_config(
            (ModelArguments, DataArguments, LongRopeTrainingArguments), argv
        )
        if training_args.estimate_memory:
            estimate = training.estimate_for_config(model_args, data_args, training_args)
            print(
                f"Per-GPU memory estimate: {estimate.seq_len} tokens, sp_size {training_args.sp_size}, "
                f"{estimate.world_size} GPUs, {estimate.num_parameters / 1e9:.2f}B parameters "
                f"({estimate.trainable_parameters / 1e9:.2f}B trained)\n{estimate.table()}",
                flush=True,
            )
            metrics = estimate.as_dict()
        elif training_args.dry_run:
            if model_args.model_name_or_path is None:
                raise LongRopeError("dry_run: needs model_name_or_path (the architecture to shrink)")
            architecture = model_args.model_name_or_path
            if not Path(architecture).exists() and training_args.dry_run_architecture:
                architecture = training_args.dry_run_architecture
            metrics = training.dry_run(architecture, model_args.config_overrides, training_args)
        else:
            metrics = train(model_args, data_args, training_args)
    except LongRopeError as error:
        raise SystemExit(f"train.py: error: {error}") from None
    finally:
        # An implicit teardown at interpreter exit can abort a rank ("terminate called without an active
        # exception") after training finished; end the process group while every rank is still alive.
        shutdown_distributed()
    logger.info("metrics: %s", json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
