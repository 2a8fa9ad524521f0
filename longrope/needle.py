"""Needle-driven perplexity (LongRoPE2, RULER-style template; papers.md section 7): a key-value needle at the start,
the question at the end, the perplexity of the answer tokens only. Also the search fitness ``fitness: needle``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from longrope.errors import LongRopeError
from longrope.passkey import bos_prefix, encode
from longrope.perplexity import (
    DEFAULT_LOSS_CHUNK_SIZE,
    DocumentNll,
    LengthPerplexity,
    as_id_tensor,
    progress_bar,
    sequence_nll,
)

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
    together = encode(tokenizer, question + answer)
    alone = encode(tokenizer, question)
    shared = 0
    while shared < min(len(together), len(alone)) and together[shared] == alone[shared]:
        shared += 1
    return together, len(together) - shared


def needle_overhead(tokenizer: Any, key: str, value: int, *, prepend_bos: bool | None = None) -> int:
    """Tokens of a needle sample other than the document text (intro, needle, question, answer)."""
    head, tail, _ = _needle_pieces(tokenizer, key, value, prepend_bos)
    return len(head) + len(tail)


def _needle_pieces(tokenizer: Any, key: str, value: int, prepend_bos: bool | None) -> tuple[list[int], list[int], int]:
    head = bos_prefix(tokenizer, prepend_bos) + encode(
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
    prepend_bos: bool | None = None,
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
    document = as_id_tensor(document_ids).tolist()
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
    loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK_SIZE,
    sequence_parallel_group: Any = None,
) -> DocumentNll:
    """NLL of the sample's answer tokens only (the incremental form for a search fitness)."""
    return sequence_nll(
        model,
        sample.input_ids,
        sample.answer_start,
        loss_chunk_size=loss_chunk_size,
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
    prepend_bos: bool | None = None,
    loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK_SIZE,
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
    for length, sample in progress_bar(jobs, len(jobs), "needle perplexity", progress):
        per_length[length].documents.append(
            needle_sample_nll(
                model, sample, loss_chunk_size=loss_chunk_size, sequence_parallel_group=sequence_parallel_group
            )
        )
    report.per_length = [per_length[length] for length in lengths]
    return report
