"""The embedded tiny world's corpus and tokenizer: text every machine has, and bytes as tokens.

The corpus ("the tiny world", DESIGN.md) is the ``.py`` files of the running interpreter's standard library, tests and
site-packages excluded, split by document into ``train`` / ``search`` / ``test`` with a stable hash of the relative
path, so a file keeps its split when other files appear. Long documents (>= ``LONG_DOCUMENT_TOKENS`` bytes, which the
byte-level tokenizer turns into as many tokens) use larger search/test shares than short ones, so both evaluation
splits hold enough long documents for search and perplexity at 64x the tiny model's window.

``python-docs`` (``build_python_docs``) is the other text every machine has: the Python documentation's topic texts
that pydoc ships, English prose, for models that read English (a real pretrained model, not the byte model).

The byte-level tokenizer (``build_byte_tokenizer``): token id ``b`` is byte ``b`` (0..255), then ``<s>`` (256),
``</s>`` (257), ``<pad>`` (258). Like Llama's, it prepends BOS when asked for special tokens and never adds EOS;
literal ``"<s>"`` in text stays text (``split_special_tokens``), so any text round-trips exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longrope.errors import LongRopeError
from longrope.io import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# The embedded corpus: the Python standard library
# ----------------------------------------------------------------------------------------------------------------

STDLIB_SOURCE = "python-stdlib"
# English prose every machine has: the Python documentation's topic texts that pydoc ships (pydoc_data.topics).
DOCS_SOURCE = "python-docs"
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


def build_python_docs(output_dir: str | os.PathLike = DEFAULT_CORPUS_DIR) -> Path:
    """Write the interpreter's pydoc topic texts (English prose from the Python documentation) as
    ``python-docs.jsonl`` (fields ``path``: the topic, ``text``), in topic order; rewritten only when they changed.

    Nothing searches or trains on it in the shipped configs, so it is held out by construction (no split)."""
    from pydoc_data.topics import topics

    path = Path(output_dir) / f"{DOCS_SOURCE}.jsonl"
    text = "".join(json.dumps({"path": name, "text": topics[name]}) + "\n" for name in sorted(topics))
    if not path.is_file() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


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
