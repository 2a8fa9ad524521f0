"""Long-context metrics: memory-linear perplexity, passkey retrieval and needle-driven perplexity.

Every function takes a Hugging Face causal LM (``*ForCausalLM``) that the caller has already patched with whatever
RoPE method it evaluates; nothing here touches RoPE. Position ids ``0..n-1`` are passed explicitly for every window so
the patch sees the positions the model is evaluated at.

Memory: no ``length x vocab`` logits tensor is ever materialised. The decoder backbone (``model.get_decoder()``)
produces the final hidden states, and only the rows whose next token is scored go through the output head
(``model.get_output_embeddings()``), ``chunk_size`` rows at a time, so the peak is linear in the length with a
``chunk_size x vocab`` constant. Cross-entropy is computed in fp32 and summed in fp64.

Non-finite losses are reported as ``inf`` (for the document and every aggregate that contains it), never averaged in.

Perplexity protocol (LongRoPE paper, section 4; papers.md section 4):

* ``mode="truncate"``: the first ``length`` tokens of each document form one window; every predicted token is scored.
* ``mode="sliding"``: windows of ``length`` tokens advance by ``stride``; each window scores only the tokens that no
  earlier window scored (the usual HF/YaRN protocol). A document's perplexity is ``exp(total NLL / scored tokens)``
  and the aggregate over documents is token-weighted.
* ``add_bos=True`` (default off) prepends the BOS token to every window, as the official LongRoPE evaluation does.
  The window keeps ``length`` positions, so it then holds ``length - 1`` document tokens, and the first document
  token of each window becomes predictable (from BOS) and is scored.

Tokens scored, exactly: without BOS the first document token is never scored (nothing predicts it); with
``stride < length`` every later token is scored exactly once. With ``stride == length`` (no overlap) the first token
of every window has no context and is skipped; with BOS every token is scored exactly once whenever
``stride <= length - 1``.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

from longrope.errors import LongRopeError

DEFAULT_CHUNK_SIZE = 1024

PerplexityMode = Literal["truncate", "sliding"]


# ----------------------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------------------


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def _perplexity_from(nll_sum: float, scored_tokens: int) -> float:
    if scored_tokens <= 0 or not math.isfinite(nll_sum):
        return math.inf
    try:
        return math.exp(nll_sum / scored_tokens)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class DocumentNll:
    """Summed negative log-likelihood (nats) of one document or sample, with how many tokens it covers.

    ``nll_sum`` is ``inf`` when any window produced a non-finite loss.
    """

    nll_sum: float
    scored_tokens: int
    windows: int = 1

    @property
    def ppl(self) -> float:
        return _perplexity_from(self.nll_sum, self.scored_tokens)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ppl": self.ppl}


@dataclass
class LengthPerplexity:
    """Perplexity of a set of documents at one evaluation length."""

    length: int
    documents: list[DocumentNll] = field(default_factory=list)

    @property
    def nll_sum(self) -> float:
        return _finite_or_inf(math.fsum(doc.nll_sum for doc in self.documents))

    @property
    def scored_tokens(self) -> int:
        return sum(doc.scored_tokens for doc in self.documents)

    @property
    def ppl(self) -> float:
        """Token-weighted perplexity: exp(all NLL / all scored tokens); inf if any document is non-finite."""
        return _perplexity_from(self.nll_sum, self.scored_tokens)

    @property
    def mean_document_ppl(self) -> float:
        """Unweighted mean of the per-document perplexities (some papers report this instead)."""
        if not self.documents:
            return math.inf
        return _finite_or_inf(math.fsum(doc.ppl for doc in self.documents) / len(self.documents))

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "ppl": self.ppl,
            "mean_document_ppl": self.mean_document_ppl,
            "nll_sum": self.nll_sum,
            "scored_tokens": self.scored_tokens,
            "documents": [doc.to_dict() for doc in self.documents],
        }


@dataclass
class PerplexityReport:
    """Perplexity at every requested length, with the settings that produced it."""

    mode: PerplexityMode
    stride: int | None
    add_bos: bool
    chunk_size: int
    per_length: list[LengthPerplexity] = field(default_factory=list)

    def ppl_by_length(self) -> dict[int, float]:
        return {entry.length: entry.ppl for entry in self.per_length}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "stride": self.stride,
            "add_bos": self.add_bos,
            "chunk_size": self.chunk_size,
            "per_length": [entry.to_dict() for entry in self.per_length],
        }


# ----------------------------------------------------------------------------------------------------------------
# The memory-linear scorer
# ----------------------------------------------------------------------------------------------------------------

# Config attributes through which some architectures transform logits after the output head. The chunked path
# reproduces only a plain linear head, so these models are refused instead of being scored wrongly.
_LOGIT_TRANSFORM_ATTRIBUTES = {"final_logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": None}


def _check_plain_output_head(model: torch.nn.Module) -> None:
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, neutral in _LOGIT_TRANSFORM_ATTRIBUTES.items():
        value = getattr(text_config, name, None)
        if value is not None and value != neutral:
            raise LongRopeError(
                f"model config {name}={value}: chunked perplexity supports only a plain linear output head; "
                f"evaluate this architecture with a model whose logits are not transformed"
            )


def _backbone_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    if not hasattr(model, "get_decoder") or not hasattr(model, "get_output_embeddings"):
        raise LongRopeError(
            f"model: {type(model).__name__} is not a Hugging Face *ForCausalLM; load it with AutoModelForCausalLM"
        )
    backbone = model.get_decoder()
    head = model.get_output_embeddings()
    if head is None or backbone is model:
        raise LongRopeError(
            f"model: {type(model).__name__} exposes no separate decoder and output head; "
            f"load a causal LM with AutoModelForCausalLM"
        )
    _check_plain_output_head(model)
    return backbone, head


def _input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def _as_id_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    tensor = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    return tensor.reshape(-1).long()


def sequence_nll(
    model: torch.nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    score_from: int = 1,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sequence_parallel_group: Any = None,
) -> DocumentNll:
    """NLL of ``input_ids[t]`` given ``input_ids[:t]``, summed over ``t`` in ``[score_from, len(input_ids))``.

    One forward of the backbone over the whole sequence with ``position_ids = 0..n-1`` and no KV cache; then the
    output head and cross-entropy on ``chunk_size`` hidden rows at a time (only the rows that predict a scored
    token, as HF's ``logits_to_keep`` does). Peak memory: O(n * hidden) + O(chunk_size * vocab).

    ``sequence_parallel_group``: the sequence is split into equal contiguous shards, one per rank of the group, and
    each rank runs the backbone on its shard only (the model's attention must be sequence-parallel, e.g. DeepSpeed
    Ulysses registered with ``UlyssesSPAttentionHF.register_with_transformers``); NLL sums are all-reduced, so every
    rank returns the whole sequence's result. The tail is padded to a multiple of the group size and never scored.
    """
    ids = _as_id_tensor(input_ids)
    length = ids.numel()
    if not 1 <= score_from <= length:
        raise LongRopeError(f"score_from={score_from}: must be between 1 and the sequence length {length}")
    if chunk_size < 1:
        raise LongRopeError(f"chunk_size={chunk_size}: must be a positive number of tokens (e.g. 1024)")
    backbone, head = _backbone_and_head(model)
    device = _input_device(model)
    scored = length - score_from
    if scored == 0:
        return DocumentNll(nll_sum=0.0, scored_tokens=0)
    begin, end = 0, length
    if sequence_parallel_group is not None:
        ranks = torch.distributed.get_world_size(sequence_parallel_group)
        shard = -(-length // ranks)
        begin = torch.distributed.get_rank(sequence_parallel_group) * shard
        end = begin + shard
        ids = torch.cat([ids, ids.new_zeros(shard * ranks - length)])
    ids = ids.to(device)
    # Global row j predicts token j + 1; this process holds rows [begin, end), of which it scores those in
    # [score_from - 1, length - 1).
    first_row, last_row = max(begin, score_from - 1), min(end, length - 1)
    with torch.inference_mode():
        outputs = backbone(
            input_ids=ids[begin:end].unsqueeze(0),
            position_ids=torch.arange(begin, end, device=device).unsqueeze(0),
            use_cache=False,
        )
        hidden = outputs.last_hidden_state if hasattr(outputs, "last_hidden_state") else outputs[0]
        predicting_rows = hidden[0, max(first_row - begin, 0) : max(last_row - begin, 0)]
        targets = ids[first_row + 1 : last_row + 1] if last_row > first_row else ids[:0]
        del outputs, hidden
        head_device = head.weight.device
        total = torch.zeros((), dtype=torch.float64, device=head_device)
        for start in range(0, targets.numel(), chunk_size):
            logits = head(predicting_rows[start : start + chunk_size].to(head_device)).float()
            chunk_targets = targets[start : start + chunk_size].to(head_device)
            total += F.cross_entropy(logits, chunk_targets, reduction="sum").double()
            del logits
        if sequence_parallel_group is not None:
            total = total.cpu() if torch.distributed.get_backend(sequence_parallel_group) == "gloo" else total
            torch.distributed.all_reduce(total, group=sequence_parallel_group)
        nll_sum = float(total.item())
    return DocumentNll(nll_sum=_finite_or_inf(nll_sum), scored_tokens=scored)


# ----------------------------------------------------------------------------------------------------------------
# Perplexity over documents
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One model input cut from a document: document tokens ``[begin, end)``, of which ``[score_begin, end)`` are
    scored (``score_begin > begin`` only where earlier windows already scored the tokens or no context exists)."""

    begin: int
    end: int
    score_begin: int


def plan_windows(num_tokens: int, length: int, stride: int, *, add_bos: bool = False) -> list[Window]:
    """The windows that score a ``num_tokens``-token document with model inputs of ``length`` positions.

    With ``add_bos`` each window holds ``length - 1`` document tokens after the BOS. Windows start at multiples of
    ``stride``; the last one ends at the document end (and may be shorter than the others, as in the HF protocol).
    """
    if length < 2:
        raise LongRopeError(f"length={length}: too short to score any token; use lengths of at least 2")
    content = length - 1 if add_bos else length
    if not 1 <= stride <= content:
        raise LongRopeError(
            f"stride={stride}: must be between 1 and {content} (the document tokens per window at length {length}); "
            f"a larger stride would leave tokens unscored"
        )
    if num_tokens < content:
        raise LongRopeError(
            f"document: {num_tokens} tokens, fewer than the {content} a window at length {length} needs; "
            f"select longer documents or drop that length"
        )
    windows = []
    scored_until = 0
    begin = 0
    while True:
        end = min(begin + content, num_tokens)
        first_predictable = begin if add_bos else begin + 1
        windows.append(Window(begin=begin, end=end, score_begin=max(scored_until, first_predictable)))
        scored_until = end
        if end == num_tokens:
            return windows
        begin += stride


def _resolve_bos(model: torch.nn.Module, add_bos: bool, bos_token_id: int | None) -> int | None:
    if not add_bos:
        return None
    if bos_token_id is None:
        for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
            bos_token_id = getattr(source, "bos_token_id", None)
            if isinstance(bos_token_id, list):
                bos_token_id = bos_token_id[0] if bos_token_id else None
            if bos_token_id is not None:
                break
    if bos_token_id is None:
        raise LongRopeError("add_bos: the model config has no bos_token_id; pass bos_token_id or set add_bos false")
    return int(bos_token_id)


def _validate_mode(mode: str, stride: int | None, window_tokens: int) -> int:
    """The stride to plan windows with: one full window for truncate, the user's stride for sliding."""
    if mode == "truncate":
        return window_tokens
    if mode == "sliding":
        if stride is None:
            raise LongRopeError("stride: sliding-window perplexity needs a stride (e.g. 256)")
        return stride
    raise LongRopeError(f"mode={mode!r}: must be 'truncate' or 'sliding'")


def document_nll(
    model: torch.nn.Module,
    ids: Sequence[int] | torch.Tensor,
    length: int,
    *,
    mode: PerplexityMode = "truncate",
    stride: int | None = None,
    add_bos: bool = False,
    bos_token_id: int | None = None,
    max_document_tokens: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sequence_parallel_group: Any = None,
) -> DocumentNll:
    """NLL of one document at one evaluation length: the incremental form (a search can stop after any document).

    ``mode="truncate"`` scores the first ``length`` tokens (``length - 1`` after a BOS) as one window.
    ``mode="sliding"`` slides a ``length``-position window by ``stride`` over the first ``max_document_tokens``
    tokens (default: the whole document) and scores each token in the first window that can predict it.
    ``bos_token_id`` defaults to the model config's when ``add_bos`` is on.
    """
    tokens = _as_id_tensor(ids)
    bos = _resolve_bos(model, add_bos, bos_token_id)
    content = length - 1 if add_bos else length
    if mode == "truncate":
        tokens = tokens[:content]
    elif max_document_tokens is not None:
        tokens = tokens[:max_document_tokens]
    windows = plan_windows(tokens.numel(), length, _validate_mode(mode, stride, content), add_bos=add_bos)
    nll_sum = 0.0
    scored = 0
    for window in windows:
        piece = tokens[window.begin : window.end]
        offset = 0
        if bos is not None:
            piece = torch.cat([torch.tensor([bos], dtype=torch.long), piece])
            offset = 1
        result = sequence_nll(
            model,
            piece,
            window.score_begin - window.begin + offset,
            chunk_size=chunk_size,
            sequence_parallel_group=sequence_parallel_group,
        )
        nll_sum += result.nll_sum
        scored += result.scored_tokens
    return DocumentNll(nll_sum=_finite_or_inf(nll_sum), scored_tokens=scored, windows=len(windows))


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _progress(iterable: Iterable, total: int, description: str, enabled: bool) -> Iterable:
    if not enabled or not _is_main_process():
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=description)


