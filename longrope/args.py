"""The dataclasses behind every YAML key, and the one parser the scripts use.

Each key is defined once here (with its help text) and means the same thing in ``data/prepare.py``, ``search.py``,
``train.py`` and ``evaluate.py``. Training keys are transformers' own ``TrainingArguments``. A config is read by TRL's
``TrlParser``: ``--config file.yaml`` sets defaults, command-line flags override them (``--learning_rate 1e-3``).
Unknown keys, in the YAML or on the command line, are errors; cross-field checks live in ``__post_init__``. Every
user mistake surfaces as a one-line ``LongRopeError`` that names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longrope.data import DEFAULT_CORPUS_DIR, SourceSpec
from longrope.errors import LongRopeError

ATTENTION_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class ModelArguments:
    """Which model to train: a config to initialise (pretraining) or a checkpoint to load (fine-tuning)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Checkpoint to fine-tune: a local folder or a hub name. Mutually exclusive with model_config."
        },
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Pretraining from scratch: a mapping of config keys with model_type (in YAML), a JSON string, or "
            "the path of a config.json / model folder. vocab_size and special token ids default to the tokenizer's."
        },
    )
    config_overrides: dict | None = field(
        default=None,
        metadata={
            "help": "Config keys to change when loading model_name_or_path, e.g. {sliding_window: null} for "
            "Mistral-7B-v0.1, whose 4k sliding window would otherwise hide most of a long context."
        },
    )
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention kernel: auto (flash_attention_2 when flash-attn and CUDA are present, else sdpa), "
            "sdpa, eager, flash_attention_2, flash_attention_3, flex_attention."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weight dtype: auto (the checkpoint's; float32 for a new model), float32, bfloat16, float16."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run modeling code shipped with a hub checkpoint. Off unless you trust it."}
    )

    def __post_init__(self) -> None:
        if (self.model_name_or_path is None) == (self.model_config is None):
            raise LongRopeError(
                "model_name_or_path / model_config: set exactly one (a checkpoint to fine-tune, or a config to "
                "pretrain from scratch)"
            )
        if isinstance(self.model_config, str) and self.model_config.lstrip().startswith("{"):
            try:
                self.model_config = json.loads(self.model_config)
            except json.JSONDecodeError as error:
                raise LongRopeError(f"model_config: not valid JSON ({error.msg} at char {error.pos})") from None
        if self.config_overrides is not None and self.model_name_or_path is None:
            raise LongRopeError("config_overrides: only with model_name_or_path; put the keys in model_config instead")
        if isinstance(self.model_config, dict) and "model_type" not in self.model_config:
            raise LongRopeError("model_config: add 'model_type' (e.g. llama) so transformers knows the architecture")
        if self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise LongRopeError(
                f"attn_implementation: {self.attn_implementation!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
            )
        if self.dtype not in DTYPES:
            raise LongRopeError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")


