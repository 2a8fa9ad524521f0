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

Keys: longrope/args.py (ModelArguments, RopeArguments, ExportArguments, DataArguments: the keys every script shares)
and longrope/train_args.py (LongRopeTrainingArguments: transformers' TrainingArguments plus sp_size,
loss_chunk_size, LoRA, memory options, dry run and memory estimate). output_dir receives the
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
from typing import Any

from longrope.args import DataArguments, ExportArguments, ModelArguments, RopeArguments
from longrope.config_parser import parse_config
from longrope.distributed import init_cpu_deepspeed, shutdown_distributed
from longrope.errors import exit_on_user_error
from longrope.train_args import LongRopeTrainingArguments

# The dataclasses behind this script's config keys (tests parse every shipped config with them).
CONFIG_KEYS = (ModelArguments, RopeArguments, ExportArguments, DataArguments, LongRopeTrainingArguments)
logger = logging.getLogger("train")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default: sys.argv) and train (or dry-run, or estimate); a mistake exits with one line."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        with exit_on_user_error("train.py"):
            # Multi-process CPU runs need their gloo state before the training arguments set up devices.
            init_cpu_deepspeed()
            model_args, rope_args, export_args, data_args, training_args = parse_config(CONFIG_KEYS, argv)
            if training_args.estimate_memory:
                from longrope.memory_estimate import estimate_for_config

                estimate = estimate_for_config(model_args, data_args, rope_args, training_args)
                print(
                    f"Per-GPU memory estimate: {estimate.seq_len} tokens, sp_size {training_args.sp_size}, "
                    f"{estimate.world_size} GPUs, {estimate.num_parameters / 1e9:.2f}B parameters "
                    f"({estimate.trainable_parameters / 1e9:.2f}B trained)\n{estimate.table()}",
                    flush=True,
                )
                metrics = estimate.as_dict()
            elif training_args.dry_run:
                from longrope.dry_run import dry_run

                metrics = dry_run(model_args, rope_args, export_args, training_args)
            else:
                from longrope.training import train

                metrics = train(model_args, rope_args, export_args, data_args, training_args)
    finally:
        # An implicit teardown at interpreter exit can abort a rank ("terminate called without an active
        # exception") after training finished; end the process group while every rank is still alive.
        shutdown_distributed()
    logger.info("metrics: %s", json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