def perplexity(
    model: torch.nn.Module,
    documents: Sequence[Sequence[int] | torch.Tensor],
    lengths: Sequence[int],
    *,
    mode: PerplexityMode = "truncate",
    stride: int | None = None,
    add_bos: bool = False,
    bos_token_id: int | None = None,
    max_document_tokens: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    sequence_parallel_group: Any = None,
) -> PerplexityReport:
    """Perplexity of every document at every length (see the module docstring for the protocol).

    All inputs are validated before the first forward: every document must hold at least the tokens one window
    needs at every length. ``progress`` shows a tqdm bar on the main process only.
    """
    if not documents:
        raise LongRopeError("documents: empty; give at least one tokenized document")
    if not lengths:
        raise LongRopeError("lengths: empty; give at least one evaluation length")
    bos = _resolve_bos(model, add_bos, bos_token_id)
    doc_tensors = [_as_id_tensor(doc) for doc in documents]
    for length in lengths:
        content = length - 1 if add_bos else length
        step = _validate_mode(mode, stride, content)
        for index, doc in enumerate(doc_tensors):
            available = doc.numel() if max_document_tokens is None else min(doc.numel(), max_document_tokens)
            if available < content:
                raise LongRopeError(
                    f"documents[{index}]: {available} tokens, fewer than the {content} needed at length {length}; "
                    f"select documents with at least {content} tokens or drop that length"
                )
        plan_windows(content, length, step, add_bos=add_bos)
    report = PerplexityReport(mode=mode, stride=stride, add_bos=add_bos, chunk_size=chunk_size)
    jobs = [(length, index) for length in lengths for index in range(len(doc_tensors))]
    per_length = {length: LengthPerplexity(length=length) for length in lengths}
    for length, index in _progress(jobs, len(jobs), "perplexity", progress):
        per_length[length].documents.append(
            document_nll(
                model,
                doc_tensors[index],
                length,
                mode=mode,
                stride=stride,
                add_bos=add_bos,
                bos_token_id=bos,
                max_document_tokens=max_document_tokens,
                chunk_size=chunk_size,
                sequence_parallel_group=sequence_parallel_group,
            )
        )
    report.per_length = [per_length[length] for length in lengths]
    return report


