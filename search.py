"""Evolutionary search for LongRoPE rescale factors: first stage, second stage and short-context stage.

    python search.py --config configs/tiny/search-8x.yaml
    torchrun --nproc_per_node 2 search.py --config configs/tiny/search-8x.yaml        # 2 evaluators (CPU or GPU)
    python search.py --config configs/tiny/search-8x.yaml --resume true               # continue after a kill

Every generation is written atomically to output_dir/search_state.json; a killed run resumed with --resume true
ends with exactly the factors an uninterrupted run gives. Outputs: factors.json (with provenance), the official CSV,
generations.json (population and fitness per generation), factors.png, search_summary.json, config.yaml.
Keys: longrope/args.py (ModelArguments, RopeArguments: the keys every script shares) and longrope/search_stages.py
(SearchArguments).
"""

from __future__ import annotations

from longrope.args import ModelArguments, RopeArguments
from longrope.config_parser import parse_config
from longrope.errors import exit_on_user_error
from longrope.search_stages import SearchArguments, check_rope_keys

# The dataclasses behind this script's config keys (tests parse every shipped config with them).
CONFIG_KEYS = (ModelArguments, RopeArguments, SearchArguments)


def main(argv: list[str] | None = None) -> dict:
    from longrope import distributed
    from longrope.io import check_output_dir
    from longrope.modeling import load_for_evaluation, load_tokenizer
    from longrope.searcher import run_search

    with exit_on_user_error("search.py"):
        model_args, rope_args, search_args = parse_config(CONFIG_KEYS, argv)
        check_rope_keys(rope_args)
        model_args.require_checkpoint("search.py")
        check_output_dir(search_args.output_dir)
        distributed.init_distributed()
        try:
            ###############
            # Model (after every config check)
            ###############
            model = load_for_evaluation(model_args, search_args.gpus_per_process)
            tokenizer = load_tokenizer(model_args.tokenizer_path) if search_args.fitness == "needle" else None
            ###############
            # Search
            ###############
            summary = run_search(model, search_args, rope_args, model_args, tokenizer)
            if distributed.is_main():
                seeds = ", ".join(f"{name} {value:.4f}" for name, value in summary["seed_fitness"].items())
                print(
                    f"best fitness {summary['best_fitness']:.4f} (seeds: {seeds}); "
                    f"{summary['evaluated_candidates']} candidates, {summary['evaluated_tokens']:,} tokens, "
                    f"{summary['seconds']:.0f} s -> {summary['factors_path']}"
                )
            return summary
        finally:
            distributed.shutdown_distributed()


if __name__ == "__main__":
    main()
