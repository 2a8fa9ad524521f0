"""Memory-linear perplexity of long documents: the paper's truncated and sliding-window protocols.

Every function takes a Hugging Face causal LM (``*ForCausalLM``) that the caller has already patched with whatever
RoPE method it evaluates; nothing here touches RoPE. Position ids ``0..n-1`` are passed explicitly for every window so
the patch sees the positions the model is evaluated at.

Memory: no ``length x vocab`` logits tensor is ever materialised. The decoder backbone (``model.get_decoder()``)
produces the final hidden states, and only the rows whose next token is scored go through the output head
(``model.get_output_embeddings()``), ``loss_chunk_size`` rows at a time (:mod:`longrope.loss`, the same chunked loss
training uses), so the peak is linear in the length with a ``loss_chunk_size x vocab`` constant. Cross-entropy is
computed in fp32 and summed in fp64. The passkey and needle tasks (:mod:`longrope.passkey`, :mod:`longrope.needle`)
score through :func:`sequence_nll` too.

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
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from longrope.errors import LongRopeError
from longrope.loss import DEFAULT_LOSS_CHUNK_SIZE, chunked_nll

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
    loss_chunk_size: int | None
    per_length: list[LengthPerplexity] = field(default_factory=list)

    def ppl_by_length(self) -> dict[int, float]:
        return {entry.length: entry.ppl for entry in self.per_length}

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "stride": self.stride,
            "add_bos": self.add_bos,
            "loss_chunk_size": self.loss_chunk_size,
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


def input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return next(model.parameters()).device


def as_id_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    tensor = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    return tensor.reshape(-1).long()


def sequence_nll(
    model: torch.nn.Module,
    input_ids: Sequence[int] | torch.Tensor,
    score_from: int = 1,
    *,
    loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK_SIZE,
    sequence_parallel_group: Any = None,
) -> DocumentNll:
    """NLL of ``input_ids[t]`` given ``input_ids[:t]``, summed over ``t`` in ``[score_from, len(input_ids))``.

    One forward of the backbone over the whole sequence with ``position_ids = 0..n-1`` and no KV cache; then the
    output head and cross-entropy on ``loss_chunk_size`` hidden rows at a time (only the rows that predict a scored
    token, as HF's ``logits_to_keep`` does). Peak memory: O(n * hidden) + O(loss_chunk_size * vocab).

    ``sequence_parallel_group``: the sequence is split into equal contiguous shards, one per rank of the group, and
    each rank runs the backbone on its shard only (the model's attention must be sequence-parallel, e.g. DeepSpeed
    Ulysses registered with ``UlyssesSPAttentionHF.register_with_transformers``); NLL sums are all-reduced, so every
    rank returns the whole sequence's result. The tail is padded to a multiple of the group size and never scored.
    """
    ids = as_id_tensor(input_ids)
    length = ids.numel()
    if not 1 <= score_from <= length:
        raise LongRopeError(f"score_from={score_from}: must be between 1 and the sequence length {length}")
    if loss_chunk_size is not None and loss_chunk_size < 1:
        raise LongRopeError(f"loss_chunk_size: {loss_chunk_size} must be a positive number of tokens (e.g. 4096)")
    backbone, head = _backbone_and_head(model)
    device = input_device(model)
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
        total, _ = chunked_nll(predicting_rows, head, targets, loss_chunk_size, accumulate=torch.float64)
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
    loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK_SIZE,
    sequence_parallel_group: Any = None,
) -> DocumentNll:
    """NLL of one document at one evaluation length: the incremental form (a search can stop after any document).

    ``mode="truncate"`` scores the first ``length`` tokens (``length - 1`` after a BOS) as one window.
    ``mode="sliding"`` slides a ``length``-position window by ``stride`` over the first ``max_document_tokens``
    tokens (default: the whole document) and scores each token in the first window that can predict it.
    ``bos_token_id`` defaults to the model config's when ``add_bos`` is on.
    """
    tokens = as_id_tensor(ids)
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
            loss_chunk_size=loss_chunk_size,
            sequence_parallel_group=sequence_parallel_group,
        )
        nll_sum += result.nll_sum
        scored += result.scored_tokens
    return DocumentNll(nll_sum=_finite_or_inf(nll_sum), scored_tokens=scored, windows=len(windows))


def _is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def progress_bar(iterable: Iterable, total: int, description: str, enabled: bool) -> Iterable:
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
    loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK_SIZE,
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
    doc_tensors = [as_id_tensor(doc) for doc in documents]
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
    report = PerplexityReport(mode=mode, stride=stride, add_bos=add_bos, loss_chunk_size=loss_chunk_size)
    jobs = [(length, index) for length in lengths for index in range(len(doc_tensors))]
    per_length = {length: LengthPerplexity(length=length) for length in lengths}
    for length, index in progress_bar(jobs, len(jobs), "perplexity", progress):
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
                loss_chunk_size=loss_chunk_size,
                sequence_parallel_group=sequence_parallel_group,
            )
        )
    report.per_length = [per_length[length] for length in lengths]
    return report