# ----------------------------------------------------------------------------------------------------------------
# Shared prompt helpers
# ----------------------------------------------------------------------------------------------------------------


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos_prefix(tokenizer: Any, prepend_bos: bool) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if prepend_bos and bos is not None else []


_FIRST_INTEGER = re.compile(r"[0-9]+")


def parse_first_integer(text: str) -> int | None:
    """The first run of ASCII digits in ``text`` as an int, or None when there is none."""
    match = _FIRST_INTEGER.search(text)
    return int(match.group()) if match else None


# ----------------------------------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi format; papers.md section 4)
# ----------------------------------------------------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"

_FILLER_WORDS = PASSKEY_FILLER.split()


@dataclass(frozen=True)
class PasskeyPrompt:
    """A passkey prompt fitted to a token budget.

    ``input_ids`` never exceed the requested length and fall short of it by less than the token cost of one more
    filler word (the search adds filler one word at a time). ``needle_position`` is the token index where the key
    line starts (exact for tokenizers that do not merge across the line break before it).
    """

    text: str
    input_ids: list[int]
    key: int
    length: int
    depth: float
    filler_words: int
    needle_position: int


def _filler_text(start_word: int, count: int) -> str:
    return " ".join(_FILLER_WORDS[(start_word + i) % len(_FILLER_WORDS)] for i in range(count))


