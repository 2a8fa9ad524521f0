"""Corpora, tokenization, long-document selection, packing and position ids.

The pipeline behind ``data/prepare.py`` (each step is a function here, so search, train and evaluate share it):

1. ``load_sources``: hub datasets by name (``datasets.load_dataset``), local files, globs or folders of
   txt / jsonl / parquet, or the embedded corpus ``python-stdlib``; every source becomes one ``text`` column.
2. ``tokenize_documents``: tokens of every document, without special tokens (``num_proc`` workers, cached by
   ``datasets``), plus a stable per-document hash that drives the train/validation split.
3. ``filter_min_tokens`` / ``split_by_document_hash`` / ``select_documents``: keep documents of at least N tokens
   (the paper's "samples >= target length"), split by document so no document is in two splits, take N of them.
4. ``pack_documents`` (pure, numpy) / ``pack_dataset``: fixed-length segments bookended with BOS and EOS
   (LongRoPE section 4.1) with ``position_ids`` that run on through the segment or restart at every document
   (LongRoPE2 mixed-window training, papers.md section 8). ``PackedCollator`` turns rows into model inputs.

The embedded corpus ("the tiny world", DESIGN.md): the ``.py`` files of the running interpreter's standard library,
tests and site-packages excluded, split by document into ``train`` / ``search`` / ``test`` with a stable hash of the
relative path, so a file keeps its split when other files appear. Long documents (>= ``LONG_DOCUMENT_TOKENS`` bytes,
which the byte-level tokenizer turns into as many tokens) use larger search/test shares than short ones, so both
evaluation splits hold enough long documents for search and perplexity at 64x the tiny model's window.

The byte-level tokenizer of the tiny world (``build_byte_tokenizer``): token id ``b`` is byte ``b`` (0..255), then
``<s>`` (256), ``</s>`` (257), ``<pad>`` (258). Like Llama's, it prepends BOS when asked for special tokens and
never adds EOS; literal ``"<s>"`` in text stays text (``split_special_tokens``), so any text round-trips exactly.

Nothing here does I/O at import time.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from longrope.errors import LongRopeError
from longrope.io import atomic_write_json, atomic_write_text, sha256_file

if TYPE_CHECKING:
    import datasets
    import torch

    from longrope.args import DataArguments

logger = logging.getLogger(__name__)

Bookend = Literal["document", "segment"]
PositionIdsMode = Literal["continuous", "document"]
OutputFormat = Literal["packed", "documents"]

# ----------------------------------------------------------------------------------------------------------------
# The embedded corpus: the Python standard library
# ----------------------------------------------------------------------------------------------------------------

STDLIB_SOURCE = "python-stdlib"
STDLIB_SPLITS = ("train", "search", "test")
LONG_DOCUMENT_TOKENS = 16384
MIN_LONG_DOCUMENTS_PER_EVAL_SPLIT = 20
DEFAULT_CORPUS_DIR = "data/tiny/corpus/documents"

# Cumulative hash thresholds (train below the first, search below the second, test above). Long documents carry
# three quarters of the bytes; giving them 17.5 % search / 17.5 % test shares leaves >= 20 long documents in each
# evaluation split on CPython 3.11 while training keeps ~70 % of all bytes.
_LONG_DOCUMENT_THRESHOLDS = (0.65, 0.825)
_SHORT_DOCUMENT_THRESHOLDS = (0.90, 0.95)
_SPLIT_HASH_SALT = "longrope-tiny-corpus-v1"

# Directory names that hold tests, third-party packages or build products rather than library source.
_EXCLUDED_DIRECTORY_NAMES = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})


@dataclass(frozen=True)
class CorpusDocument:
    """One source file of the embedded corpus: its path relative to the stdlib root (POSIX), text and split."""

    path: str
    text: str
    num_bytes: int
    split: str


def stdlib_root() -> Path:
    """The standard-library directory of the running interpreter (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_excluded_directory(name: str) -> bool:
    return name in _EXCLUDED_DIRECTORY_NAMES or name.startswith("config-")


def _is_corpus_file(name: str) -> bool:
    # _sysconfigdata_* records the build machine (paths, compiler flags): it would make the corpus machine-specific.
    return name.endswith(".py") and not name.startswith("_sysconfigdata")


def list_stdlib_files(root: str | os.PathLike | None = None) -> list[str]:
    """Relative POSIX paths of the corpus files under ``root`` (default: this interpreter's stdlib), sorted."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise LongRopeError(f"stdlib root '{root}' is not a directory: pass the Python standard-library folder")
    paths = []
    for directory, subdirectories, files in os.walk(root):
        # Pruning here means excluded folders (site-packages can be huge) are never walked.
        subdirectories[:] = [name for name in subdirectories if not _is_excluded_directory(name)]
        relative = Path(directory).relative_to(root).parts
        paths.extend("/".join((*relative, name)) for name in files if _is_corpus_file(name))
    return sorted(paths)


def split_hash(key: str) -> float:
    """A stable number in [0, 1) from ``key`` (sha256), independent of Python's hash seed and of other keys."""
    digest = hashlib.sha256(f"{_SPLIT_HASH_SALT}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(relative_path: str, num_bytes: int) -> str:
    """The split of a corpus file: a function of its own path and size only, so other files never move it."""
    first, second = _LONG_DOCUMENT_THRESHOLDS if num_bytes >= LONG_DOCUMENT_TOKENS else _SHORT_DOCUMENT_THRESHOLDS
    value = split_hash(relative_path)
    return "train" if value < first else "search" if value < second else "test"


def stdlib_documents(
    root: str | os.PathLike | None = None,
    max_files: int | None = None,
    splits: Iterable[str] | None = None,
) -> list[CorpusDocument]:
    """The embedded corpus in deterministic (path) order.

    Args:
        root: standard-library folder; default this interpreter's.
        max_files: keep only the first N files in path order (tests use it to stay fast); splits do not change.
        splits: keep only documents of these splits.
    """
    wanted = set(splits) if splits is not None else set(STDLIB_SPLITS)
    unknown = wanted - set(STDLIB_SPLITS)
    if unknown:
        raise LongRopeError(
            f"split {sorted(unknown)[0]!r} of {STDLIB_SOURCE} does not exist: use one of {STDLIB_SPLITS}"
        )
    root = Path(root) if root is not None else stdlib_root()
    documents = []
    for relative_path in list_stdlib_files(root)[:max_files]:
        raw = (root / relative_path).read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("skipping %s: not UTF-8", relative_path)
            continue
        split = assign_split(relative_path, len(raw))
        if split in wanted:
            documents.append(CorpusDocument(relative_path, text, len(raw), split))
    return documents


def corpus_fingerprint(documents: Sequence[CorpusDocument]) -> str:
    """sha256 over (path, content hash) of every document: equal fingerprints mean byte-identical corpora."""
    digest = hashlib.sha256()
    for document in documents:
        digest.update(document.path.encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(document.text.encode("utf-8")).digest())
    return digest.hexdigest()


def summarize_corpus(documents: Sequence[CorpusDocument]) -> dict[str, Any]:
    """Per-split document, byte and long-document counts, with the interpreter and corpus fingerprint."""
    per_split = {}
    for split in STDLIB_SPLITS:
        selected = [d for d in documents if d.split == split]
        per_split[split] = {
            "documents": len(selected),
            "bytes": sum(d.num_bytes for d in selected),
            f"documents_ge_{LONG_DOCUMENT_TOKENS}_tokens": sum(d.num_bytes >= LONG_DOCUMENT_TOKENS for d in selected),
            "longest_document_bytes": max((d.num_bytes for d in selected), default=0),
        }
    return {
        "source": STDLIB_SOURCE,
        "python_version": sys.version.split()[0],
        "implementation": sys.implementation.name,
        "fingerprint": corpus_fingerprint(documents),
        "documents": len(documents),
        "bytes": sum(d.num_bytes for d in documents),
        "splits": per_split,
    }


def check_long_document_quota(summary: dict[str, Any], minimum: int = MIN_LONG_DOCUMENTS_PER_EVAL_SPLIT) -> None:
    """Raise unless the search and test splits each hold ``minimum`` documents of >= LONG_DOCUMENT_TOKENS."""
    key = f"documents_ge_{LONG_DOCUMENT_TOKENS}_tokens"
    for split in ("search", "test"):
        found = summary["splits"][split][key]
        if found < minimum:
            raise LongRopeError(
                f"{STDLIB_SOURCE} split '{split}' has {found} documents of >= {LONG_DOCUMENT_TOKENS} tokens, "
                f"{minimum} needed: this Python's stdlib is too small for the embedded default"
            )


def build_stdlib_corpus(
    output_dir: str | os.PathLike = DEFAULT_CORPUS_DIR,
    root: str | os.PathLike | None = None,
    max_files: int | None = None,
    min_long_documents: int = MIN_LONG_DOCUMENTS_PER_EVAL_SPLIT,
) -> dict[str, Any]:
    """Write the embedded corpus as ``{split}.jsonl`` (fields ``path``, ``text``) plus ``corpus.json`` (summary).

    Files are rewritten only when the corpus fingerprint changed, so ``datasets`` keeps its cache. Returns the
    summary. Raises LongRopeError when an evaluation split has fewer than ``min_long_documents`` long documents.
    """
    output_dir = Path(output_dir)
    documents = stdlib_documents(root, max_files=max_files)
    summary = summarize_corpus(documents)
    check_long_document_quota(summary, min_long_documents)
    summary_path = output_dir / "corpus.json"
    if summary_path.is_file():
        try:
            previous = json.loads(summary_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("fingerprint") == summary["fingerprint"] and all(
            (output_dir / f"{split}.jsonl").is_file() for split in STDLIB_SPLITS
        ):
            return previous
    for split in STDLIB_SPLITS:
        lines = [json.dumps({"path": d.path, "text": d.text}) for d in documents if d.split == split]
        atomic_write_text(output_dir / f"{split}.jsonl", "".join(line + "\n" for line in lines))
    atomic_write_json(summary_path, summary)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The byte-level tokenizer of the tiny world
# ----------------------------------------------------------------------------------------------------------------

BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<s>", "</s>", "<pad>"


def build_byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per byte (id = byte value) and ``<s>``, ``</s>``, ``<pad>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # BPE without merges over the byte-to-unicode alphabet is exactly "one token per byte".
    byte_to_symbol = bytes_to_unicode()
    vocab = {byte_to_symbol[byte]: byte for byte in range(256)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)]
    )
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,
    )


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
# Sources
# ----------------------------------------------------------------------------------------------------------------

