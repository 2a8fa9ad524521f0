"""Evaluate RoPE methods on one model: long-context perplexity, passkey, needle perplexity, lm-eval tasks.

    python evaluate.py --config configs/tiny/eval-baselines.yaml
    python evaluate.py --config configs/tiny/eval-baselines.yaml --methods none yarn outputs/search-8x/factors.json
    torchrun --nproc_per_node 2 evaluate.py --config configs/tiny/eval-sp.yaml     # one sequence over 2 processes

Writes output_dir/results.json (every number, with the model, factors-file hashes and data hash), results.md (a
methods x lengths table) and plot.png (perplexity vs length, log axes, one line per method).
"""

from __future__ import annotations

import sys

from longrope.args import ModelArguments, parse_config, resolved_config
from longrope.errors import LongRopeError
from longrope.evaluation import EvalArguments


def main(argv: list[str] | None = None) -> dict:
    import yaml

    from longrope import distributed
    from longrope.evaluation import evaluate_methods, log_to_wandb, resolve_methods, write_outputs
    from longrope.io import atomic_write_text
    from longrope.modeling import load_for_evaluation, load_tokenizer

    model_args, eval_args = parse_config((ModelArguments, EvalArguments), argv)
    distributed.init_distributed()
    try:
        ###############
        # Model and tokenizer
        ###############
        tokenizer = load_tokenizer(eval_args.tokenizer_name_or_path or model_args.model_name_or_path)
        model = load_for_evaluation(model_args)
        resolve_methods(eval_args, model.config)  # every method checked before the first forward
        ###############
        # Evaluation
        ###############
        results = evaluate_methods(model, tokenizer, eval_args, model_args.model_name_or_path)
        if distributed.is_main():
            config_text = yaml.safe_dump(resolved_config(model_args, eval_args), sort_keys=False)
            atomic_write_text(f"{eval_args.output_dir}/config.yaml", config_text)
            paths = write_outputs(results, eval_args.output_dir)
            print(paths["markdown"].read_text())
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
            if eval_args.report_to == "wandb":
                log_to_wandb(results, paths, eval_args)
        return results
    finally:
        distributed.shutdown_distributed()


if __name__ == "__main__":
    try:
        main()
    except LongRopeError as error:
        sys.exit(f"error: {error}")