def _passkey_parts(key: int, depth: float, filler_words: int) -> tuple[str, str]:
    """(text before the key line, full prompt) with ``filler_words`` words split at ``depth``."""
    before = round(filler_words * depth)
    lines_before = [PASSKEY_INTRO]
    if before:
        lines_before.append(_filler_text(0, before))
    lines_after = [PASSKEY_NEEDLE.format(key=key)]
    if filler_words - before:
        lines_after.append(_filler_text(before, filler_words - before))
    lines_after.append(PASSKEY_QUESTION)
    head = "\n".join(lines_before) + "\n"
    return head, head + "\n".join(lines_after)


def passkey_min_length(tokenizer: Any, key: int = 99999, *, prepend_bos: bool = True) -> int:
    """Tokens in a prompt with no filler at all (intro, key line, question): the shortest length that fits."""
    return len(_bos_prefix(tokenizer, prepend_bos)) + len(_encode(tokenizer, _passkey_parts(key, 0.0, 0)[1]))


def build_passkey_prompt(
    tokenizer: Any, length: int, depth: float, key: int, *, prepend_bos: bool = True
) -> PasskeyPrompt:
    """The passkey prompt with as much filler as fits in ``length`` tokens, the key line at ``depth`` of the filler.

    ``depth`` is the fraction of the filler (counted in words) placed before the key line: 0 puts it right after
    the intro, 1 right before the question. The number of filler words is found by search on the real token count,
    so this works for any tokenizer. Raises LongRopeError when not even the filler-free prompt fits.
    """
    if not 0.0 <= depth <= 1.0:
        raise LongRopeError(f"depth={depth}: must be a fraction between 0 and 1")
    prefix = _bos_prefix(tokenizer, prepend_bos)

    def token_count(filler_words: int) -> int:
        return len(prefix) + len(_encode(tokenizer, _passkey_parts(key, depth, filler_words)[1]))

    minimum = token_count(0)
    if minimum > length:
        raise LongRopeError(
            f"passkey length {length}: the prompt needs at least {minimum} tokens (intro + key line + question) "
            f"with this tokenizer; use lengths >= {minimum}"
        )
    # Start from a linear estimate (the filler costs about the same per word everywhere), so even very long prompts
    # take a handful of tokenizations. Then keep the invariant token_count(fits) <= length < token_count(too_many):
    # the result lacks less than one word of filler even where the tokenizer merges across word boundaries.
    probe = 8 * len(_FILLER_WORDS)
    tokens_per_word = max((token_count(probe) - minimum) / probe, 1e-3)
    estimate = int((length - minimum) / tokens_per_word)
    step = 8
    if token_count(estimate) <= length:
        fits = estimate
        while token_count(fits + step) <= length:
            fits, step = fits + step, step * 2
            if step > 64 * (length + 1):
                raise LongRopeError("tokenizer: adding filler text does not add tokens; use a real text tokenizer")
        too_many = fits + step
    else:
        too_many = estimate
        fits = max(too_many - step, 0)
        while token_count(fits) > length:
            too_many, step = fits, step * 2
            fits = max(too_many - step, 0)
    while too_many - fits > 1:
        middle = (fits + too_many) // 2
        if token_count(middle) <= length:
            fits = middle
        else:
            too_many = middle
    head, text = _passkey_parts(key, depth, fits)
    input_ids = prefix + _encode(tokenizer, text)
    return PasskeyPrompt(
        text=text,
        input_ids=input_ids,
        key=key,
        length=length,
        depth=depth,
        filler_words=fits,
        needle_position=len(prefix) + len(_encode(tokenizer, head)),
    )


