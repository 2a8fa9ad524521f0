"""Training rows that teach a model to use its context, mixed into packed pretraining data by ``data/prepare.py``.

A model small enough for a CPU, trained on code alone, never learns to copy from its context: a string written twice
costs it as much the second time as the first (``benchmarks/tiny_model.py``'s copy probe), so it cannot answer a
passkey however many retrieval samples it sees. Three kinds of rows, each a whole ``seq_len`` segment
(BOS ... EOS, positions 0..seq_len-1), built from the split's own documents:

- **retrieval rows** (``retrieval_fraction``): a sample of one of ``retrieval_tasks`` with its answer
  (:mod:`longrope.retrieval`), keys and values from the training part of their spaces.
- **copy rows** (``copy_fraction``): random strings of code characters, each written a second time later in the row,
  between short slices of code. This is what forms the induction heads retrieval is built on.
- **lookup rows** (``lookup_fraction``): lines of code among needle-style assignments (the template's needle,
  ``name = 4412913`` in the code template), each assignment restated later in the row: the lookup of a value by its
  key, many times per row instead of once.

data/tiny/README.md ("Teaching it to retrieve") has the probes behind the recipe.
"""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from longrope import retrieval
from longrope.errors import LongRopeError

if TYPE_CHECKING:
    from longrope.args import RetrievalMixArguments

# The strings of copy rows: letters, digits and punctuation of code. A large alphabet makes the previous token enough
# to find where a string continues, the signal an induction head forms from; digits alone (half the strings, in a
# trial) diluted it so much that 2,000 steps formed none (data/tiny/README.md).
COPY_ALPHABET = string.ascii_letters + string.digits + "_ .,=()[]"
COPY_STRING_CHARS = (6, 20)  # a copied string's length range, in characters
COPY_SLICE_TOKENS = (4, 40)  # a slice of code between strings, in tokens
# Lookup rows: values of 3 to 8 digits (the suite asks 5-digit passkeys and 7-digit needles); random identifiers
# beside the template's key names (a lookup must work for any key, not only the suite's adjective_noun names).
LOOKUP_VALUE_DIGITS = (3, 8)
LOOKUP_IDENTIFIER_CHARS = (3, 12)
LOOKUP_NAMED_SHARE = 0.6


def _row_end(row: list[int], seq_len: int, eos: int) -> list[int]:
    return row[: seq_len - 1] + [eos]


def copy_row(documents: Sequence[Sequence[int]], seq_len: int, tokenizer: Any, bos: int, eos: int, rng: random.Random):
    """BOS, then until the row is full: with p=1/2 (when one is pending) a pending string's second occurrence, else
    with p=1/2 a new random string, else a slice of one document; EOS last."""
    document = documents[rng.randrange(len(documents))]
    row, pending = [bos], []
    while len(row) < seq_len - 1:
        if pending and rng.random() < 0.5:
            row += pending.pop(rng.randrange(len(pending)))
        elif rng.random() < 0.5:
            text = "".join(rng.choice(COPY_ALPHABET) for _ in range(rng.randint(*COPY_STRING_CHARS)))
            pending.append(retrieval.encode(tokenizer, text))
            row += pending[-1]
        else:
            start = rng.randrange(len(document))
            row += document[start : start + rng.randint(*COPY_SLICE_TOKENS)]
    return _row_end(row, seq_len, eos)


def _lookup_key(rng: random.Random, words: retrieval.Template, taken: set) -> str:
    if rng.random() < LOOKUP_NAMED_SHARE:
        return retrieval.draw_key(rng, words, taken)
    while True:
        key = "".join(rng.choice(string.ascii_letters + "_") for _ in range(rng.randint(*LOOKUP_IDENTIFIER_CHARS)))
        key = key.upper() if rng.random() < 0.3 else key
        if key not in taken and key[0] != "_":
            taken.add(key)
            return key


