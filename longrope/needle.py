"""Needle-driven perplexity (LongRoPE2; papers.md section 7): a key-value needle at the start of a document, the
question at the end, the perplexity of the answer tokens only. Also the search fitness ``fitness: needle``.

The sample is :mod:`longrope.retrieval`'s ``niah_single`` task at depth 0 with the answer appended, in either
template (``paper``: LongRoPE2's "special magic number" wording; ``code``: the Python analog), over the document's
first tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from longrope import retrieval
from longrope.errors import LongRopeError
from longrope.perplexity import (
    DEFAULT_LOSS_CHUNK_SIZE,
    DocumentNll,
    LengthPerplexity,
    as_id_tensor,
    progress_bar,
    sequence_nll,
)

TASK = "niah_single"


def needle_rng(seed: int, index: int) -> random.Random:
    """The generator of document ``index``'s needle: independent of the length, so lengths compare fairly."""
    return random.Random(f"needle/{int(seed)}/{int(index)}")


def build_needle_sample(
    tokenizer: Any,
    document_ids: Sequence[int] | torch.Tensor,
    length: int,
    rng: random.Random,
    *,
    words: retrieval.Template = retrieval.PAPER,
    prepend_bos: bool | None = None,
) -> retrieval.RetrievalSample:
    """[BOS] intro, needle line, the document's first tokens that fit, the question, then the answer: exactly
    ``length`` tokens; the answer tokens (``answer_ids``) are the scored ones."""
    haystack = retrieval.Haystack(tokenizer, [as_id_tensor(document_ids).tolist()], from_start=True)
    return retrieval.build_sample(
        tokenizer, TASK, length, 0.0, rng, words=words, haystack=haystack, with_answer=True, prepend_bos=prepend_bos
    )


def needle_sample_nll(
    model: torch.nn.Module,
    sample: retrieval.RetrievalSample,
    *,
    loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK_SIZE,
    sequence_parallel_group: Any = None,
) -> DocumentNll:
    """NLL of the sample's answer tokens only (the incremental form for a search fitness)."""
    return sequence_nll(
        model,
        sample.with_answer,
        len(sample.input_ids),
        loss_chunk_size=loss_chunk_size,
        sequence_parallel_group=sequence_parallel_group,
    )


@dataclass
class NeedlePerplexityReport:
    """Needle perplexity per length; ``answers`` hold each document's needle answer, in document order."""

    seed: int
    answers: list[str]
    per_length: list[LengthPerplexity] = field(default_factory=list)

    def ppl_by_length(self) -> dict[int, float]:
        return {entry.length: entry.ppl for entry in self.per_length}

    def to_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "answers": self.answers,
            "per_length": [entry.to_dict() for entry in self.per_length],
        }


def needle_perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    documents: Sequence[Sequence[int] | torch.Tensor],
    lengths: Sequence[int],
    *,
    seed: int = 0,
    words: retrieval.Template = retrieval.PAPER,
    prepend_bos: bool | None = None,
    loss_chunk_size: int | None = DEFAULT_LOSS_CHUNK_SIZE,
    progress: bool = False,
    sequence_parallel_group: Any = None,
) -> NeedlePerplexityReport:
    """LongRoPE2's needle-driven perplexity: one needle sample per document and length, answer tokens scored.

    Document ``i`` always carries the needle drawn from ``needle_rng(seed, i)``. All samples are built (and
    validated) before the first forward; the aggregate is token-weighted over the answers.
    """
    if not documents:
        raise LongRopeError("documents: empty; give at least one tokenized document")
    if not lengths:
        raise LongRopeError("lengths: empty; give at least one evaluation length")
    samples: dict[int, list[retrieval.RetrievalSample]] = {}
    for length in lengths:
        built = []
        for index, document in enumerate(documents):
            try:
                rng = needle_rng(seed, index)
                built.append(
                    build_needle_sample(tokenizer, document, length, rng, words=words, prepend_bos=prepend_bos)
                )
            except LongRopeError as error:
                raise LongRopeError(f"documents[{index}]: {error}") from None
        samples[length] = built
    report = NeedlePerplexityReport(seed=seed, answers=[sample.answers[0] for sample in samples[lengths[0]]])
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