def passkey_key(seed: int, length: int, depth: float, trial: int) -> int:
    """The random 5-digit key of one grid cell trial; depends only on its arguments (not on the grid's order)."""
    return random.Random(f"passkey/{int(seed)}/{int(length)}/{float(depth)!r}/{int(trial)}").randint(10000, 99999)


@dataclass(frozen=True)
class PasskeyTrial:
    key: int
    prompt_tokens: int
    needle_position: int
    answer_text: str
    answer: int | None

    @property
    def correct(self) -> bool:
        return self.answer == self.key

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "correct": self.correct}


@dataclass
class PasskeyCell:
    length: int
    depth: float
    trials: list[PasskeyTrial] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(trial.correct for trial in self.trials) / len(self.trials) if self.trials else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "depth": self.depth,
            "accuracy": self.accuracy,
            "trials": [trial.to_dict() for trial in self.trials],
        }


@dataclass
class PasskeyReport:
    cells: list[PasskeyCell] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        trials = [trial for cell in self.cells for trial in cell.trials]
        return sum(trial.correct for trial in trials) / len(trials) if trials else 0.0

    def accuracy_by_length(self) -> dict[int, float]:
        lengths: dict[int, list[bool]] = {}
        for cell in self.cells:
            lengths.setdefault(cell.length, []).extend(trial.correct for trial in cell.trials)
        return {length: sum(hits) / len(hits) for length, hits in lengths.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_by_length": {str(k): v for k, v in self.accuracy_by_length().items()},
            "cells": [cell.to_dict() for cell in self.cells],
        }