def lookup_row(
    documents: Sequence[Sequence[int]],
    seq_len: int,
    tokenizer: Any,
    bos: int,
    eos: int,
    rng: random.Random,
    words: retrieval.Template,
):
    """BOS, then until the row is full, line by line: with p=0.4 (when one is pending, not the line just written) a
    pending assignment restated, else with p=0.35 a new assignment (the template's needle; key and value from the
    training part of their spaces), else the next line of code from a window of one document; EOS last."""
    window = documents[rng.randrange(len(documents))]
    start = rng.randrange(max(len(window) - 2 * seq_len, 1))
    lines = tokenizer.decode(window[start : start + 2 * seq_len]).split("\n")[1:] or [""]
    row, pending, keys, values, line, last = [bos], [], set(), set(), 0, None
    while len(row) < seq_len - 1:
        draw = rng.random()
        # Never the line just written: a restatement right below its assignment is a copy of the line above.
        restatable = [text for text in pending if text != last]
        if restatable and draw < 0.4:
            text = restatable[rng.randrange(len(restatable))]
            pending.remove(text)
        elif draw < 0.75:
            value = retrieval.draw_value(rng, rng.randint(*LOOKUP_VALUE_DIGITS), values)
            text = words.needle.format(key=_lookup_key(rng, words, keys), value=value)
            pending.append(text)
        else:
            text = lines[line % len(lines)]
            line += 1
        row += retrieval.encode(tokenizer, text + "\n")
        last = text
    return _row_end(row, seq_len, eos)


def retrieval_row(documents, seq_len, tokenizer, eos, rng, mix: RetrievalMixArguments, haystack, words):
    """A sample of one of ``mix.retrieval_tasks``, its needle at a uniform depth, with its answer and EOS."""
    sample = retrieval.build_sample(
        tokenizer,
        rng.choice(mix.retrieval_tasks),
        seq_len - 1,
        rng.random(),
        rng,
        words=words,
        haystack=haystack,
        heldout=False,
        with_answer=True,
        prepend_bos=True,
    )
    return sample.with_answer + [eos]


def row_counts(packed_rows: int, mix: RetrievalMixArguments) -> dict[str, int]:
    """Rows of each kind so that each makes up its fraction of the mixed train split (packed rows the rest)."""
    total = packed_rows / (1.0 - mix.context_fraction)
    fractions = {"retrieval": mix.retrieval_fraction, "copy": mix.copy_fraction, "lookup": mix.lookup_fraction}
    return {kind: round(total * fraction) for kind, fraction in fractions.items() if fraction > 0}


def context_rows(
    documents: Sequence[Sequence[int]],
    counts: dict[str, int],
    seq_len: int,
    tokenizer: Any,
    bos: int,
    eos: int,
    mix: RetrievalMixArguments,
    seed: int,
) -> dict[str, list[list[int]]]:
    """``counts[kind]`` rows of each kind (seeded by ``seed`` and the kind, so one kind's count never changes
    another's rows), in kind order, as ``input_ids`` and ``position_ids`` columns."""
    words = retrieval.template(mix.retrieval_template)
    if counts.get("retrieval"):
        minimum = max(
            retrieval.minimum_length(tokenizer, task, words, with_answer=True, prepend_bos=True)
            for task in mix.retrieval_tasks
        )
        if seq_len - 1 < minimum:
            raise LongRopeError(
                f"retrieval_tasks: a {seq_len}-token row cannot hold every task's {words.name} template (about "
                f"{minimum} tokens with this tokenizer); raise max_seq_len or drop tasks"
            )
    haystack = retrieval.Haystack(tokenizer, documents)
    make = {
        "retrieval": lambda rng: retrieval_row(documents, seq_len, tokenizer, eos, rng, mix, haystack, words),
        "copy": lambda rng: copy_row(documents, seq_len, tokenizer, bos, eos, rng),
        "lookup": lambda rng: lookup_row(documents, seq_len, tokenizer, bos, eos, rng, words),
    }
    rows = []
    for kind, count in counts.items():
        rng = random.Random(f"{kind}-rows/{seed}")
        rows += [make[kind](rng) for _ in range(count)]
    return {"input_ids": rows, "position_ids": [list(range(seq_len))] * len(rows)}
