"""Retrieval tasks generated here for any tokenizer: the paper's passkey and RULER's synthetic tasks (single,
multi-key, multi-value and multi-query needles, variable tracking), as evaluation prompts, as training rows and as the
answer-only perplexity LongRoPE2 searches with.

A sample is: [BOS] intro, a haystack with the task's needle lines hidden in it, the question; the answers follow
(scored by greedy decoding, or appended for a training row or a needle perplexity). Two templates word them:

- ``paper``: the papers' English prompts (Mohtashami & Jaggi's passkey, LongRoPE2's "special magic number" needle
  and questions in that style), for models that read English. Haystack: the passkey filler sentences
  (``retrieval_haystack: filler``) or document text (``documents``).
- ``code``: the same tasks as Python (``amber_falcon = 4412913`` hidden in code, ``assert amber_falcon ==`` asked),
  for code models such as the embedded tiny one, whose window (256 bytes) cannot even hold the English passkey
  prompt. Haystack: document text (code).

The first needle sits at ``depth`` (the fraction of the haystack before it), snapped back to the nearest line (or,
for the filler, sentence) boundary; the other needles of a task sit at seeded random depths, a variable chain in
order after its start. Keys and values come from a seeded generator that splits every key and value space into a
held-out part (evaluation, search) and a training part (training rows), so an evaluated key was never trained on.

Scoring: the passkey is correct when the first integer of the answer is the key (the paper's rule); the other tasks
score the fraction of expected answers that appear in the continuation (RULER's rule), 0..1 per sample.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from longrope import rope
from longrope.errors import LongRopeError

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking")
TEMPLATES = ("paper", "code")
HAYSTACKS = ("filler", "documents")
# Needles per multi-needle task (RULER's defaults: 4 keys or values, a chain of 1 + 4 assignments).
NEEDLES_PER_TASK = {"niah_multikey": 4, "niah_multivalue": 4, "niah_multiquery": 4, "variable_tracking": 5}
# One in five keys and values belongs to the held-out part of its space (about 18,000 five-digit values, 100 names).
HELDOUT_SHARE = 0.2

# ----------------------------------------------------------------------------------------------------------------
# Prompt helpers
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
# Templates
# ----------------------------------------------------------------------------------------------------------------

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE_INTRO = (
    "A special magic number is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the number afterwards."
)


@dataclass(frozen=True)
class Template:
    """How one template words every task. Fields hold ``{key}``, ``{value}``, ``{keys}``, ``{previous}`` slots."""

    name: str
    intros: dict[str, str]  # per task ("" = none)
    passkey_needle: str
    passkey_question: str
    needle: str
    question: str
    multivalue_needle: str
    multivalue_question: str
    multiquery_question: str
    chain_start: str
    chain_link: str
    chain_question: str
    # What follows the question in a correct continuation ({answers}: the answers joined by list_joiner), per
    # kind of question: one answer, a key's values, several keys' values, a chain's names.
    single_answer: str
    multivalue_answer: str
    multiquery_answer: str
    chain_answer: str
    key_joiner: str  # joins the two words of a key name
    list_joiner: str  # joins several keys in a question, several answers in an answer
    boundaries: str  # characters after which a needle line may be inserted


PAPER = Template(
    name="paper",
    intros={
        "passkey": PASSKEY_INTRO,
        "niah_single": NEEDLE_INTRO,
        "niah_multikey": NEEDLE_INTRO,
        "niah_multivalue": NEEDLE_INTRO,
        "niah_multiquery": NEEDLE_INTRO,
        "variable_tracking": "Some variables are assigned in the following text, some from others. Keep track of them.",
    },
    passkey_needle="The pass key is {value}. Remember it. {value} is the pass key.",
    passkey_question="What is the pass key? The pass key is",
    needle="One of the special magic numbers for {key} is: {value}.",
    question=(
        "What is the special magic number for {key} mentioned in the provided text? "
        "The special magic number for {key} mentioned in the provided text is"
    ),
    multivalue_needle="One of the special magic numbers for {key} is: {value}.",
    multivalue_question=(
        "What are all the special magic numbers for {key} mentioned in the provided text? "
        "The special magic numbers for {key} mentioned in the provided text are"
    ),
    multiquery_question=(
        "What are the special magic numbers for {keys} mentioned in the provided text? "
        "The special magic numbers for {keys} mentioned in the provided text are"
    ),
    chain_start="VAR {key} = {value}",
    chain_link="VAR {key} = VAR {previous}",
    chain_question="Which variables hold the value {value} in the text above? The variables holding {value} are",
    single_answer=" {answers}",
    multivalue_answer=" {answers}.",
    multiquery_answer=" {answers}.",
    chain_answer=" {answers}.",
    key_joiner="-",
    list_joiner=", ",
    boundaries=".\n",
)

CODE = Template(
    name="code",
    intros={task: "" for task in TASKS},
    # The question restates the needle's own assignment up to the value, as the paper's prompt ends with the words
    # that precede its key ("The pass key is"): the answer continues the same bytes the needle has.
    passkey_needle="PASSKEY = {value}",
    passkey_question="PASSKEY =",
    needle="{key} = {value}",
    question="{key} =",
    multivalue_needle="{key}.append({value})",
    multivalue_question="assert {key} == [",
    multiquery_question="assert ({keys}) == (",
    chain_start="{key} = {value}",
    chain_link="{key} = {previous}",
    chain_question="assert all(name == {value} for name in (",
    single_answer=" {answers}",
    multivalue_answer="{answers}]",
    multiquery_answer="{answers})",
    chain_answer="{answers}))",
    key_joiner="_",
    list_joiner=", ",
    boundaries="\n",
)

TEMPLATE_BY_NAME = {template.name: template for template in (PAPER, CODE)}


def template(name: str, key: str = "retrieval_template") -> Template:
    if name not in TEMPLATE_BY_NAME:
        raise LongRopeError(f"{key}: {name!r} is not a template; use one of {', '.join(TEMPLATES)}")
    return TEMPLATE_BY_NAME[name]


def check_tasks(tasks: Sequence[str], key: str = "retrieval_tasks") -> None:
    for task in tasks:
        if task not in TASKS:
            raise LongRopeError(f"{key}: {task!r} is not a retrieval task; use any of {', '.join(TASKS)}")


def check_haystack(template_name: str, haystack: str) -> None:
    if haystack not in HAYSTACKS:
        raise LongRopeError(f"retrieval_haystack: {haystack!r} is not one of {', '.join(HAYSTACKS)}")
    if template_name == "code" and haystack != "documents":
        raise LongRopeError(
            "retrieval_haystack: the code template hides its needles in code; set retrieval_haystack: documents "
            "(and documents_path)"
        )


# ----------------------------------------------------------------------------------------------------------------
# Keys and values, with a held-out part of every space
# ----------------------------------------------------------------------------------------------------------------

_ADJECTIVES = (
    "amber brave calm dusty eager fuzzy gentle hollow icy jolly keen lively "
    "misty noisy odd plain quiet rapid silent tidy urban vivid wooden young"
).split()
_NOUNS = (
    "anchor bridge candle desert engine falcon garden harbor island jacket kettle "
    "lantern meadow needle orchard pepper quarry river saddle tunnel violin window"
).split()


def is_heldout(item: str | int) -> bool:
    """Whether a key name or value belongs to the held-out part of its space (a fixed hash, never random)."""
    digest = hashlib.sha256(f"longrope-retrieval/{item}".encode()).digest()
    return digest[0] < 256 * HELDOUT_SHARE


def _draw(rng: random.Random, make: Any, heldout: bool, taken: set) -> Any:
    while True:
        item = make(rng)
        if is_heldout(item) == heldout and item not in taken:
            taken.add(item)
            return item


def _name(joiner: str):
    return lambda rng: f"{rng.choice(_ADJECTIVES)}{joiner}{rng.choice(_NOUNS)}"


def _number(digits: int):
    return lambda rng: rng.randint(10 ** (digits - 1), 10**digits - 1)


def draw_key(rng: random.Random, words: Template, taken: set, heldout: bool = False) -> str:
    """A key name of the tasks' form (``amber_falcon`` in the code template) from the held-out or the training part
    of the name space, not in ``taken`` (added to it): for training rows built outside the tasks."""
    return _draw(rng, _name(words.key_joiner), heldout, taken)


def draw_value(rng: random.Random, digits: int, taken: set, heldout: bool = False) -> int:
    """A ``digits``-digit value from the held-out or the training part of the value space, not in ``taken``."""
    return _draw(rng, _number(digits), heldout, taken)


# ----------------------------------------------------------------------------------------------------------------
# Tasks: needle lines, the question, the answers
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskText:
    intro: str
    lines: tuple[str, ...]  # needle lines; lines[0] goes at the requested depth
    question: str
    answers: tuple[str, ...]
    answer_text: str  # what a correct continuation starts with
    ordered: bool = False  # the lines appear in their order, after the first (a variable chain, a key's values)


def task_text(task: str, words: Template, rng: random.Random, heldout: bool = True) -> TaskText:
    """The needles, question and answers of one sample of ``task``, drawn from ``rng``."""
    check_tasks([task])
    names, values = set(), set()
    name, number = _name(words.key_joiner), _number(7)
    intro = words.intros[task]

    def text(lines, question, answers, answer_format, ordered=False) -> TaskText:
        answers = tuple(map(str, answers))
        answer_text = answer_format.format(answers=words.list_joiner.join(answers))
        return TaskText(intro, tuple(lines), question, answers, answer_text, ordered)

    if task == "passkey":
        value = _draw(rng, _number(5), heldout, values)  # the paper's 5-digit key
        return text([words.passkey_needle.format(value=value)], words.passkey_question, [value], words.single_answer)
    count = NEEDLES_PER_TASK.get(task, 1)
    if task == "niah_multivalue":
        key = _draw(rng, name, heldout, names)
        found = [_draw(rng, number, heldout, values) for _ in range(count)]
        lines = [words.multivalue_needle.format(key=key, value=value) for value in found]
        # In order: the values are answered as they appear (as appends build a list).
        return text(lines, words.multivalue_question.format(key=key), found, words.multivalue_answer, ordered=True)
    if task == "variable_tracking":
        chain = [_draw(rng, name, heldout, names) for _ in range(count)]
        value = _draw(rng, _number(5), heldout, values)
        lines = [words.chain_start.format(key=chain[0], value=value)]
        lines += [words.chain_link.format(key=chain[i], previous=chain[i - 1]) for i in range(1, count)]
        return text(lines, words.chain_question.format(value=value), chain, words.chain_answer, ordered=True)
    keys = [_draw(rng, name, heldout, names) for _ in range(count)]
    found = [_draw(rng, number, heldout, values) for _ in range(count)]
    lines = [words.needle.format(key=key, value=value) for key, value in zip(keys, found)]
    if task == "niah_multiquery":
        question = words.multiquery_question.format(keys=words.list_joiner.join(keys))
        return text(lines, question, found, words.multiquery_answer)
    # niah_single and niah_multikey: the first key is asked, the others are distractors.
    return text(lines, words.question.format(key=keys[0]), found[:1], words.single_answer)


def sample_rng(seed: int, task: str, length: int, depth: float, trial: int) -> random.Random:
    """The generator of one grid cell's trial: depends only on its arguments, so every method and every rerun sees
    the same prompts whatever the grid's order."""
    return random.Random(f"retrieval/{int(seed)}/{task}/{int(length)}/{float(depth)!r}/{int(trial)}")