def _cell_prompt(tokenizer: Any, seed: int, length: int, depth: float, trial: int, prepend_bos: bool) -> PasskeyPrompt:
    key = passkey_key(seed, length, depth, trial)
    return build_passkey_prompt(tokenizer, length, depth, key, prepend_bos=prepend_bos)


def passkey_retrieval(
    model: torch.nn.Module,
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 10,
    seed: int = 0,
    max_new_tokens: int = 8,
    prepend_bos: bool = True,
    progress: bool = False,
) -> PasskeyReport:
    """Passkey accuracy over a lengths x depths grid, ``trials`` seeded random keys per cell, greedy decoding.

    Every prompt is built (and every too-short length reported) before the first generation. The answer is the
    first integer in the decoded continuation; a trial is correct when it equals the key.
    """
    if trials < 1:
        raise LongRopeError(f"trials={trials}: must be at least 1")
    if not lengths or not depths:
        raise LongRopeError("lengths/depths: the passkey grid needs at least one length and one depth")
    minimum = passkey_min_length(tokenizer, prepend_bos=prepend_bos)
    for length in lengths:
        if length < minimum:
            raise LongRopeError(
                f"passkey length {length}: the prompt needs at least {minimum} tokens (intro + key line + question) "
                f"with this tokenizer; use lengths >= {minimum}"
            )
    grid = [
        (length, depth, [_cell_prompt(tokenizer, seed, length, depth, trial, prepend_bos) for trial in range(trials)])
        for length in lengths
        for depth in depths
    ]
    device = _input_device(model)
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "eos_token_id", None)
    report = PasskeyReport()
    jobs = [(cell_index, prompt) for cell_index, (_, _, prompts) in enumerate(grid) for prompt in prompts]
    cells = [PasskeyCell(length=length, depth=depth) for length, depth, _ in grid]
    for cell_index, prompt in _progress(jobs, len(jobs), "passkey", progress):
        input_ids = torch.tensor([prompt.input_ids], dtype=torch.long, device=device)
        with torch.inference_mode():
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
            )
        continuation = tokenizer.decode(output[0, input_ids.shape[1] :].tolist(), skip_special_tokens=True)
        cells[cell_index].trials.append(
            PasskeyTrial(
                key=prompt.key,
                prompt_tokens=len(prompt.input_ids),
                needle_position=prompt.needle_position,
                answer_text=continuation,
                answer=parse_first_integer(continuation),
            )
        )
    report.cells = cells
    return report