_LOCAL_FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class SourceSpec:
    """One corpus: a hub dataset name, a local file / glob / folder (txt, jsonl, parquet), or ``python-stdlib``.

    A txt file is one document. ``split`` names the hub split (``"train[:1000]"`` slicing works) or, for
    ``python-stdlib``, one of ``train`` / ``search`` / ``test``; it is ignored for local files.
    """

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    revision: str | None = None
    max_documents: int | None = None

    @classmethod
    def from_config(cls, value: Any, where: str = "sources") -> SourceSpec:
        """A SourceSpec from a YAML value: a string (the path) or a mapping of the fields above."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(path=value)
        if not isinstance(value, dict):
            raise LongRopeError(f"{where}: expected a path/name or a mapping with 'path', got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise LongRopeError(f"{where}: unknown key '{unknown[0]}'; allowed keys: {', '.join(sorted(known))}")
        if not value.get("path"):
            raise LongRopeError(
                f"{where}: 'path' is required (a hub dataset name, a local file/glob/folder or {STDLIB_SOURCE})"
            )
        return cls(**value)


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
    return dataset


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
        else:
            files = resolve_local_files(spec.path)
        if files is not None:
            entry["files"] = {f: sha256_file(f) for f in files}
        described.append(entry)
    return described


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


# ----------------------------------------------------------------------------------------------------------------
# Packing and position ids
# ----------------------------------------------------------------------------------------------------------------


def _document_stream(
    documents: Sequence[Sequence[int]], bos_token_id: int, eos_token_id: int, bookend: Bookend
) -> tuple[np.ndarray, np.ndarray]:
    """The concatenated token stream and a mask of the tokens that start a document."""
    pieces, starts = [], []
    for document in documents:
        ids = np.asarray(document, dtype=np.int64)
        if ids.size == 0:
            continue
        if bookend == "document":
            ids = np.concatenate(([bos_token_id], ids, [eos_token_id]))
        else:
            # Inside a bookended segment documents are separated by EOS; the segment itself gets BOS ... EOS.
            ids = np.concatenate((ids, [eos_token_id]))
        start = np.zeros(ids.size, dtype=bool)
        start[0] = True
        pieces.append(ids)
        starts.append(start)
    if not pieces:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(pieces), np.concatenate(starts)


def position_ids_from_starts(starts: np.ndarray) -> np.ndarray:
    """Per row, positions that count up from 0 and restart wherever ``starts`` is True (column 0 always starts)."""
    starts = np.array(starts, dtype=bool, copy=True, ndmin=2)
    starts[:, 0] = True
    index = np.broadcast_to(np.arange(starts.shape[1]), starts.shape)
    last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return index - last_start


def pack_documents(
    documents: Sequence[Sequence[int]],
    seq_len: int,
    bos_token_id: int,
    eos_token_id: int,
    bookend: Bookend = "document",
    position_ids: PositionIdsMode = "continuous",
) -> dict[str, np.ndarray]:
    """Pack token lists into ``seq_len`` segments; the incomplete tail is dropped.

    Args:
        documents: token ids of each document, without special tokens (empty documents are skipped).
        seq_len: tokens per segment.
        bookend: ``"document"``: every document becomes ``BOS doc EOS`` and the stream of those is cut into
            segments. ``"segment"`` (LongRoPE section 4.1, "segments bookended with BOS and EOS"): documents are
            joined with EOS and cut into ``seq_len - 2`` pieces, each wrapped as ``BOS piece EOS``. A cut that lands
            on a document boundary can put the separator next to a bookend (``BOS EOS ...``, ``... EOS EOS``).
        position_ids: ``"continuous"``: ``0 .. seq_len-1`` in every segment. ``"document"``: restart at 0 at the
            segment start and at each document start inside it (transformers then masks attention between
            documents when no attention mask is passed, as LongRoPE2's short-window training needs). In
            ``"segment"`` bookending the leading BOS belongs to the first (possibly continued) document.

    Returns:
        ``{"input_ids": int64 [n, seq_len], "position_ids": int64 [n, seq_len]}``.
    """
    if bookend not in ("document", "segment"):
        raise LongRopeError(f"bookend: {bookend!r} is not one of 'document', 'segment'")
    if position_ids not in ("continuous", "document"):
        raise LongRopeError(f"position_ids: {position_ids!r} is not one of 'continuous', 'document'")
    minimum = 3 if bookend == "segment" else 1
    if seq_len < minimum:
        raise LongRopeError(f"max_seq_len: {seq_len} is too short for bookend={bookend!r}; use at least {minimum}")
    stream, starts = _document_stream(documents, bos_token_id, eos_token_id, bookend)
    body_len = seq_len - 2 if bookend == "segment" else seq_len
    rows = stream.size // body_len
    input_ids = stream[: rows * body_len].reshape(rows, body_len)
    starts = starts[: rows * body_len].reshape(rows, body_len)
    if bookend == "segment":
        input_ids = np.concatenate(
            (np.full((rows, 1), bos_token_id), input_ids, np.full((rows, 1), eos_token_id)), axis=1
        ).astype(np.int64)
        starts = np.concatenate((np.ones((rows, 1), bool), starts, np.zeros((rows, 1), bool)), axis=1)
        starts[:, 1] = False
    if position_ids == "continuous" or rows == 0:
        positions = np.broadcast_to(np.arange(seq_len, dtype=np.int64), (rows, seq_len)).copy()
    else:
        positions = position_ids_from_starts(starts).astype(np.int64)
    return {"input_ids": input_ids, "position_ids": positions}


class _PackBatch:
    def __init__(self, seq_len: int, bos: int, eos: int, bookend: Bookend, position_ids: PositionIdsMode) -> None:
        self.seq_len, self.bos, self.eos = seq_len, bos, eos
        self.bookend, self.position_ids = bookend, position_ids

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        packed = pack_documents(
            batch["input_ids"], self.seq_len, self.bos, self.eos, bookend=self.bookend, position_ids=self.position_ids
        )
        return {"input_ids": list(packed["input_ids"]), "position_ids": list(packed["position_ids"])}


def pack_dataset(
    dataset: datasets.Dataset,
    seq_len: int,
    bos_token_id: int,
    eos_token_id: int,
    bookend: Bookend = "document",
    position_ids: PositionIdsMode = "continuous",
    num_proc: int | None = None,
    documents_per_batch: int = 1000,
) -> datasets.Dataset:
    """``pack_documents`` over a tokenized dataset, ``documents_per_batch`` documents at a time.

    Each batch drops its own incomplete tail (at most ``seq_len - 1`` tokens), the usual trade for parallel packing.
    """
    import datasets

    features = datasets.Features(
        {"input_ids": datasets.List(datasets.Value("int32")), "position_ids": datasets.List(datasets.Value("int32"))}
    )
    return dataset.map(
        _PackBatch(seq_len, bos_token_id, eos_token_id, bookend, position_ids),
        batched=True,
        batch_size=documents_per_batch,
        num_proc=num_proc if num_proc and num_proc > 1 and len(dataset) > 1 else None,
        remove_columns=dataset.column_names,
        features=features,
        desc=f"Packing into {seq_len}-token segments",
    )


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


@dataclass
class PackedCollator:
    """Stacks packed rows into ``input_ids``, ``position_ids`` and ``labels`` (= input ids; the model shifts them).

    No attention mask is emitted on purpose: with restarting position ids transformers derives the per-document
    mask from them, and a continuous row needs none.
    """

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        input_ids = torch.tensor(np.stack([np.asarray(f["input_ids"]) for f in features]), dtype=torch.long)
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if "position_ids" in features[0]:
            batch["position_ids"] = torch.tensor(
                np.stack([np.asarray(f["position_ids"]) for f in features]), dtype=torch.long
            )
        return batch


# ----------------------------------------------------------------------------------------------------------------
# The whole preparation, saved to disk
# ----------------------------------------------------------------------------------------------------------------

SUMMARY_FILE = "longrope_data.json"


def _count_tokens(dataset: datasets.Dataset | None) -> int:
    if dataset is None or len(dataset) == 0:
        return 0
    return int(np.sum(np.asarray(dataset["num_tokens"], dtype=np.int64)))


def prepare_dataset(settings: DataArguments, tokenizer: Any) -> tuple[datasets.DatasetDict, dict[str, Any]]:
    """Load, tokenize, filter, split and pack (or truncate) per ``settings``; returns (DatasetDict, summary).

    Packed output has a ``train`` split (and ``validation`` when ``validation_fraction > 0``) with ``input_ids`` and
    ``position_ids``; documents output has one ``documents`` split with ``input_ids`` (cut to ``max_seq_len``) and
    ``num_tokens`` (the whole document's). A split left empty is an error.
    """
    import datasets

    bos, eos = require_bos_eos(tokenizer)
    raw = load_sources(settings.sources, cache_dir=settings.dataset_cache_dir, corpus_dir=settings.corpus_dir)
    tokenized = tokenize_documents(raw, tokenizer, num_proc=settings.dataset_num_proc)
    kept = filter_min_tokens(tokenized, settings.min_doc_tokens, num_proc=settings.dataset_num_proc)
    kept = select_documents(
        kept, settings.num_documents, settings.min_doc_tokens, settings.selection_seed, where="the sources"
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


def save_dataset_atomically(dataset: datasets.DatasetDict, path: str | os.PathLike, summary: dict[str, Any]) -> None:
    """``save_to_disk`` into a sibling temp folder, write the summary JSON inside, then swap it into ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        dataset.save_to_disk(str(staging))
        atomic_write_json(staging / SUMMARY_FILE, summary)
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old."))
            os.replace(path, retired / path.name)
            os.replace(staging, path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, path)
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
    bos, eos = require_bos_eos(tokenizer)
    documents = stdlib_documents(root, splits=[split])
    token_lists = tokenizer([d.text for d in documents], add_special_tokens=False, split_special_tokens=True)
    stream, _ = _document_stream(token_lists["input_ids"], bos, eos, "segment")
    body = window_len - 1
    pieces = stream[: (stream.size // body) * body].reshape(-1, body)
    if num_windows is not None:
        if pieces.shape[0] < num_windows:
            raise LongRopeError(f"num_windows: split '{split}' has {pieces.shape[0]} windows, {num_windows} asked")
        pieces = pieces[np.linspace(0, pieces.shape[0] - 1, num_windows).round().astype(int)]
    return np.concatenate((np.full((pieces.shape[0], 1), bos), pieces), axis=1)
