"""Every config key the entry points share, defined once: the key groups every script composes its keys from.

One concept has one key everywhere: a user who writes ``sp_size`` for train.py writes it for evaluate.py too. Each
dataclass here groups the keys of one concept and is read by every entry point that needs it:

========================== ===================================================== ================================
dataclass                  keys                                                  read by
========================== ===================================================== ================================
TokenizerArguments         tokenizer_name_or_path                                every entry point
ModelArguments             model_name_or_path, model_config, config_overrides,   search, train, evaluate, export
                           attn_implementation, dtype, trust_remote_code
RopeArguments              rope_method, rope_factors_path, rope_mscale,          search, train, evaluate (each
                           target_length, original_max_position_embeddings,      ``methods`` entry), export
                           yarn_beta_fast, yarn_beta_slow
ExportArguments            allow_start_tokens, allow_shared_mscale               train, export
SequenceParallelArguments  sp_size                                               train, evaluate
LossArguments              loss_chunk_size                                       search, train, evaluate
DocumentChoiceArguments    num_documents, document_seed                          prepare, search, evaluate
DocumentsArguments         documents_path, documents_prepare_config (+ choice)   search, evaluate
OutputArguments            output_dir                                            search, evaluate, export
TrackingArguments          report_to, run_name                                   search, evaluate
RetrievalTemplateArguments retrieval_template                                    search, evaluate, prepare
RetrievalArguments         retrieval_tasks (+ template)                          evaluate
RetrievalMixArguments      retrieval_fraction, copy_fraction, lookup_fraction    prepare
                           (+ tasks, template)
DataArguments              sources, dataset_path, max_seq_len, ...               prepare, train
========================== ===================================================== ================================

train.py's output_dir / report_to / run_name are transformers' own ``TrainingArguments`` keys, with the same names
and meanings. Configs are parsed by :mod:`longrope.config_parser`; a key an earlier version used for one of these
concepts is refused with its new name (:data:`RENAMED_KEYS`), never silently aliased.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from longrope.corpus import DEFAULT_CORPUS_DIR, STDLIB_SOURCE
from longrope.errors import LongRopeError
from longrope.loss import DEFAULT_LOSS_CHUNK_SIZE

ATTENTION_IMPLEMENTATIONS = (
    "auto",
    "sdpa",
    "eager",
    "flash_attention_2",
    "flash_attention_3",
    "flex_attention",
    "cpu_bf16",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
# rope_mscale of search.py's short stage: the short set takes the long set's attention factor.
LONG_SET_MSCALE = "long"
REPORT_TO = ("none", "wandb")

# Keys an earlier version used for a concept that now has one name everywhere. They are refused with the new name,
# never silently aliased (an alias would let two spellings of one setting disagree inside one config).
RENAMED_KEYS = {
    "sequence_parallel_size": "sp_size",
    "chunk_size": "loss_chunk_size",
    "factors_path": "rope_factors_path",
    "mscale": "rope_mscale",
    "num_samples": "num_documents",
    "sample_seed": "document_seed",
    "selection_seed": "document_seed",
    "method": "rope_method",
    "beta_fast": "yarn_beta_fast",
    "beta_slow": "yarn_beta_slow",
    # The passkey is one task of the retrieval suite, which shares its grid.
    "passkey_lengths": "retrieval_lengths",
    "passkey_depths": "retrieval_depths",
    "passkey_trials": "retrieval_trials",
}


class KeyGroup:
    """Base of every key group: each group's ``__post_init__`` checks its own keys and then calls the next one in the
    MRO, so a dataclass composed of several groups (e.g. ``class SearchArguments(DocumentsArguments, LossArguments,
    ...)``) runs every group's checks, and transformers' ``TrainingArguments`` last when it is among the bases."""

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()


def closest_key(key: str, known: set[str]) -> str:
    """`` (did you mean 'x'?)`` for the known key closest to a misspelt one, else nothing."""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def require_positive_int(key: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        suffix = " or null" if allow_none else ""
        raise LongRopeError(f"{key}: {value!r} must be a positive integer{suffix}")


# ----------------------------------------------------------------------------------------------------------------
# Model and tokenizer


@dataclass
class TokenizerArguments(KeyGroup):
    """Which tokenizer turns text into tokens (default: the model's own)."""

    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or hub name (default: model_name_or_path). Needs BOS and EOS tokens."},
    )