# ----------------------------------------------------------------------------------------------------------------
# Needle-driven perplexity (LongRoPE2, RULER-style template; papers.md section 7)
# ----------------------------------------------------------------------------------------------------------------

NEEDLE_INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)
NEEDLE_LINE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_QUESTION = (
    "What is the special magic number for {key} mentioned in the provided text? "
    "The special magic number for {key} mentioned in the provided text is"
)

# Key vocabulary for the "adjective-noun" needle names; any fixed list works, it only has to be deterministic.
_NEEDLE_ADJECTIVES = (
    "amber brave calm dusty eager fuzzy gentle hollow icy jolly keen lively "
    "misty noisy odd plain quiet rapid silent tidy urban vivid wooden young"
).split()
_NEEDLE_NOUNS = (
    "anchor bridge candle desert engine falcon garden harbor island jacket kettle "
    "lantern meadow needle orchard pepper quarry river saddle tunnel violin window"
).split()


def needle_key_value(seed: int, index: int) -> tuple[str, int]:
    """The seeded (key, 7-digit value) of sample ``index``; independent of the length so lengths compare fairly."""
    rng = random.Random(f"needle/{int(seed)}/{int(index)}")
    return f"{rng.choice(_NEEDLE_ADJECTIVES)}-{rng.choice(_NEEDLE_NOUNS)}", rng.randint(1_000_000, 9_999_999)


@dataclass(frozen=True)
class NeedleSample:
    """``input_ids`` of exactly the target length; the tokens ``[answer_start, len)`` are the scored answer."""

    input_ids: list[int]
    answer_start: int
    key: str
    value: int
    document_tokens: int

    @property
    def answer_tokens(self) -> int:
        return len(self.input_ids) - self.answer_start


def _split_question_and_answer(tokenizer: Any, question: str, answer: str) -> tuple[list[int], int]:
    """Tokens of question+answer encoded together, and how many trailing tokens belong to the answer.

    Encoding the two together keeps the tokenization the model would see; the answer starts after the longest
    prefix shared with the question's own encoding (tokenizers may merge across the boundary).
    """
    together = _encode(tokenizer, question + answer)
    alone = _encode(tokenizer, question)
    shared = 0
    while shared < min(len(together), len(alone)) and together[shared] == alone[shared]:
        shared += 1
    return together, len(together) - shared


def needle_overhead(tokenizer: Any, key: str, value: int, *, prepend_bos: bool = True) -> int:
    """Tokens of a needle sample other than the document text (intro, needle, question, answer)."""
    head, tail, _ = _needle_pieces(tokenizer, key, value, prepend_bos)
    return len(head) + len(tail)


def _needle_pieces(tokenizer: Any, key: str, value: int, prepend_bos: bool) -> tuple[list[int], list[int], int]:
    head = _bos_prefix(tokenizer, prepend_bos) + _encode(
        tokenizer, NEEDLE_INTRO + "\n" + NEEDLE_LINE.format(key=key, value=value) + "\n"
    )
    tail, answer_tokens = _split_question_and_answer(tokenizer, "\n" + NEEDLE_QUESTION.format(key=key), f" {value}")
    return head, tail, answer_tokens


