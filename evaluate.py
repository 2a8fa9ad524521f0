"""Evaluate RoPE methods on one model: long-context perplexity, passkey, needle perplexity, lm-eval tasks.

    python evaluate.py --config configs/tiny/eval-baselines.yaml
    python evaluate.py --config configs/tiny/eval-baselines.yaml --methods none yarn outputs/search-8x/factors.json
    torchrun --nproc_per_node 2 evaluate.py --config configs/tiny/eval-sp.yaml     # one sequence over 2 processes

Writes output_dir/results.json (every number, with the model, factors-file hashes and data hash), results.md (a
methods x lengths table) and plot.png (perplexity vs length, log axes, one line per method). Each finished method is
also kept in output_dir/methods/: a rerun with the same settings reuses it, so an interrupted run resumes. Keys:
longrope/args.py (ModelArguments, RopeArguments: the defaults of every method entry) and longrope/evaluation.py
(EvalArguments).
"""

from __future__ import annotations

from longrope.args import ModelArguments, RopeArguments
from longrope.config_parser import parse_config
from longrope.errors import LongRopeError, exit_on_user_error
from longrope.evaluation import EvalArguments

# The dataclasses behind this script's config keys (tests parse every shipped config with them).
CONFIG_KEYS = (ModelArguments, RopeArguments, EvalArguments)


def main(argv: list[str] | None = None) -> dict:
    import yaml

    from longrope import distributed
    from longrope.config_parser import resolved_config
    from longrope.evaluation import evaluate_methods, log_to_wandb, resolve_methods, write_outputs
    from longrope.io import atomic_write_text, check_output_dir
    from longrope.modeling import load_config, load_for_evaluation, load_tokenizer

    with exit_on_user_error("evaluate.py"):
        model_args, rope_args, eval_args = parse_config(CONFIG_KEYS, argv)
        if rope_args.rope_method is not None or rope_args.rope_factors_path is not None:
            raise LongRopeError(
                "rope_method / rope_factors_path: evaluate.py compares the entries of `methods`; list them there"
            )
        model_args.require_checkpoint("evaluate.py")
        check_output_dir(eval_args.output_dir)
        # Every method checked against the model's RoPE before any weights load.
        specs = resolve_methods(eval_args, rope_args, load_config(model_args))
        tokenizer = load_tokenizer(model_args.tokenizer_path)
        distributed.init_distributed()
        try:
            ###############
            # Model and evaluation
            ###############
            model = load_for_evaluation(model_args)
            settings = resolved_config(model_args, rope_args, eval_args)
            results = evaluate_methods(
                model,
                tokenizer,
                eval_args,
                specs,
                model_args.model_name_or_path,
                checkpoint_dir=eval_args.output_dir,
                settings=settings,
            )
            if distributed.is_main():
                atomic_write_text(f"{eval_args.output_dir}/config.yaml", yaml.safe_dump(settings, sort_keys=False))
                paths = write_outputs(results, eval_args.output_dir)
                print(paths["markdown"].read_text())
                print(f"wrote {', '.join(str(p) for p in paths.values())}")
                if eval_args.report_to == "wandb":
                    log_to_wandb(results, paths, eval_args)
            return results
        finally:
            distributed.shutdown_distributed()


if __name__ == "__main__":
    main()
