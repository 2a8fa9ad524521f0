"""Packing token streams into fixed-length training segments, with their position ids, and the batch collator.

Segments are bookended with BOS and EOS (LongRoPE section 4.1): ``bookend="segment"`` makes every segment
``BOS ... EOS`` with the documents inside joined by EOS; ``"document"`` bookends every document and cuts the stream.
``position_ids`` run on through the segment (``"continuous"``) or restart at every document (``"document"``:
LongRoPE2 mixed-window training, papers.md section 8). ``pack_documents`` is pure numpy; ``pack_dataset`` maps it
over a ``datasets.Dataset``; ``PackedCollator`` turns rows into model inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from longrope.errors import LongRopeError

if TYPE_CHECKING:
    import datasets
    import torch

Bookend = Literal["document", "segment"]
PositionIdsMode = Literal["continuous", "document"]

# ----------------------------------------------------------------------------------------------------------------
# Packing and position ids
# ----------------------------------------------------------------------------------------------------------------


def document_stream(
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
    stream, starts = document_stream(documents, bos_token_id, eos_token_id, bookend)
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
