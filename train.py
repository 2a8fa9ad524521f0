"""Train a causal LM with the Hugging Face Trainer: pretrain the tiny embedded model, or fine-tune a checkpoint.

Pretrain the tiny embedded model on CPU (prepare its data first), from the repository root:

    python -m data.prepare --config configs/tiny/data.yaml
    python train.py --config configs/tiny/pretrain.yaml

Any key can be overridden on the command line:

    python train.py --config configs/tiny/pretrain.yaml --learning_rate 1e-3 --max_steps 50 --output_dir outputs/try

Several processes (topology in its own accelerate config):

    accelerate launch --config_file configs/accelerate/<topology>.yaml train.py --config configs/<model>/<stage>.yaml

Keys: longrope/args.py (ModelArguments, DataArguments) and transformers' TrainingArguments. output_dir receives the
model and tokenizer (stock transformers format), config.yaml (the resolved config: ``--config`` it to repeat the run),
inputs.json (what was trained on), train_results.json / eval_results.json / all_results.json, trainer_state.json and
checkpoints; a killed run resumes from its last checkpoint when started again with the same output_dir.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from longrope.args import DataArguments, ModelArguments, parse_config, resolved_config
from longrope.data import PackedCollator, load_prepared_dataset, read_summary
from longrope.errors import LongRopeError
from longrope.io import atomic_write_json, atomic_write_text
from longrope.modeling import build_model, load_tokenizer
from longrope.tracking import configure_wandb

logger = logging.getLogger("train")

PREPARE_HINT = "prepare it first, e.g. python -m data.prepare --config configs/tiny/data.yaml"


def train(model_args: ModelArguments, data_args: DataArguments, training_args: Any) -> dict[str, float]:
    """Run training as configured; returns the train (and eval) metrics that are also saved to output_dir."""
    import transformers
    import yaml
    from transformers import Trainer, set_seed
    from transformers.trainer_utils import get_last_checkpoint

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
    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path or model_args.model_name_or_path)

    ###############
    # Model
    ###############
    configure_wandb(training_args.report_to, training_args.output_dir)
    set_seed(training_args.seed)
    model = build_model(model_args, tokenizer)
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        "model: %s, %.2fM parameters, attention %s",
        type(model).__name__,
        num_parameters / 1e6,
        model.config._attn_implementation,
    )

    ###############
    # RoPE: the long-context stages install their method here, after loading and before the Trainer wraps the
    # model: longrope.rope.install(model, scaling) with the factors named in the config.
    ###############

    ###############
    # Trainer
    ###############
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"],
        eval_dataset=eval_dataset,
        data_collator=PackedCollator(),
        processing_class=tokenizer,
    )
    output_dir = Path(training_args.output_dir)
    if trainer.is_world_process_zero():
        config_text = yaml.safe_dump(resolved_config(model_args, data_args, training_args), sort_keys=False)
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
            },
        )

    checkpoint = training_args.resume_from_checkpoint
    if checkpoint is None and output_dir.is_dir():
        checkpoint = get_last_checkpoint(str(output_dir))
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
        eval_metrics["eval_perplexity"] = (
            math.exp(eval_loss) if eval_loss < 700 else math.inf
        )  # exp overflows past ~709
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)

    # Training runs without the KV cache; the saved model should generate with it.
    model.config.use_cache = True
    trainer.save_model(str(output_dir))
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Parse ``argv`` (default: sys.argv) and train; a configuration mistake exits with one line."""
    from transformers import TrainingArguments

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        model_args, data_args, training_args = parse_config((ModelArguments, DataArguments, TrainingArguments), argv)
        metrics = train(model_args, data_args, training_args)
    except LongRopeError as error:
        raise SystemExit(f"train.py: error: {error}") from None
    logger.info("metrics: %s", json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
