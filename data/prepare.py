"""Tokenize, filter, split and pack corpora into a dataset on disk for search, train and evaluate.

Run it as a module from the repository root, so the longrope package imports without being installed. The
embedded default (the Python standard library, byte-level tokenizer in models/tiny):

    python -m data.prepare --config configs/tiny/data.yaml          # data/tiny/corpus/pretrain-256 (train + validation)
    python -m data.prepare --config configs/tiny/data_search.yaml   # long documents of the search split
    python -m data.prepare --config configs/tiny/data_test.yaml     # long documents of the held-out test split

Any key can be overridden on the command line, e.g. longer segments:

    python -m data.prepare --config configs/tiny/data.yaml --max_seq_len 1024 --dataset_path data/tiny/corpus/pretrain-1024

Regenerate the committed byte-level tokenizer:

    python -m data.prepare --write_byte_tokenizer models/tiny

Output: ``dataset_path`` (``datasets.save_to_disk``, written atomically) with ``longrope_data.json`` inside: token
counts per split, the resolved config and the sha256 of every local input file.
"""

from __future__ import annotations

import json
import logging
import sys

from longrope.args import DataArguments, PrepareArguments, RetrievalMixArguments, TokenizerArguments
from longrope.config_parser import parse_config, resolved_config
from longrope.errors import LongRopeError, exit_on_user_error

# The dataclasses behind this script's config keys (tests parse every shipped config with them).
CONFIG_KEYS = (TokenizerArguments, DataArguments, RetrievalMixArguments, PrepareArguments)
logger = logging.getLogger("prepare")


def prepare(
    data_args: DataArguments,
    tokenizer_args: TokenizerArguments,
    prepare_args: PrepareArguments | None = None,
    mix_args: RetrievalMixArguments | None = None,
) -> dict:
    """Run the preparation described by ``data_args``; returns the summary that is also saved with the dataset."""
    from longrope.corpus import build_byte_tokenizer
    from longrope.data import check_dataset_path, prepare_dataset, save_dataset_atomically
    from longrope.modeling import load_tokenizer
    from longrope.sources import describe_sources

    prepare_args = prepare_args or PrepareArguments()
    if prepare_args.write_byte_tokenizer:
        build_byte_tokenizer().save_pretrained(prepare_args.write_byte_tokenizer)
        logger.info("wrote the byte-level tokenizer to %s", prepare_args.write_byte_tokenizer)
        return {"tokenizer": prepare_args.write_byte_tokenizer}
    if not data_args.sources:
        raise LongRopeError("sources: empty; list at least one hub dataset, local path or python-stdlib")
    if data_args.dataset_path is None:
        raise LongRopeError("dataset_path: required; the folder the prepared dataset is written to")
    check_dataset_path(data_args.dataset_path)  # before any work: a user's folder is never replaced

    tokenizer = load_tokenizer(tokenizer_args.tokenizer_name_or_path)
    mix_args = mix_args or RetrievalMixArguments()
    if mix_args.retrieval_fraction and data_args.output_format != "packed":
        raise LongRopeError("retrieval_fraction: retrieval rows are mixed into packed output only; set 0 here")
    dataset, counts = prepare_dataset(data_args, tokenizer, mix_args)
    summary = {
        **counts,
        "config": resolved_config(tokenizer_args, data_args, mix_args),
        "inputs": describe_sources(data_args.sources, data_args.corpus_dir),
        "tokenizer": {"name_or_path": tokenizer_args.tokenizer_name_or_path, "vocab_size": len(tokenizer)},
    }
    save_dataset_atomically(dataset, data_args.dataset_path, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    with exit_on_user_error("prepare.py"):
        tokenizer_args, data_args, mix_args, prepare_args = parse_config(CONFIG_KEYS, argv)
        summary = prepare(data_args, tokenizer_args, prepare_args, mix_args)
    if "splits" in summary:
        print(
            json.dumps(
                {k: summary[k] for k in ("documents", "tokens", "documents_kept", "tokens_kept", "splits")}, indent=2
            )
        )
        print(f"saved to {data_args.dataset_path}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