@dataclass
class ModelArguments(TokenizerArguments):
    """Which model: a checkpoint to load (search, evaluation, fine-tuning) or a config to initialise (pretraining)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint: a local folder or a hub name. Mutually exclusive with model_config."},
    )
    model_config: dict | str | None = field(
        default=None,
        metadata={
            "help": "Pretraining from scratch (train.py): a mapping of config keys with model_type (in YAML), a JSON "
            "string, or the path of a config.json / model folder. vocab_size and special token ids default to the "
            "tokenizer's."
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
            "sdpa, eager, flash_attention_2, flash_attention_3, flex_attention, cpu_bf16 (bf16 models on CPUs with "
            "AVX512-BF16, no backward: longrope/cpu_attention.py)."
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
        super().__post_init__()
        if self.model_name_or_path is not None and self.model_config is not None:
            raise LongRopeError(
                "model_name_or_path / model_config: set one (a checkpoint to load, or a config to pretrain from "
                "scratch), not both"
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
        if self.attn_implementation == "cpu_bf16" and self.dtype in ("float32", "float16"):
            raise LongRopeError(
                f"attn_implementation: cpu_bf16 runs bf16 models, not dtype {self.dtype}; set dtype: bfloat16 or use sdpa"
            )

    @property
    def tokenizer_path(self) -> str | None:
        return self.tokenizer_name_or_path or self.model_name_or_path

    def require_checkpoint(self, entry_point: str) -> str:
        """model_name_or_path, which ``entry_point`` cannot do without (only train.py pretrains from a config)."""
        if self.model_name_or_path is None:
            raise LongRopeError(
                f"model_name_or_path: required by {entry_point}; give a model folder (e.g. models/tiny) or a hub name"
            )
        return self.model_name_or_path


# ----------------------------------------------------------------------------------------------------------------
# RoPE


@dataclass
class RopeArguments(KeyGroup):
    """How positions are rotated: the same keys in train.py, search.py, each evaluate.py ``methods`` entry and
    ``python -m longrope.factors export``. Resolved against a model by :func:`longrope.rope_config.resolve_rope`."""

    rope_method: str | None = field(
        default=None,
        metadata={
            "help": "RoPE scaling method, one of longrope.rope.METHODS: none (the checkpoint's own RoPE), pi, ntk, "
            "dynamic_ntk (evaluation only), yarn, longrope (factors from rope_factors_path). Default: longrope when "
            "rope_factors_path is set, else none. search.py always searches longrope factors and takes no method."
        },
    )
    rope_factors_path: str | None = field(
        default=None,
        metadata={
            "help": "Factors file (search.py's factors.json or an official CSV). search.py: the input factors (second "
            "and short stage: the fine-tuned model's, default its config's; first stage: an extra seed)."
        },
    )
    rope_mscale: str | None = field(
        default=None,
        metadata={
            "help": "Attention factor: su, yarn, none or a number (default: the method's own: su for longrope and "
            "search candidates, yarn for yarn, none for pi and ntk; a factors file's recorded value, of which it "
            "replaces the long set's, a short_mscale staying). search.py's short stage: the short set's, a number, "
            "none, or long (the long set's, which a stock rope_type longrope config applies at every length; "
            "default: the checkpoint's attention factor)."
        },
    )
    target_length: int | None = field(
        default=None,
        metadata={
            "help": "Target context window in tokens: the length search.py searches for (short stage: at or below "
            "the original window), the window train.py's pi/ntk/yarn are set up for (longrope: the file's), the length "
            "evaluate.py's baselines are set up for (default: its longest evaluated length)."
        },
    )
    original_max_position_embeddings: int | None = field(
        default=None,
        metadata={
            "help": "Pre-training window (default: the model config's; Mistral-7B-v0.1 says 32k where the paper "
            "treats 8k)."
        },
    )
    yarn_beta_fast: float = field(
        default=32.0, metadata={"help": "YaRN beta_fast (the official search: 32 for Llama, 128 for Mistral)."}
    )
    yarn_beta_slow: float = field(
        default=1.0, metadata={"help": "YaRN beta_slow (the official search: 1 for Llama, 2 for Mistral)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from longrope import rope

        if self.rope_method is not None:
            self.rope_method = rope.method(self.rope_method, key="rope_method").name
        if self.rope_factors_path is not None and self.method not in rope.methods_with(from_file=True):
            raise LongRopeError(
                f"rope_factors_path: only read by rope_method longrope (got {self.rope_method}); drop one of them"
            )
        if self.method in rope.methods_with(from_file=True) and not self.rope_factors_path:
            raise LongRopeError(
                f"rope_factors_path: required by rope_method {self.method}; give search.py's factors.json"
            )
        require_positive_int("target_length", self.target_length, allow_none=True)
        require_positive_int(
            "original_max_position_embeddings", self.original_max_position_embeddings, allow_none=True
        )
        if self.rope_mscale is not None and self.rope_mscale != LONG_SET_MSCALE:
            rope.parse_mscale(self.rope_mscale, key="rope_mscale")
        for key in ("yarn_beta_fast", "yarn_beta_slow"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise LongRopeError(f"{key}: {value!r} must be a number > 0")

    @property
    def method(self) -> str:
        """The method this config asks for, with the default applied."""
        if self.rope_method is not None:
            return self.rope_method
        return "longrope" if self.rope_factors_path else "none"

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], where: str, defaults: RopeArguments | None = None
    ) -> RopeArguments:
        """An instance from a YAML mapping (an evaluate.py ``methods`` entry), on top of ``defaults``'s values."""
        known = {f.name for f in fields(cls)}
        for key in values:
            if key in RENAMED_KEYS and RENAMED_KEYS[key] in known:
                raise LongRopeError(f"{where}.{key}: renamed to {RENAMED_KEYS[key]}; use {RENAMED_KEYS[key]}")
            if key not in known:
                raise LongRopeError(
                    f"{where}: unknown key {key!r}{closest_key(str(key), known)}; use name and the RoPE keys "
                    f"({', '.join(sorted(known))})"
                )
        base = {} if defaults is None else dataclasses.asdict(defaults)
        # A method entry names its own method or factors; only the shared settings come from the top level, and a
        # factors file carries its own target length.
        base.pop("rope_method", None)
        base.pop("rope_factors_path", None)
        if values.get("rope_factors_path"):
            base.pop("target_length", None)
        try:
            return cls(**{**base, **values})
        except LongRopeError as error:
            raise LongRopeError(f"{where}.{error}") from None


