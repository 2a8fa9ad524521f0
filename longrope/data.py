"""Preparing a dataset on disk: tokenize, filter, split, select and pack (or cut) documents; save and load it.

The pipeline behind ``data/prepare.py`` (each step is a function, so search, train and evaluate share it):

1. ``load_sources`` (:mod:`longrope.sources`): hub datasets, local files or the embedded corpus as one ``text`` column.
2. ``tokenize_documents``: tokens of every document, without special tokens (``num_proc`` workers, cached by
   ``datasets``), plus a stable per-document hash that drives the train/validation split.
3. ``filter_min_tokens`` / ``split_by_document_hash`` / ``select_documents``: keep documents of at least N tokens
   (the paper's "samples >= target length"), split by document so no document is in two splits, take N of them.
4. ``pack_dataset`` (:mod:`longrope.packing`): BOS/EOS-bookended fixed-length segments with position ids; or, for
   search and evaluation, whole documents cut to ``max_seq_len``.

A prepared dataset carries ``longrope_data.json`` (counts, the resolved config, the inputs' sha256); that file is
also what marks the folder as one a later preparation may replace. Nothing here does I/O at import time.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from longrope import context_rows
from longrope.corpus import split_hash
from longrope.errors import LongRopeError
from longrope.io import atomic_write_json, replace_directory, staging_directory
from longrope.packing import PackedCollator, pack_dataset
from longrope.sources import load_sources

if TYPE_CHECKING:
    import datasets

    from longrope.args import DataArguments, RetrievalMixArguments

__all__ = ["PackedCollator"]  # re-exported: train.py's collator lives with the packing it undoes


def require_bos_eos(tokenizer: Any, name: str = "tokenizer_name_or_path") -> tuple[int, int]:
    """(bos_token_id, eos_token_id) of ``tokenizer``; LongRopeError when either is missing."""
    bos, eos = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)
    if bos is None or eos is None:
        missing = " and ".join(t for t, i in (("BOS", bos), ("EOS", eos)) if i is None)
        raise LongRopeError(
            f"{name}: the tokenizer has no {missing} token, and segments are bookended with both: "
            "set bos_token/eos_token in its tokenizer_config.json or use another tokenizer"
        )
    return bos, eos


# ----------------------------------------------------------------------------------------------------------------
# Tokenization, filtering, splitting
# ----------------------------------------------------------------------------------------------------------------


class _TokenizeBatch:
    """Picklable map function (``num_proc`` workers need one); no special tokens, literal "<s>" stays text."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        encoded = self.tokenizer(
            batch["text"], add_special_tokens=False, split_special_tokens=True, return_attention_mask=False
        )["input_ids"]
        return {
            "input_ids": encoded,
            "num_tokens": [len(ids) for ids in encoded],
            "document_hash": [split_hash(text) for text in batch["text"]],
        }


def tokenize_documents(
    dataset: datasets.Dataset, tokenizer: Any, num_proc: int | None = None, batch_size: int = 64
) -> datasets.Dataset:
    """Columns ``input_ids`` (no special tokens), ``num_tokens`` and ``document_hash`` (stable, in [0, 1))."""
    import datasets

    features = datasets.Features(
        {
            "input_ids": datasets.List(datasets.Value("int32")),
            "num_tokens": datasets.Value("int64"),
            "document_hash": datasets.Value("float64"),
        }
    )
    return dataset.map(
        _TokenizeBatch(tokenizer),
        batched=True,
        batch_size=batch_size,
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None,
        remove_columns=dataset.column_names,
        features=features,
        desc="Tokenizing",
    )


def filter_token_lists(documents: Sequence[Sequence[int]], min_tokens: int) -> list[list[int]]:
    """Documents with at least ``min_tokens`` tokens, in order (the list form of ``filter_min_tokens``)."""
    return [list(d) for d in documents if len(d) >= min_tokens]


def filter_min_tokens(dataset: datasets.Dataset, min_tokens: int, num_proc: int | None = None) -> datasets.Dataset:
    """Rows whose ``num_tokens`` is at least ``min_tokens`` (no-op for 0)."""
    if min_tokens <= 0:
        return dataset
    return dataset.filter(
        lambda counts: [n >= min_tokens for n in counts],
        input_columns="num_tokens",
        batched=True,
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None,
        desc=f"Keeping documents >= {min_tokens} tokens",
    )


