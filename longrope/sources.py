"""Corpora as text: hub datasets, local txt / jsonl / parquet files, globs and folders, or the embedded corpus.

``load_sources`` turns every configured source (:class:`longrope.args.SourceSpec`) into a ``datasets.Dataset`` with
one ``text`` column; ``describe_sources`` records what was read (with the sha256 of every local file) for provenance.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from longrope.args import SourceSpec
from longrope.corpus import (
    DEFAULT_CORPUS_DIR,
    DOCS_SOURCE,
    STDLIB_SOURCE,
    STDLIB_SPLITS,
    build_python_docs,
    build_stdlib_corpus,
)
from longrope.errors import LongRopeError
from longrope.io import sha256_file

if TYPE_CHECKING:
    import datasets

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------------

_LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _looks_like_hub_name(path: str) -> bool:
    pieces = path.split("/")
    return (
        1 <= len(pieces) <= 2
        and all(piece and piece not in (".", "..") for piece in pieces)
        and Path(path).suffix.lower() not in _LOCAL_FORMATS
        and not path.startswith(("~", "."))
    )


def resolve_local_files(path: str) -> list[str] | None:
    """Files behind a local path, glob or folder (sorted); None when ``path`` is not local at all."""
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not matches:
            raise LongRopeError(f"data source '{path}': no file matches this glob; fix the pattern")
        return matches
    if os.path.isdir(expanded):
        matches = sorted(
            str(p) for p in Path(expanded).rglob("*") if p.is_file() and p.suffix.lower() in _LOCAL_FORMATS
        )
        if not matches:
            raise LongRopeError(
                f"data source '{path}': the folder has no {'/'.join(sorted(_LOCAL_FORMATS))} files; point at another"
            )
        return matches
    if os.path.isfile(expanded):
        return [expanded]
    return None


def _local_builder(files: Sequence[str], path: str) -> str:
    suffixes = {Path(f).suffix.lower() for f in files}
    unsupported = sorted(s or "(none)" for s in suffixes if s not in _LOCAL_FORMATS)
    if unsupported:
        raise LongRopeError(
            f"data source '{path}': unsupported file type {unsupported[0]}; use .txt, .jsonl/.json or .parquet"
        )
    builders = {_LOCAL_FORMATS[s] for s in suffixes}
    if len(builders) > 1:
        raise LongRopeError(f"data source '{path}': mixes {sorted(suffixes)} files; give each format its own source")
    return builders.pop()


def load_source(
    spec: SourceSpec, cache_dir: str | None = None, corpus_dir: str | os.PathLike = DEFAULT_CORPUS_DIR
) -> datasets.Dataset:
    """One source as a ``datasets.Dataset`` with a single ``text`` column (one row per document)."""
    import datasets

    if spec.path == STDLIB_SOURCE:
        if spec.split not in STDLIB_SPLITS:
            raise LongRopeError(
                f"sources: {STDLIB_SOURCE} split '{spec.split}' does not exist; use one of {', '.join(STDLIB_SPLITS)}"
            )
        build_stdlib_corpus(corpus_dir)
        files, builder = [str(Path(corpus_dir) / f"{spec.split}.jsonl")], "json"
    elif spec.path == DOCS_SOURCE:
        files, builder = [str(build_python_docs(corpus_dir))], "json"
    else:
        files = resolve_local_files(spec.path)
        builder = _local_builder(files, spec.path) if files is not None else None

    if files is not None:
        options = {"sample_by": "document"} if builder == "text" else {}
        dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **options)
    elif _looks_like_hub_name(spec.path):
        try:
            dataset = datasets.load_dataset(
                spec.path, spec.name, split=spec.split, revision=spec.revision, cache_dir=cache_dir
            )
        except Exception as error:  # datasets raises many types (offline, not found, gated); all mean "cannot load"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise LongRopeError(
                f"data source '{spec.path}' (split '{spec.split}'): could not load it from the Hugging Face Hub "
                f"({reason[:200]}); check the name and your connection, or use a local path"
            ) from error
    else:
        raise LongRopeError(
            f"data source '{spec.path}' does not exist: no such file, folder or glob, and it is not a hub dataset "
            "name; fix the path"
        )

    if isinstance(dataset, datasets.DatasetDict):  # a hub dataset without split selection
        raise LongRopeError(f"data source '{spec.path}': set 'split' to one of {list(dataset)}")
    if spec.text_field not in dataset.column_names:
        raise LongRopeError(
            f"data source '{spec.path}' has no column '{spec.text_field}' (columns: {', '.join(dataset.column_names)}); "
            "set text_field"
        )
    dataset = dataset.select_columns([spec.text_field])
    if spec.text_field != "text":
        dataset = dataset.rename_column(spec.text_field, "text")
    if spec.max_documents is not None:
        dataset = dataset.select(range(min(spec.max_documents, len(dataset))))
    if spec.group_min_chars is not None:
        dataset = datasets.Dataset.from_dict({"text": group_texts(dataset["text"], spec.group_min_chars)})
    return dataset


def group_texts(texts: Sequence[str], min_chars: int) -> list[str]:
    """Consecutive texts joined (by a blank line) until each group holds ``min_chars`` characters; the last group may
    be shorter."""
    groups, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text)
        if size >= min_chars:
            groups.append("\n\n".join(current))
            current, size = [], 0
    if current:
        groups.append("\n\n".join(current))
    return groups


def load_sources(
    specs: Sequence[SourceSpec], cache_dir: str | None = None, corpus_dir: str | os.PathLike = DEFAULT_CORPUS_DIR
) -> datasets.Dataset:
    """All sources, concatenated in order, as one ``text`` column."""
    import datasets

    if not specs:
        raise LongRopeError("sources: empty; list at least one hub dataset, local path or python-stdlib")
    loaded = [load_source(spec, cache_dir=cache_dir, corpus_dir=corpus_dir) for spec in specs]
    loaded = [d.cast(datasets.Features({"text": datasets.Value("string")})) for d in loaded]
    return loaded[0] if len(loaded) == 1 else datasets.concatenate_datasets(loaded)


def describe_sources(
    specs: Sequence[SourceSpec], corpus_dir: str | os.PathLike = DEFAULT_CORPUS_DIR
) -> list[dict[str, Any]]:
    """Provenance of each source: the spec plus sha256 of every local input file (hub sources: name and revision)."""
    described = []
    for spec in specs:
        entry: dict[str, Any] = asdict(spec)
        if spec.path == STDLIB_SOURCE:
            files = [str(Path(corpus_dir) / f"{spec.split}.jsonl")]
        elif spec.path == DOCS_SOURCE:
            files = [str(Path(corpus_dir) / f"{DOCS_SOURCE}.jsonl")]
        else:
            files = resolve_local_files(spec.path)
        if files is not None:
            entry["files"] = {f: sha256_file(f) for f in files}
        described.append(entry)
    return described