@dataclass
class ExportArguments(KeyGroup):
    """What a stock-loadable checkpoint cannot hold, and whether to drop it (train.py's output, factors export)."""

    allow_start_tokens: bool = field(
        default=False,
        metadata={
            "help": "Accept factors with start tokens > 0; the saved config (stock loaders) then drops them. Off: "
            "such factors are refused."
        },
    )
    allow_shared_mscale: bool = field(
        default=False,
        metadata={
            "help": "Accept factors whose short set has its own mscale (short_mscale); the saved config (stock "
            "loaders) then gives sequences up to the original window the long set's attention_factor. Off: such "
            "factors are refused."
        },
    )


# ----------------------------------------------------------------------------------------------------------------
# Long sequences


@dataclass
class SequenceParallelArguments(KeyGroup):
    """Ulysses sequence parallelism (DeepSpeed ALST), in training and in evaluation alike."""

    sp_size: int = field(
        default=1,
        metadata={
            "help": "Sequence-parallel degree: each sequence is split over this many ranks (DeepSpeed Ulysses). Must "
            "divide the launched processes (evaluate.py: equal them), the attention and KV heads and the length."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("sp_size", self.sp_size)


@dataclass
class LossArguments(KeyGroup):
    """The memory-linear loss: lm_head + cross-entropy over a few tokens at a time, never length x vocab logits."""

    loss_chunk_size: int | None = field(
        default=DEFAULT_LOSS_CHUNK_SIZE,
        metadata={
            "help": "Tokens per lm_head + cross-entropy chunk (each chunk is recomputed in train.py's backward), so "
            "no length x vocab logits exist. null: the whole sequence at once (train.py: the model's own loss)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("loss_chunk_size", self.loss_chunk_size, allow_none=True)


# ----------------------------------------------------------------------------------------------------------------
# Documents and outputs


@dataclass
class DocumentChoiceArguments(KeyGroup):
    """A seeded choice of N documents among those that qualify."""

    num_documents: int | None = field(
        default=None,
        metadata={
            "help": "Documents to use, a seeded choice among those long enough (default: all). search.py: N, the "
            "documents each candidate is scored on (the paper: 5 samples); prepare: documents to keep."
        },
    )
    document_seed: int = field(default=0, metadata={"help": "Seed of the num_documents choice."})

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int("num_documents", self.num_documents, allow_none=True)
        if isinstance(self.document_seed, bool) or not isinstance(self.document_seed, int):
            raise LongRopeError(f"document_seed: {self.document_seed!r} must be an integer")


@dataclass
class DocumentsArguments(DocumentChoiceArguments):
    """Where search samples and evaluation documents come from."""

    documents_path: str | None = field(
        default=None,
        metadata={"help": "Prepared documents (data/prepare.py with output_format documents), one row per document."},
    )
    documents_prepare_config: str | None = field(
        default=None,
        metadata={
            "help": "Data config that builds documents_path (python -m data.prepare --config ...); run first when "
            "documents_path does not exist yet, so one command works on a fresh clone."
        },
    )


@dataclass
class OutputArguments(KeyGroup):
    """Where a run writes (train.py: transformers' output_dir, same meaning)."""

    output_dir: str | None = field(default=None, metadata={"help": "Folder the run writes its files into."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.output_dir:
            raise LongRopeError("output_dir: required; the folder this run writes its results into")


@dataclass
class TrackingArguments(KeyGroup):
    """Experiment tracking (train.py: transformers' report_to and run_name, same meaning)."""

    report_to: str = field(default="none", metadata={"help": "none or wandb (offline when no credentials exist)."})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name (default: output_dir's name)."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.report_to not in REPORT_TO:
            raise LongRopeError(f"report_to: {self.report_to!r} is not one of {', '.join(REPORT_TO)}")


# ----------------------------------------------------------------------------------------------------------------
# Retrieval prompts


@dataclass
class RetrievalTemplateArguments(KeyGroup):
    """How retrieval prompts are worded (longrope/retrieval.py): for evaluation, the needle fitness and training."""

    retrieval_template: str = field(
        default="paper",
        metadata={
            "help": "paper: the papers' English prompts (passkey, 'special magic number' needles). code: the same "
            "tasks as Python (`amber_falcon = 4412913` ... `assert amber_falcon ==`) for code models."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from longrope import retrieval

        retrieval.template(self.retrieval_template)


@dataclass
class RetrievalArguments(RetrievalTemplateArguments):
    """Which retrieval tasks evaluate.py runs, or data/prepare.py mixes into training rows."""

    retrieval_tasks: list[str] = field(
        default_factory=lambda: ["passkey"],
        metadata={
            "help": "Any of passkey, niah_single, niah_multikey, niah_multivalue, niah_multiquery, variable_tracking."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from longrope import retrieval

        if not self.retrieval_tasks:
            raise LongRopeError("retrieval_tasks: empty; list at least one task (e.g. passkey)")
        retrieval.check_tasks(self.retrieval_tasks)


@dataclass
class RetrievalMixArguments(RetrievalArguments):
    """Rows that teach a model to use its context, mixed into packed training data (data/prepare.py,
    longrope/context_rows.py): each a whole segment of max_seq_len tokens built from text of the same split. Retrieval
    rows are samples of retrieval_tasks with their answers, keys from the training part of the key space (evaluation
    keys never appear); copy rows write random strings twice; lookup rows restate needle-style assignments."""

    retrieval_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the train split's rows that are retrieval rows (0: none; validation: never)."},
    )
    copy_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the train split's rows that write random strings twice among code (0: none)."},
    )
    lookup_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of the train split's rows that restate needle-style assignments among code."},
    )

    @property
    def context_fraction(self) -> float:
        """The share of all three kinds together (the packed rows are the rest)."""
        return self.retrieval_fraction + self.copy_fraction + self.lookup_fraction

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("retrieval_fraction", "copy_fraction", "lookup_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not 0.0 <= value < 1.0:
                raise LongRopeError(f"{key}: {value!r} must be in [0, 1)")
        if self.context_fraction >= 1.0:
            raise LongRopeError(
                f"retrieval_fraction + copy_fraction + lookup_fraction: {self.context_fraction:g} must be below 1; the "
                "packed rows are the rest (to train on fewer of them, set num_documents)"
            )


# ----------------------------------------------------------------------------------------------------------------
# Data preparation


@dataclass
class SourceSpec:
    """One corpus: a hub dataset name, a local file / glob / folder (txt, jsonl, parquet), or ``python-stdlib``.

    A txt file is one document. ``split`` names the hub split (``"train[:1000]"`` slicing works) or, for
    ``python-stdlib``, one of ``train`` / ``search`` / ``test``; it is ignored for local files and ``python-docs``.
    ``group_min_chars`` joins consecutive documents (in their order: neighbouring stdlib modules, neighbouring doc
    topics) until each holds that many characters, so short files make long documents.
    """

    path: str
    name: str | None = None
    split: str = "train"
    text_field: str = "text"
    revision: str | None = None
    max_documents: int | None = None
    group_min_chars: int | None = None

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
        for key in ("max_documents", "group_min_chars"):
            require_positive_int(f"{where}.{key}", value.get(key), allow_none=True)
        return cls(**value)


@dataclass
class DataArguments(DocumentChoiceArguments):
    """Corpora and how they become model inputs (``data/prepare.py`` writes ``dataset_path``, train.py reads it)."""

    sources: list[SourceSpec] = field(
        default_factory=list,
        metadata={
            "help": "Corpora: hub dataset names, local files/globs/folders (txt, jsonl, parquet), python-stdlib or "
            "python-docs. In YAML each item may be a mapping: path, name, split, text_field, revision, max_documents, "
            "group_min_chars."
        },
    )
    dataset_path: str | None = field(
        default=None,
        metadata={"help": "Folder of the prepared dataset: data/prepare.py writes it, train.py reads it."},
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
    validation_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of documents (by content hash, deterministic) held out as the validation split."},
    )
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
        super().__post_init__()
        self.sources = [SourceSpec.from_config(s, where=f"sources[{i}]") for i, s in enumerate(self.sources or [])]
        for key in ("max_seq_len", "dataset_num_proc"):
            require_positive_int(key, getattr(self, key), allow_none=True)
        if (
            isinstance(self.min_doc_tokens, bool)
            or not isinstance(self.min_doc_tokens, int)
            or self.min_doc_tokens < 0
        ):
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
class PrepareArguments(KeyGroup):
    """Keys only ``data/prepare.py`` reads."""

    write_byte_tokenizer: str | None = field(
        default=None,
        metadata={"help": "Write the tiny world's byte-level tokenizer to this folder (e.g. models/tiny) and exit."},
    )