@dataclass
class DataArguments:
    """Corpora and how they become model inputs (``data/prepare.py`` writes ``dataset_path``, the scripts read it)."""

    sources: list[SourceSpec] = field(
        default_factory=list,
        metadata={
            "help": "Corpora: hub dataset names, local files/globs/folders (txt, jsonl, parquet) or python-stdlib. In "
            "YAML each item may be a mapping: path, name, split, text_field, revision, max_documents."
        },
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Folder of the prepared dataset: data/prepare.py writes it, train.py reads it."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or hub name (default: model_name_or_path). Needs BOS and EOS tokens."},
    )
    max_seq_len: int | None = field(
        default=None,
        metadata={
            "help": "Tokens per packed segment (output_format packed), or the cut length of each document (documents)."
        },
    )
    output_format: Literal["packed", "documents"] = field(
        default="packed",
        metadata={
            "help": "packed: fixed max_seq_len segments for training. documents: one row per document (search and "
            "evaluation samples), cut to max_seq_len when set."
        },
    )
    bookend: Literal["segment", "document"] = field(
        default="segment",
        metadata={
            "help": "segment: every segment is BOS ... EOS, documents inside joined by EOS (LongRoPE sec. 4.1). "
            "document: every document is BOS ... EOS and the stream is cut into segments."
        },
    )
    position_ids: Literal["continuous", "document"] = field(
        default="continuous",
        metadata={
            "help": "continuous: 0..max_seq_len-1 per segment. document: restart at every document, which also masks "
            "attention between documents (LongRoPE2 short-window training)."
        },
    )
    min_doc_tokens: int = field(
        default=0, metadata={"help": "Drop documents shorter than this many tokens (e.g. the target length)."}
    )
    num_documents: int | None = field(
        default=None,
        metadata={"help": "Keep this many documents (seeded random choice); an error when fewer qualify."},
    )
    validation_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of documents (by content hash, deterministic) held out as the validation split."},
    )
    selection_seed: int = field(default=0, metadata={"help": "Seed of the num_documents choice."})
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "Worker processes for tokenization and packing (datasets num_proc)."}
    )
    dataset_cache_dir: str | None = field(
        default=None, metadata={"help": "datasets cache folder (default: the datasets library's)."}
    )
    corpus_dir: str = field(
        default=DEFAULT_CORPUS_DIR,
        metadata={"help": "Where the embedded python-stdlib corpus is materialised as jsonl (gitignored)."},
    )

    def __post_init__(self) -> None:
        self.sources = [SourceSpec.from_config(s, where=f"sources[{i}]") for i, s in enumerate(self.sources or [])]
        for key in ("max_seq_len", "num_documents", "dataset_num_proc"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LongRopeError(f"{key}: {value!r} must be a positive integer or null")
        if not isinstance(self.min_doc_tokens, int) or self.min_doc_tokens < 0:
            raise LongRopeError(f"min_doc_tokens: {self.min_doc_tokens!r} must be an integer >= 0")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise LongRopeError(f"validation_fraction: {self.validation_fraction!r} must be in [0, 1)")
        for key, allowed in (
            ("output_format", ("packed", "documents")),
            ("bookend", ("segment", "document")),
            ("position_ids", ("continuous", "document")),
        ):
            if getattr(self, key) not in allowed:
                raise LongRopeError(f"{key}: {getattr(self, key)!r} is not one of {', '.join(allowed)}")
        if self.output_format == "documents" and self.validation_fraction > 0:
            raise LongRopeError("validation_fraction: only packed output is split; set 0 with output_format documents")
        if self.output_format == "packed" and self.max_seq_len is None and self.sources:
            raise LongRopeError("max_seq_len: required with output_format packed; set the segment length")
        if self.output_format == "packed" and self.bookend == "segment" and (self.max_seq_len or 3) < 3:
            raise LongRopeError("max_seq_len: bookend segment needs at least 3 tokens (BOS, one token, EOS)")


@dataclass
class PrepareArguments:
    """Keys only ``data/prepare.py`` reads."""

    write_byte_tokenizer: str | None = field(
        default=None,
        metadata={"help": "Write the tiny world's byte-level tokenizer to this folder (e.g. models/tiny) and exit."},
    )


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _dataclass_keys(dataclass_types: Sequence[type]) -> set[str]:
    return {f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init}


def _suggestion(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_config_file(path: str | os.PathLike, dataclass_types: Sequence[type]) -> dict[str, Any]:
    """The YAML mapping at ``path``, checked against the keys of ``dataclass_types`` (plus TRL's ``env``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LongRopeError(f"--config {path}: no such file; pass the path of a YAML config")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        raise LongRopeError(
            f"{where}: invalid YAML ({getattr(error, 'problem', None) or _first_line(error)})"
        ) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise LongRopeError(f"{path}: must be a mapping of key: value lines, got {type(config).__name__}")
    known = _dataclass_keys(dataclass_types) | {"env"}
    for key in config:
        if key not in known:
            raise LongRopeError(f"{path}: unknown key '{key}'{_suggestion(str(key), known)}; remove it or fix it")
    return config


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Instances of ``dataclass_types`` from ``--config file.yaml`` plus command-line overrides (TRL's TrlParser).

    Every problem (missing file, unknown key, bad value, failed cross-field check) becomes one LongRopeError line.
    """
    import sys

    from trl import TrlParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise LongRopeError("--config: give the path of a YAML config after it")
        read_config_file(argv[index + 1], dataclass_types)
    parser = TrlParser(dataclass_types)
    try:
        return tuple(parser.parse_args_and_config(argv))
    except LongRopeError:
        raise
    except ValueError as error:
        message = _first_line(error)
        if "not used by the HfArgumentParser" in message:
            unknown = message.split(":", 1)[1].strip()
            known = _dataclass_keys(dataclass_types)
            first = unknown.strip("[]").split(",")[0].strip(" '\"").lstrip("-")
            raise LongRopeError(
                f"command line: unknown argument(s) {unknown}{_suggestion(first, known)}; check the spelling"
            ) from None
        raise LongRopeError(f"configuration: {message}") from None


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _yaml_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolved_config(*arguments: Any) -> dict[str, Any]:
    """One flat mapping of every key of the given argument dataclasses, ready for ``yaml.safe_dump``.

    Credentials never leave the process: every ``*_token`` key (hub tokens) is dropped.
    """
    merged: dict[str, Any] = {}
    for instance in arguments:
        values = instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance)
        for key, value in values.items():
            if key.endswith("_token") or key in ("hub_token", "push_to_hub_token"):
                continue
            merged[key] = _yaml_safe(value)
    return merged
