"""Evolutionary search for LongRoPE rescale factors: first stage, second stage and short-context stage.

    python search.py --config configs/tiny/search-8x.yaml
    torchrun --nproc_per_node 2 search.py --config configs/tiny/search-8x.yaml        # 2 evaluators (CPU or GPU)
    python search.py --config configs/tiny/search-8x.yaml --resume true               # continue after a kill

Every generation is written atomically to output_dir/search_state.json; a killed run resumed with --resume true
ends with exactly the factors an uninterrupted run gives. Outputs: factors.json (with provenance), the official CSV,
generations.json (population and fitness per generation), factors.png, search_summary.json.
"""

from __future__ import annotations

import sys

from longrope.args import ModelArguments, parse_config, resolved_config
from longrope.errors import LongRopeError
from longrope.searcher import SearchArguments


def main(argv: list[str] | None = None) -> dict:
    import yaml

    from longrope import distributed
    from longrope.io import atomic_write_text
    from longrope.modeling import load_for_evaluation, load_tokenizer
    from longrope.searcher import run_search

    model_args, search_args = parse_config((ModelArguments, SearchArguments), argv)
    distributed.init_distributed()
    try:
        ###############
        # Model (after every config check)
        ###############
        model = load_for_evaluation(model_args, search_args.gpus_per_process)
        tokenizer = None
        if search_args.fitness == "needle":
            tokenizer = load_tokenizer(search_args.tokenizer_name_or_path or model_args.model_name_or_path)
        if distributed.is_main():
            config_text = yaml.safe_dump(resolved_config(model_args, search_args), sort_keys=False)
            atomic_write_text(f"{search_args.output_dir}/config.yaml", config_text)
        ###############
        # Search
        ###############
        summary = run_search(model, search_args, model_args, tokenizer)
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
    try:
        main()
    except LongRopeError as error:
        sys.exit(f"error: {error}")