# ----------------------------------------------------------------------------------------------------------------
# Building a sample
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalSample:
    """``input_ids``: the prompt (ending with the question), at most ``length`` tokens; with ``answer_ids`` appended
    (a training row or a needle-perplexity sample) exactly ``length``. ``needle_positions``: where each needle line
    starts, in the order of ``TaskText.lines``."""

    task: str
    input_ids: list[int]
    answer_ids: list[int]
    answers: tuple[str, ...]
    needle_positions: tuple[int, ...]
    length: int
    depth: float

    @property
    def with_answer(self) -> list[int]:
        return self.input_ids + self.answer_ids


def _question_and_answer(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """The question's tokens and the answer's, split where encoding them together splits them (tokenizers may merge
    across the boundary; the answer then starts after the longest shared prefix)."""
    together = encode(tokenizer, question + answer)
    alone = encode(tokenizer, question)
    shared = 0
    while shared < min(len(together), len(alone)) and together[shared] == alone[shared]:
        shared += 1
    return together[:shared], together[shared:]


class Haystack:
    """Where needles hide: the template's filler sentences repeated, or windows of tokenized documents."""

    def __init__(
        self, tokenizer: Any, documents: Sequence[Sequence[int]] | None = None, from_start: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.documents = [list(document) for document in documents] if documents is not None else None
        self.from_start = from_start  # a document's first tokens (LongRoPE2's needle samples), not a random window
        self._filler: list[int] | None = None
        self._decoded: dict[int, str] = {}

    def tokens(self, count: int, rng: random.Random) -> list[int]:
        if count <= 0:
            return []
        if self.documents is None:
            if self._filler is None:
                self._filler = encode(self.tokenizer, " ".join([PASSKEY_FILLER] * 16) + " ")
            repeats = count // len(self._filler) + 1
            return (self._filler * repeats)[:count]
        if not self.documents:
            raise LongRopeError("documents: empty; the haystack needs at least one tokenized document")
        long_enough = [document for document in self.documents if len(document) >= count]
        if long_enough:
            document = long_enough[rng.randrange(len(long_enough))]
            start = 0 if self.from_start else rng.randrange(len(document) - count + 1)
            return document[start : start + count]
        if self.from_start:
            raise LongRopeError(
                f"document of {max(map(len, self.documents))} tokens is shorter than the {count} tokens of haystack a "
                "sample needs; select longer documents"
            )
        # Shorter documents than the haystack: join them, in a seeded order.
        order = list(range(len(self.documents)))
        rng.shuffle(order)
        joined: list[int] = []
        while len(joined) < count:
            for index in order:
                joined += self.documents[index]
        return joined[:count]

    def text_of(self, token: int) -> str:
        if token not in self._decoded:
            self._decoded[token] = self.tokenizer.decode([token])
        return self._decoded[token]

    def snap(self, tokens: list[int], position: int, boundaries: str, reach: int = 256) -> int:
        """The nearest position at or before ``position`` (within ``reach`` tokens; else after it) that follows a
        token ending in one of ``boundaries``; ``position`` itself when there is none within reach."""
        candidates = [
            *range(position, max(position - reach, 0), -1),
            *range(position + 1, min(position + reach, len(tokens)) + 1),
        ]
        for index in candidates:
            text = self.text_of(tokens[index - 1])
            if text and text[-1] in boundaries:
                return index
        return position


def build_sample(
    tokenizer: Any,
    task: str,
    length: int,
    depth: float,
    rng: random.Random,
    *,
    words: Template = PAPER,
    haystack: Haystack | None = None,
    heldout: bool = True,
    with_answer: bool = False,
    prepend_bos: bool | None = None,
) -> RetrievalSample:
    """One sample of ``task`` in ``length`` tokens with its first needle at ``depth`` of the haystack.

    The prompt is [BOS] intro, haystack with needle lines, question; ``with_answer`` makes room for the answer too
    (so prompt + answer is exactly ``length`` tokens; the prompt alone is ``length`` otherwise). Raises a one-line
    LongRopeError when the template alone does not fit.
    """
    if not 0.0 <= depth <= 1.0:
        raise LongRopeError(f"depth={depth}: must be a fraction between 0 and 1")
    haystack = haystack or Haystack(tokenizer)
    text = task_text(task, words, rng, heldout=heldout)
    head, needles, question, answer = _pieces(tokenizer, text, prepend_bos)
    fixed = len(head) + sum(map(len, needles)) + len(question) + (len(answer) if with_answer else 0)
    if fixed + 1 > length:
        raise LongRopeError(
            f"{task} length {length}: the {words.name} template alone takes {fixed} tokens with this tokenizer; "
            f"use lengths >= {fixed + 1}"
        )
    filler = haystack.tokens(length - fixed, rng)
    # Depths: the first needle at `depth`, the others uniform (ordered lines: in order after the first).
    depths = [depth] + [rng.random() for _ in needles[1:]]
    if text.ordered:
        depths = [depth] + sorted(depth + (1.0 - depth) * d for d in depths[1:])
    positions = [haystack.snap(filler, round(d * len(filler)), words.boundaries) for d in depths]
    if text.ordered:
        positions = [max(positions[: i + 1]) for i in range(len(positions))]  # snapping must not reorder them
    # Insert from the last position so earlier ones stay valid; equal positions keep the lines' order.
    order = sorted(range(len(needles)), key=lambda i: (positions[i], i), reverse=True)
    body = list(filler)
    for index in order:
        body[positions[index] : positions[index]] = needles[index]
    starts = []
    for index in range(len(needles)):
        shift = sum(len(needles[j]) for j in range(len(needles)) if (positions[j], j) < (positions[index], index))
        starts.append(len(head) + positions[index] + shift)
    return RetrievalSample(
        task=task,
        input_ids=head + body + question,
        answer_ids=answer,
        answers=text.answers,
        needle_positions=tuple(starts),
        length=length,
        depth=depth,
    )


def _pieces(
    tokenizer: Any, text: TaskText, prepend_bos: bool | None
) -> tuple[list[int], list[list[int]], list[int], list[int]]:
    """Tokens of a sample's fixed parts: [BOS] + intro, each needle line, the question, the answer."""
    head = bos_prefix(tokenizer, prepend_bos) + (encode(tokenizer, text.intro + "\n") if text.intro else [])
    needles = [encode(tokenizer, "\n" + line + "\n") for line in text.lines]
    question, answer = _question_and_answer(tokenizer, "\n" + text.question, text.answer_text)
    return head, needles, question, answer


def minimum_length(
    tokenizer: Any, task: str, words: Template, *, with_answer: bool = False, prepend_bos: bool | None = None
) -> int:
    """The shortest length every sample of ``task`` fits in: the longest template (keys and values differ in token
    count) over a fixed set of draws, plus one haystack token."""
    longest = 0
    for draw in range(32):
        head, needles, question, answer = _pieces(tokenizer, task_text(task, words, random.Random(draw)), prepend_bos)
        fixed = len(head) + sum(map(len, needles)) + len(question) + (len(answer) if with_answer else 0)
        longest = max(longest, fixed)
    return longest + 1


# ----------------------------------------------------------------------------------------------------------------
# Scoring and the grid
# ----------------------------------------------------------------------------------------------------------------


def score(task: str, continuation: str, answers: Sequence[str]) -> float:
    """The passkey: 1 when the first integer is the key (the paper's rule). Other tasks: the fraction of answers
    that appear in the continuation (RULER's rule)."""
    if task == "passkey":
        return float(parse_first_integer(continuation) == int(answers[0]))
    lowered = continuation.lower()
    return sum(answer.lower() in lowered for answer in answers) / len(answers)


@dataclass(frozen=True)
class RetrievalTrial:
    answers: tuple[str, ...]
    prompt_tokens: int
    needle_positions: tuple[int, ...]
    output: str
    score: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "answers": list(self.answers),
            "prompt_tokens": self.prompt_tokens,
            "needle_positions": list(self.needle_positions),
            "output": self.output,
            "score": self.score,
        }


@dataclass
class RetrievalCell:
    length: int
    depth: float
    trials: list[RetrievalTrial] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return sum(trial.score for trial in self.trials) / len(self.trials) if self.trials else 0.0

    def to_dict(self) -> dict[str, Any]:
        trials = [trial.to_dict() for trial in self.trials]
        return {"length": self.length, "depth": self.depth, "accuracy": self.accuracy, "trials": trials}


@dataclass
class TaskReport:
    task: str
    cells: list[RetrievalCell] = field(default_factory=list)

    def accuracy_by_length(self) -> dict[int, float]:
        scores: dict[int, list[float]] = {}
        for cell in self.cells:
            scores.setdefault(cell.length, []).extend(trial.score for trial in cell.trials)
        return {length: sum(values) / len(values) for length, values in scores.items()}

    def to_dict(self) -> dict[str, Any]:
        by_length = {str(length): value for length, value in self.accuracy_by_length().items()}
        return {"accuracy_by_length": by_length, "cells": [cell.to_dict() for cell in self.cells]}


def check_grid(
    tokenizer: Any, tasks: Sequence[str], lengths: Sequence[int], words: Template, key: str = "retrieval_lengths"
) -> None:
    """Every (task, length) can hold its template; fails before any evaluation with the shortest usable length."""
    for task in tasks:
        minimum = minimum_length(tokenizer, task, words)
        short = [length for length in lengths if length < minimum]
        if short:
            raise LongRopeError(
                f"{key}: {short} cannot hold the {words.name} template of {task}, which needs about {minimum} tokens "
                "with this tokenizer; drop those lengths or the task"
            )


def retrieval_suite(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    *,
    trials: int = 10,
    seed: int = 0,
    words: Template = PAPER,
    documents: Sequence[Sequence[int]] | None = None,
    progress: bool = False,
) -> dict[str, TaskReport]:
    """Accuracy per task over a lengths x depths grid, ``trials`` seeded samples per cell, greedy decoding.

    Every prompt is built (and every too-short length reported) before the first generation. Keys and values are
    drawn from the held-out part of their spaces.
    """
    import torch

    from longrope.perplexity import input_device, progress_bar

    check_tasks(tasks)
    if trials < 1:
        raise LongRopeError(f"retrieval_trials: {trials} must be at least 1")
    if not lengths or not depths:
        raise LongRopeError("retrieval_lengths/retrieval_depths: the grid needs at least one length and one depth")
    check_grid(tokenizer, tasks, lengths, words)
    haystack = Haystack(tokenizer, documents)
    jobs = []
    reports = {task: TaskReport(task) for task in tasks}
    for task in tasks:
        for length in lengths:
            for depth in depths:
                cell = RetrievalCell(length, depth)
                reports[task].cells.append(cell)
                for trial in range(trials):
                    rng = sample_rng(seed, task, length, depth, trial)
                    jobs.append(
                        (task, cell, build_sample(tokenizer, task, length, depth, rng, words=words, haystack=haystack))
                    )
    device = input_device(model)
    pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "eos_token_id", None)
    for task, cell, sample in progress_bar(jobs, len(jobs), "retrieval", progress):
        input_ids = torch.tensor([sample.input_ids], dtype=torch.long, device=device)
        max_new_tokens = len(sample.answer_ids) + 8
        with torch.inference_mode(), rope.factors_for_generation(model, input_ids.shape[1] + max_new_tokens):
            output = model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                num_beams=1,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_token_id,
            )
        continuation = tokenizer.decode(output[0, input_ids.shape[1] :].tolist(), skip_special_tokens=True)
        cell.trials.append(
            RetrievalTrial(
                answers=sample.answers,
                prompt_tokens=len(sample.input_ids),
                needle_positions=sample.needle_positions,
                output=continuation,
                score=score(task, continuation, sample.answers),
            )
        )
    return reports
