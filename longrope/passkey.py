"""Passkey retrieval (Mohtashami & Jaggi's prompt; papers.md section 4) for any tokenizer: prompts fitted to a token
budget, a length x depth grid of seeded trials, greedy decoding, accuracy per cell.

The prompt helpers shared with the needle tasks (:func:`encode`, :func:`bos_prefix`, :func:`parse_first_integer`)
live here too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from longrope.errors import LongRopeError
from longrope.perplexity import input_device, progress_bar

# ----------------------------------------------------------------------------------------------------------------
# Shared prompt helpers
# ----------------------------------------------------------------------------------------------------------------


def encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def bos_prefix(tokenizer: Any, prepend_bos: bool | None = None) -> list[int]:
    """The tokens a prompt starts with. None (the default): whatever the tokenizer itself puts before a text (Llama's
    and the tiny model's add BOS; SmolLM2's, whose BOS is the chat-turn marker ``<|im_start|>``, add nothing), so a
    prompt reads as the model's own inputs do. True / False force the tokenizer's BOS on or off."""
    if prepend_bos is None:
        return list(tokenizer("", add_special_tokens=True)["input_ids"])
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


def passkey_min_length(tokenizer: Any, key: int = 99999, *, prepend_bos: bool | None = None) -> int:
    """Tokens in a prompt with no filler at all (intro, key line, question): the shortest length that fits."""
    return len(bos_prefix(tokenizer, prepend_bos)) + len(encode(tokenizer, _passkey_parts(key, 0.0, 0)[1]))


def build_passkey_prompt(
    tokenizer: Any, length: int, depth: float, key: int, *, prepend_bos: bool | None = None
) -> PasskeyPrompt:
    """The passkey prompt with as much filler as fits in ``length`` tokens, the key line at ``depth`` of the filler.

    ``depth`` is the fraction of the filler (counted in words) placed before the key line: 0 puts it right after
    the intro, 1 right before the question. The number of filler words is found by search on the real token count,
    so this works for any tokenizer. Raises LongRopeError when not even the filler-free prompt fits.
    """
    if not 0.0 <= depth <= 1.0:
        raise LongRopeError(f"depth={depth}: must be a fraction between 0 and 1")
    prefix = bos_prefix(tokenizer, prepend_bos)

    def token_count(filler_words: int) -> int:
        return len(prefix) + len(encode(tokenizer, _passkey_parts(key, depth, filler_words)[1]))

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
    input_ids = prefix + encode(tokenizer, text)
    return PasskeyPrompt(
        text=text,
        input_ids=input_ids,
        key=key,
        length=length,
        depth=depth,
        filler_words=fits,
        needle_position=len(prefix) + len(encode(tokenizer, head)),
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


def _cell_prompt(
    tokenizer: Any, seed: int, length: int, depth: float, trial: int, prepend_bos: bool | None
) -> PasskeyPrompt:
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
    prepend_bos: bool | None = None,
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
    device = input_device(model)
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "eos_token_id", None)
    report = PasskeyReport()
    jobs = [(cell_index, prompt) for cell_index, (_, _, prompts) in enumerate(grid) for prompt in prompts]
    cells = [PasskeyCell(length=length, depth=depth) for length, depth, _ in grid]
    for cell_index, prompt in progress_bar(jobs, len(jobs), "passkey", progress):
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