def split_by_document_hash(
    dataset: datasets.Dataset, validation_fraction: float
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """(train, validation) by each document's content hash: deterministic, order-free, no document in both."""
    if validation_fraction <= 0:
        return dataset, None
    hashes = np.asarray(dataset["document_hash"])
    validation = np.flatnonzero(hashes < validation_fraction)
    train = np.flatnonzero(hashes >= validation_fraction)
    return dataset.select(train), dataset.select(validation)


def select_documents(
    dataset: datasets.Dataset, num_documents: int | None, min_tokens: int = 0, seed: int = 0, where: str = "dataset"
) -> datasets.Dataset:
    """``num_documents`` documents (seeded random choice) of those present; LongRopeError when too few exist."""
    if num_documents is None:
        return dataset
    if len(dataset) < num_documents:
        raise LongRopeError(
            f"num_documents: {where} has {len(dataset)} documents with >= {min_tokens} tokens, {num_documents} "
            "needed; lower num_documents or min_doc_tokens, or add longer documents"
        )
    return dataset.shuffle(seed=seed).select(range(num_documents)).flatten_indices()


def truncate_documents(dataset: datasets.Dataset, max_tokens: int | None) -> datasets.Dataset:
    """One row per document, ``input_ids`` cut to ``max_tokens`` (kept: ``num_tokens`` of the whole document)."""
    columns = [c for c in dataset.column_names if c not in ("input_ids", "num_tokens")]
    if max_tokens is None:
        return dataset.remove_columns(columns)
    return dataset.map(
        lambda ids: {"input_ids": [row[:max_tokens] for row in ids]},
        input_columns="input_ids",
        batched=True,
        remove_columns=columns,
        desc=f"Truncating documents to {max_tokens} tokens",
    )


# ----------------------------------------------------------------------------------------------------------------
# The whole preparation, saved to disk
# ----------------------------------------------------------------------------------------------------------------

SUMMARY_FILE = "longrope_data.json"


def _count_tokens(dataset: datasets.Dataset | None) -> int:
    if dataset is None or len(dataset) == 0:
        return 0
    return int(np.sum(np.asarray(dataset["num_tokens"], dtype=np.int64)))


def prepare_dataset(
    settings: DataArguments, tokenizer: Any, mix: RetrievalMixArguments | None = None
) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Load, tokenize, filter, split and pack (or truncate) per ``settings``; returns (DatasetDict, summary).

    Packed output has a ``train`` split (and ``validation`` when ``validation_fraction > 0``) with ``input_ids`` and
    ``position_ids``; documents output has one ``documents`` split with ``input_ids`` (cut to ``max_seq_len``) and
    ``num_tokens`` (the whole document's). A split left empty is an error. With ``mix``'s fractions above 0, those
    shares of the train split's rows are retrieval, copy and lookup rows (:mod:`longrope.context_rows`), appended
    after the packed ones in that order.
    """
    import datasets

    bos, eos = require_bos_eos(tokenizer)
    raw = load_sources(settings.sources, cache_dir=settings.dataset_cache_dir, corpus_dir=settings.corpus_dir)
    tokenized = tokenize_documents(raw, tokenizer, num_proc=settings.dataset_num_proc)
    kept = filter_min_tokens(tokenized, settings.min_doc_tokens, num_proc=settings.dataset_num_proc)
    kept = select_documents(
        kept, settings.num_documents, settings.min_doc_tokens, settings.document_seed, where="the sources"
    )
    if settings.output_format == "documents":
        splits = {"documents": kept}
    else:
        train, validation = split_by_document_hash(kept, settings.validation_fraction)
        splits = {"train": train} if validation is None else {"train": train, "validation": validation}

    summary: dict[str, Any] = {
        "documents": len(tokenized),
        "tokens": _count_tokens(tokenized),
        "documents_kept": len(kept),
        "tokens_kept": _count_tokens(kept),
        "splits": {},
    }
    output = {}
    for name, split in splits.items():
        if len(split) == 0:
            raise LongRopeError(
                f"split '{name}' is empty: no document is left after min_doc_tokens={settings.min_doc_tokens} and "
                f"validation_fraction={settings.validation_fraction}; lower them or add data"
            )
        if settings.output_format == "packed":
            if settings.max_seq_len is None:
                raise LongRopeError("max_seq_len: required when output_format is 'packed'; set the segment length")
            rows = pack_dataset(
                split,
                settings.max_seq_len,
                bos,
                eos,
                settings.bookend,
                settings.position_ids,
                num_proc=settings.dataset_num_proc,
            )
            if len(rows) == 0:
                raise LongRopeError(
                    f"split '{name}' is empty after packing: its {_count_tokens(split)} tokens do not fill one "
                    f"{settings.max_seq_len}-token segment; lower max_seq_len or add data"
                )
            if name == "train" and mix is not None and mix.context_fraction > 0:
                counts = context_rows.row_counts(len(rows), mix)
                extra = context_rows.context_rows(
                    split["input_ids"], counts, settings.max_seq_len, tokenizer, bos, eos, mix, settings.document_seed
                )
                rows = datasets.concatenate_datasets([rows, datasets.Dataset.from_dict(extra, features=rows.features)])
                summary["context_rows"] = counts  # rows of each kind; the fractions are in the summary's config
            segment_tokens = len(rows) * settings.max_seq_len
        else:
            rows = truncate_documents(split, settings.max_seq_len)
            segment_tokens = int(sum(len(ids) for ids in rows["input_ids"]))
        output[name] = rows
        summary["splits"][name] = {
            "documents": len(split),
            "document_tokens": _count_tokens(split),
            "rows": len(rows),
            "row_tokens": segment_tokens,
        }
    return datasets.DatasetDict(output), summary


def check_dataset_path(path: str | os.PathLike | None, key: str = "dataset_path") -> Path:
    """A folder a preparation may write: absent, empty, or a dataset this project prepared (it is replaced whole)."""
    from longrope.io import check_replaceable

    return check_replaceable(path, key, SUMMARY_FILE, "data/prepare.py")


def save_dataset_atomically(dataset: datasets.DatasetDict, path: str | os.PathLike, summary: dict[str, Any]) -> None:
    """``save_to_disk`` into a sibling temp folder, write the summary JSON inside, then swap it into ``path``."""
    path = check_dataset_path(path)
    staging = staging_directory(path)
    try:
        dataset.save_to_disk(str(staging))
        atomic_write_json(staging / SUMMARY_FILE, summary)
        replace_directory(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_prepared_dataset(
    path: str | os.PathLike, prepare_hint: str = "run data/prepare.py", key: str = "dataset_path"
) -> datasets.DatasetDict:
    """A dataset written by ``data/prepare.py``; LongRopeError naming ``key`` when absent or empty."""
    import datasets

    path = Path(path)
    if not (path / "dataset_dict.json").is_file():
        raise LongRopeError(f"{key}: '{path}' holds no prepared dataset; {prepare_hint}")
    dataset = datasets.load_from_disk(str(path))
    for name, split in dataset.items():
        if len(split) == 0:
            raise LongRopeError(f"{key}: split '{name}' of '{path}' is empty; prepare it again with more data")
    return dataset


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    """The summary JSON that ``data/prepare.py`` saved with a dataset (empty dict when absent)."""
    summary_path = Path(path) / SUMMARY_FILE
    return json.loads(summary_path.read_text()) if summary_path.is_file() else {}


def prepare_hint(dataset_path: str | os.PathLike) -> str:
    """How to build ``dataset_path``: the committed data config that writes exactly that path, when one exists."""
    import yaml

    from longrope import REPOSITORY

    wanted = os.path.normpath(str(dataset_path))
    for config in sorted((REPOSITORY / "configs").glob("*/*.yaml")):
        try:
            values = yaml.safe_load(config.read_text()) or {}
        except yaml.YAMLError:
            continue
        if isinstance(values, dict) and os.path.normpath(str(values.get("dataset_path", ""))) == wanted:
            return f"prepare it first: python -m data.prepare --config {config.relative_to(REPOSITORY)}"
    return f"prepare it first: python -m data.prepare --config <your data config> --dataset_path {dataset_path}"


# ----------------------------------------------------------------------------------------------------------------
# Held-out windows of the embedded corpus
# ----------------------------------------------------------------------------------------------------------------


def heldout_windows(
    tokenizer: Any,
    window_len: int = 256,
    num_windows: int | None = 64,
    split: str = "test",
    root: str | os.PathLike | None = None,
) -> np.ndarray:
    """``[n, window_len]`` windows of a corpus split, each ``BOS`` + ``window_len - 1`` consecutive tokens.

    The split's documents are joined with EOS (as in ``bookend="segment"`` training) and cut into consecutive
    pieces; ``num_windows`` of them are taken evenly spaced over the whole split (all of them when None).
    """
    from longrope.corpus import stdlib_documents
    from longrope.packing import document_stream

    bos, eos = require_bos_eos(tokenizer)
    documents = stdlib_documents(root, splits=[split])
    token_lists = tokenizer([d.text for d in documents], add_special_tokens=False, split_special_tokens=True)
    stream, _ = document_stream(token_lists["input_ids"], bos, eos, "segment")
    body = window_len - 1
    pieces = stream[: (stream.size // body) * body].reshape(-1, body)
    if num_windows is not None:
        if pieces.shape[0] < num_windows:
            raise LongRopeError(f"num_windows: split '{split}' has {pieces.shape[0]} windows, {num_windows} asked")
        pieces = pieces[np.linspace(0, pieces.shape[0] - 1, num_windows).round().astype(int)]
    return np.concatenate((np.full((pieces.shape[0], 1), bos), pieces), axis=1)