def build_needle_sample(
    tokenizer: Any,
    document_ids: Sequence[int] | torch.Tensor,
    length: int,
    *,
    key: str,
    value: int,
    prepend_bos: bool = True,
) -> NeedleSample:
    """[BOS] intro, needle line, the first document tokens that fit, the question, then the answer " {value}".

    The sample has exactly ``length`` tokens. The scored answer is the value (with its leading space), not the
    sentence's final period. ``document_ids`` must come from the same tokenizer.
    """
    head, tail, answer_tokens = _needle_pieces(tokenizer, key, value, prepend_bos)
    overhead = len(head) + len(tail)
    if length < overhead + 1:
        raise LongRopeError(
            f"needle length {length}: the template alone takes {overhead} tokens with this tokenizer; "
            f"use lengths >= {overhead + 1}"
        )
    document = _as_id_tensor(document_ids).tolist()
    needed = length - overhead
    if len(document) < needed:
        raise LongRopeError(
            f"document of {len(document)} tokens is shorter than the {needed} a {length}-token needle sample needs; "
            f"select longer documents"
        )
    input_ids = head + document[:needed] + tail
    return NeedleSample(
        input_ids=input_ids, answer_start=length - answer_tokens, key=key, value=value, document_tokens=needed
    )


def needle_sample_nll(
    model: torch.nn.Module,
    sample: NeedleSample,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sequence_parallel_group: Any = None,
) -> DocumentNll:
    """NLL of the sample's answer tokens only (the incremental form for a search fitness)."""
    return sequence_nll(
        model,
        sample.input_ids,
        sample.answer_start,
        chunk_size=chunk_size,
        sequence_parallel_group=sequence_parallel_group,
    )


@dataclass
class NeedlePerplexityReport:
    """Needle perplexity per length; ``samples`` hold (key, value) per document in document order."""

    seed: int
    samples: list[tuple[str, int]]
    per_length: list[LengthPerplexity] = field(default_factory=list)

    def ppl_by_length(self) -> dict[int, float]:
        return {entry.length: entry.ppl for entry in self.per_length}

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "samples": [{"key": key, "value": value} for key, value in self.samples],
            "per_length": [entry.to_dict() for entry in self.per_length],
        }


def needle_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Sequence[Sequence[int] | torch.Tensor],
    lengths: Sequence[int],
    *,
    seed: int = 0,
    prepend_bos: bool = True,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
    sequence_parallel_group: Any = None,
) -> NeedlePerplexityReport:
    """LongRoPE2's needle-driven perplexity: one needle sample per document and length, answer tokens scored.

    Document ``i`` always carries the needle ``needle_key_value(seed, i)``. All samples are built (and validated)
    before the first forward; the aggregate is token-weighted over the answers.
    """
    if not documents:
        raise LongRopeError("documents: empty; give at least one tokenized document")
    if not lengths:
        raise LongRopeError("lengths: empty; give at least one evaluation length")
    keys = [needle_key_value(seed, index) for index in range(len(documents))]
    samples: dict[int, list[NeedleSample]] = {}
    for length in lengths:
        built = []
        for index, document in enumerate(documents):
            try:
                built.append(
                    build_needle_sample(
                        tokenizer, document, length, key=keys[index][0], value=keys[index][1], prepend_bos=prepend_bos
                    )
                )
            except LongRopeError as error:
                raise LongRopeError(f"documents[{index}]: {error}") from None
        samples[length] = built
    report = NeedlePerplexityReport(seed=seed, samples=keys)
    per_length = {length: LengthPerplexity(length=length) for length in lengths}
    jobs = [(length, sample) for length in lengths for sample in samples[length]]
    for length, sample in _progress(jobs, len(jobs), "needle perplexity", progress):
        per_length[length].documents.append(
            needle_sample_nll(model, sample, chunk_size=chunk_size, sequence_parallel_group=sequence_parallel_group)
        )
    report.per_length = [per_length[length] for length in lengths]
    return report
