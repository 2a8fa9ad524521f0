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

from longrope.args import DataArguments, PrepareArguments, parse_config, resolved_config
from longrope.data import (
    build_byte_tokenizer,
    describe_sources,
    prepare_dataset,
    save_dataset_atomically,
)
from longrope.errors import LongRopeError
from longrope.modeling import load_tokenizer

logger = logging.getLogger("prepare")


def prepare(data_args: DataArguments, prepare_args: PrepareArguments | None = None) -> dict:
    """Run the preparation described by ``data_args``; returns the summary that is also saved with the dataset."""
    prepare_args = prepare_args or PrepareArguments()
    if prepare_args.write_byte_tokenizer:
        build_byte_tokenizer().save_pretrained(prepare_args.write_byte_tokenizer)
        logger.info("wrote the byte-level tokenizer to %s", prepare_args.write_byte_tokenizer)
        return {"tokenizer": prepare_args.write_byte_tokenizer}
    if not data_args.sources:
        raise LongRopeError("sources: empty; list at least one hub dataset, local path or python-stdlib")
    if data_args.dataset_path is None:
        raise LongRopeError("dataset_path: required; the folder the prepared dataset is written to")

    tokenizer = load_tokenizer(data_args.tokenizer_name_or_path)
    dataset, counts = prepare_dataset(data_args, tokenizer)
    summary = {
        **counts,
        "config": resolved_config(data_args),
        "inputs": describe_sources(data_args.sources, data_args.corpus_dir),
        "tokenizer": {"name_or_path": data_args.tokenizer_name_or_path, "vocab_size": len(tokenizer)},
    }
    save_dataset_atomically(dataset, data_args.dataset_path, summary)
    return summary


def main(argv: list[str] | None = None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        data_args, prepare_args = parse_config((DataArguments, PrepareArguments), argv)
        summary = prepare(data_args, prepare_args)
    except LongRopeError as error:
        raise SystemExit(f"prepare.py: error: {error}") from None
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
