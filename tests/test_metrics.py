"""Tests for longrope.perplexity, longrope.retrieval and longrope.needle: chunked perplexity, sliding windows, BOS,
the retrieval tasks (passkey, needles, variable tracking) and needle perplexity.

Every reference below is computed in the test from the model's full logits (``model(...).logits``), i.e. the path
the chunked scorer must reproduce without materialising them.
"""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from conftest import tiny_config
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, LlamaForCausalLM, PreTrainedTokenizerFast

from longrope import needle, perplexity, retrieval
from longrope.errors import LongRopeError

BYTE_VOCAB = 259  # 256 bytes + <s>, </s>, <pad>
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def _tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = tiny_config(
        "llama",
        vocab_size=BYTE_VOCAB,
        max_position_embeddings=4096,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        attn_implementation="sdpa",
        **{**TINY, **overrides},
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _tiny_llama()


def _adds_bos(tokenizer: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """Like Llama's tokenizer, put BOS before every encoded text (the prompts follow what the tokenizer does)."""
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tokenizer


def _byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    return _adds_bos(fast)


def _merging_tokenizer() -> PreTrainedTokenizerFast:
    """A BPE trained in memory on the prompt templates: words merge into multi-byte tokens as in real vocabularies."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    paper = retrieval.PAPER
    corpus = [retrieval.PASSKEY_INTRO, retrieval.PASSKEY_FILLER * 20, paper.passkey_needle, paper.passkey_question]
    corpus += [retrieval.NEEDLE_INTRO, paper.needle, paper.question, retrieval.CODE.question, "assert x == 1\n" * 5]
    backend.train_from_iterator(corpus, trainer=trainer)
    return _adds_bos(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>"))


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _byte_tokenizer()


def _document(num_tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (num_tokens,), generator=torch.Generator().manual_seed(seed))


def _text(num_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = "river stone light orchard paper window quiet seven marble winter thread lamp".split()
    return " ".join(rng.choice(words) for _ in range(num_words)) + "."


def _reference_nll(model, ids: torch.Tensor, score_from: int) -> tuple[float, int]:
    """Sum of -log p(ids[t] | ids[:t]) for t >= score_from, from the full logits of a plain forward."""
    with torch.no_grad():
        logits = model(input_ids=ids.unsqueeze(0)).logits[0].double()
    log_probs = torch.log_softmax(logits[:-1], dim=-1)
    token_log_probs = log_probs.gather(1, ids[1:].unsqueeze(1)).squeeze(1)
    return float(-token_log_probs[score_from - 1 :].sum()), len(ids) - score_from


# ---------------------------------------------------------------------------------------------------------------
# Chunked perplexity
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 95, 96, 4096])
def test_chunked_nll_equals_plain_loss(model, chunk_size):
    ids = _document(96, seed=1)
    result = perplexity.sequence_nll(model, ids, loss_chunk_size=chunk_size)
    with torch.no_grad():
        plain_loss = model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()
    assert result.scored_tokens == 95
    assert result.ppl == pytest.approx(math.exp(plain_loss), rel=1e-5)


@pytest.mark.parametrize("architecture", ["llama", "mistral", "qwen2", "qwen3", "phi3"])
def test_chunked_nll_equals_plain_loss_across_architectures(architecture):
    torch.manual_seed(0)
    config = tiny_config(
        architecture, vocab_size=BYTE_VOCAB, max_position_embeddings=512, attn_implementation="sdpa", **TINY
    )
    arch_model = AutoModelForCausalLM.from_config(config).eval()
    ids = _document(80, seed=2)
    result = perplexity.sequence_nll(arch_model, ids, loss_chunk_size=13)
    with torch.no_grad():
        plain_loss = arch_model(input_ids=ids.unsqueeze(0), labels=ids.unsqueeze(0)).loss.item()
    assert result.ppl == pytest.approx(math.exp(plain_loss), rel=1e-5)


def test_sequence_nll_scores_only_from_score_from(model):
    ids = _document(64, seed=3)
    result = perplexity.sequence_nll(model, ids, 40, loss_chunk_size=5)
    reference, count = _reference_nll(model, ids, 40)
    assert result.scored_tokens == count == 24
    assert result.nll_sum == pytest.approx(reference, rel=1e-5)


def test_truncate_scores_the_first_length_tokens_only(model):
    document = _document(200, seed=4)
    result = perplexity.document_nll(model, document, 64, loss_chunk_size=16)
    reference, count = _reference_nll(model, document[:64], 1)
    assert (result.scored_tokens, result.windows) == (count, 1) == (63, 1)
    assert result.nll_sum == pytest.approx(reference, rel=1e-5)
    changed_tail = document.clone()
    changed_tail[64:] = (changed_tail[64:] + 1) % 256
    assert perplexity.document_nll(model, changed_tail, 64).nll_sum == pytest.approx(result.nll_sum, rel=1e-6)


def test_sliding_with_stride_equal_to_length_equals_truncate(model):
    document = _document(300, seed=5)
    truncated = perplexity.document_nll(model, document, 48, mode="truncate")
    sliding = perplexity.document_nll(model, document, 48, mode="sliding", stride=48, max_document_tokens=48)
    assert sliding.scored_tokens == truncated.scored_tokens == 47
    assert sliding.nll_sum == pytest.approx(truncated.nll_sum, rel=1e-6)


@pytest.mark.parametrize(
    ("num_tokens", "length", "stride", "add_bos"),
    [(100, 32, 8, False), (100, 32, 31, True), (97, 20, 7, False), (97, 20, 19, True), (50, 50, 5, False)],
)
def test_sliding_windows_score_every_token_exactly_once(num_tokens, length, stride, add_bos):
    windows = perplexity.plan_windows(num_tokens, length, stride, add_bos=add_bos)
    scored = [0] * num_tokens
    for window in windows:
        assert window.end - window.begin <= (length - 1 if add_bos else length)
        for position in range(window.score_begin, window.end):
            scored[position] += 1
    first_scored = 0 if add_bos else 1
    assert scored[:first_scored] == [0] * first_scored
    assert scored[first_scored:] == [1] * (num_tokens - first_scored)
    assert windows[-1].end == num_tokens


def test_non_overlapping_windows_without_bos_skip_each_window_start():
    windows = perplexity.plan_windows(100, 25, 25)
    assert [(w.begin, w.end, w.score_begin) for w in windows] == [
        (0, 25, 1),
        (25, 50, 26),
        (50, 75, 51),
        (75, 100, 76),
    ]


def _reference_sliding(model, document: torch.Tensor, length: int, stride: int, bos: int | None):
    """The usual HF/YaRN sliding-window loop with full logits, written independently of the module."""
    content = length - 1 if bos is not None else length
    total, count, previous_end = 0.0, 0, 0
    for begin in range(0, len(document), stride):
        end = min(begin + content, len(document))
        new_tokens = end - previous_end
        window = document[begin:end]
        if bos is not None:
            window = torch.cat([torch.tensor([bos]), window])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=window.unsqueeze(0)).logits[0].double(), dim=-1)
        # Nothing predicts the first input of a window, so scoring starts at index 1 at the earliest.
        targets = torch.arange(max(len(window) - new_tokens, 1), len(window))
        total -= float(log_probs[targets - 1, window[targets]].sum())
        count += len(targets)
        previous_end = end
        if end == len(document):
            break
    return total, count


@pytest.mark.parametrize(("stride", "add_bos"), [(16, False), (13, False), (16, True), (40, True)])
def test_sliding_window_matches_full_logits_reference(model, stride, add_bos):
    document = _document(150, seed=6)
    bos = model.config.bos_token_id if add_bos else None
    result = perplexity.document_nll(
        model, document, 41, mode="sliding", stride=stride, add_bos=add_bos, loss_chunk_size=9
    )
    reference, count = _reference_sliding(model, document, 41, stride, bos)
    assert result.scored_tokens == count == (150 if add_bos else 149)
    assert result.nll_sum == pytest.approx(reference, rel=1e-5)


def _record_backbone_inputs(model, monkeypatch) -> list[tuple[list[int], list[int]]]:
    backbone = model.get_decoder()
    seen = []
    original = backbone.forward

    def recording_forward(*args, **kwargs):
        seen.append((kwargs["input_ids"][0].tolist(), kwargs["position_ids"][0].tolist()))
        return original(*args, **kwargs)

    monkeypatch.setattr(backbone, "forward", recording_forward)
    return seen


def test_bos_option_prepends_bos_to_every_window_and_keeps_the_length(model, monkeypatch):
    document = _document(90, seed=7)
    seen = _record_backbone_inputs(model, monkeypatch)
    perplexity.document_nll(model, document, 30, mode="sliding", stride=20, add_bos=True, bos_token_id=258)
    assert len(seen) == 5
    for index, (input_ids, position_ids) in enumerate(seen):
        begin = index * 20
        assert input_ids[0] == 258
        assert input_ids[1:] == document[begin : begin + 29].tolist()
        assert position_ids == list(range(len(input_ids)))
    assert len(seen[0][0]) == 30

    seen.clear()
    perplexity.document_nll(model, document, 30, mode="truncate")
    assert seen[0][0] == document[:30].tolist()


def test_bos_defaults_to_the_model_config_and_is_required(model):
    document = _document(40, seed=8)
    explicit = perplexity.document_nll(model, document, 32, add_bos=True, bos_token_id=model.config.bos_token_id)
    from_config = perplexity.document_nll(model, document, 32, add_bos=True)
    reference, count = _reference_nll(model, torch.cat([torch.tensor([256]), document[:31]]), 1)
    assert explicit.nll_sum == from_config.nll_sum == pytest.approx(reference, rel=1e-5)
    assert explicit.scored_tokens == count == 31
    no_bos_model = _tiny_llama()
    no_bos_model.config.bos_token_id = None
    no_bos_model.generation_config.bos_token_id = None
    with pytest.raises(LongRopeError, match="bos_token_id"):
        perplexity.document_nll(no_bos_model, document, 32, add_bos=True)


def test_perplexity_report_is_token_weighted_and_per_document(model):
    documents = [_document(120, seed=9), _document(100, seed=10).tolist()]
    report = perplexity.perplexity(model, documents, [32, 64], mode="sliding", stride=16, loss_chunk_size=10)
    assert [entry.length for entry in report.per_length] == [32, 64]
    for entry in report.per_length:
        singles = [perplexity.document_nll(model, doc, entry.length, mode="sliding", stride=16) for doc in documents]
        assert [doc.scored_tokens for doc in entry.documents] == [119, 99]
        assert entry.nll_sum == pytest.approx(sum(doc.nll_sum for doc in singles), rel=1e-6)
        assert entry.ppl == pytest.approx(math.exp(entry.nll_sum / 218), rel=1e-9)
        assert entry.documents[1].ppl == pytest.approx(singles[1].ppl, rel=1e-6)
    as_dict = report.to_dict()
    assert as_dict["per_length"][1]["documents"][0]["scored_tokens"] == 119
    assert set(report.ppl_by_length()) == {32, 64}


def test_perplexity_validates_everything_before_running(model, monkeypatch):
    seen = _record_backbone_inputs(model, monkeypatch)
    with pytest.raises(LongRopeError, match=r"documents\[1\]: 50 tokens.*length 64"):
        perplexity.perplexity(model, [_document(100, 1), _document(50, 2)], [32, 64])
    with pytest.raises(LongRopeError, match="stride"):
        perplexity.perplexity(model, [_document(100, 1)], [32], mode="sliding", stride=33)
    with pytest.raises(LongRopeError, match="stride"):
        perplexity.perplexity(model, [_document(100, 1)], [32], mode="sliding")
    with pytest.raises(LongRopeError, match="mode"):
        perplexity.perplexity(model, [_document(100, 1)], [32], mode="rolling")
    with pytest.raises(LongRopeError, match="chunk_size"):
        perplexity.sequence_nll(model, _document(10, 1), loss_chunk_size=0)
    assert seen == []


def test_non_finite_loss_is_reported_as_inf():
    broken = _tiny_llama()
    with torch.no_grad():
        broken.lm_head.weight[7] = float("nan")
    result = perplexity.document_nll(broken, _document(40, seed=11), 32)
    assert result.nll_sum == math.inf and result.ppl == math.inf
    report = perplexity.perplexity(broken, [_document(40, seed=11)], [32])
    assert report.per_length[0].ppl == math.inf
    mixed = perplexity.LengthPerplexity(length=32, documents=[perplexity.DocumentNll(10.0, 5), result])
    assert mixed.ppl == math.inf and mixed.mean_document_ppl == math.inf
    finite = perplexity.LengthPerplexity(length=32, documents=[perplexity.DocumentNll(10.0, 5)])
    assert finite.ppl == pytest.approx(math.exp(2.0))


def test_transformed_logits_are_refused():
    softcapped = _tiny_llama()
    softcapped.config.final_logit_softcapping = 30.0
    with pytest.raises(LongRopeError, match="final_logit_softcapping"):
        perplexity.sequence_nll(softcapped, _document(10, 1))


# ---------------------------------------------------------------------------------------------------------------
# Retrieval tasks
# ---------------------------------------------------------------------------------------------------------------

CODE_TEXT = "".join(f"def f{i}(x):\n    return x * {i} + len(str(x))\n\n" for i in range(400))


def _code_documents(tok, count: int = 3) -> list[list[int]]:
    ids = tok(CODE_TEXT, add_special_tokens=False)["input_ids"]
    return [ids[i * 500 :] for i in range(count)]


def test_prompts_start_as_the_tokenizer_starts_a_text():
    adds_bos = _byte_tokenizer()
    plain = _byte_tokenizer()
    plain.backend_tokenizer.post_processor = None  # like SmolLM2's: BOS is a chat-turn marker, never prepended
    bos = adds_bos.bos_token_id
    assert retrieval.bos_prefix(adds_bos) == [bos] and retrieval.bos_prefix(plain) == []
    assert retrieval.bos_prefix(plain, True) == [bos] and retrieval.bos_prefix(adds_bos, False) == []
    with_bos = retrieval.build_sample(adds_bos, "passkey", 400, 0.5, random.Random(1))
    without = retrieval.build_sample(plain, "passkey", 400, 0.5, random.Random(1))
    assert with_bos.input_ids[0] == bos and bos not in without.input_ids
    assert len(with_bos.input_ids) == len(without.input_ids) == 400  # the BOS took the place of a filler token
    assert with_bos.input_ids[1:100] == without.input_ids[:99] and with_bos.input_ids[-20:] == without.input_ids[-20:]
    words = retrieval.PAPER
    assert (
        retrieval.minimum_length(adds_bos, "passkey", words) == retrieval.minimum_length(plain, "passkey", words) + 1
    )
    sample = needle.build_needle_sample(plain, list(range(30, 130)) * 6, 500, random.Random(0))
    assert bos not in sample.with_answer


@pytest.mark.parametrize("task", retrieval.TASKS)
@pytest.mark.parametrize(("template", "tokenizer_kind", "length"), [("paper", "bpe", 1200), ("code", "bytes", 400)])
@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_every_task_fits_its_length_and_hides_its_needles_at_depth(task, template, tokenizer_kind, length, depth):
    tok = _byte_tokenizer() if tokenizer_kind == "bytes" else _merging_tokenizer()
    words = retrieval.template(template)
    haystack = retrieval.Haystack(tok, _code_documents(tok) if template == "code" else None)
    sample = retrieval.build_sample(tok, task, length, depth, random.Random(7), words=words, haystack=haystack)
    text = retrieval.task_text(task, words, random.Random(7))  # the same draws: the sample's needles and answers
    assert len(sample.input_ids) == length and sample.input_ids[0] == tok.bos_token_id
    assert sample.answers == text.answers and len(sample.needle_positions) == len(text.lines)
    for line, start in zip(text.lines, sample.needle_positions):
        line_ids = tok("\n" + line + "\n", add_special_tokens=False)["input_ids"]
        assert sample.input_ids[start : start + len(line_ids)] == line_ids
    question = tok("\n" + text.question, add_special_tokens=False)["input_ids"]
    assert sample.input_ids[-len(question) :] == question
    assert tok.decode(sample.answer_ids).strip().startswith(text.answers[0])
    if text.ordered:
        assert list(sample.needle_positions) == sorted(sample.needle_positions)
    # The first needle at `depth` of the haystack, moved to a boundary at most 256 tokens before (or else after) it.
    head = 1 + (len(tok(text.intro + "\n", add_special_tokens=False)["input_ids"]) if text.intro else 0)
    haystack_tokens = (
        length
        - head
        - len(question)
        - sum(len(tok("\n" + line + "\n", add_special_tokens=False)["input_ids"]) for line in text.lines)
    )
    before = sum(
        len(tok("\n" + line + "\n", add_special_tokens=False)["input_ids"])
        for line, start in zip(text.lines, sample.needle_positions)
        if start < sample.needle_positions[0]
    )
    filler_before = sample.needle_positions[0] - head - before
    assert abs(filler_before - round(depth * haystack_tokens)) <= 256
    with_answer = retrieval.build_sample(
        tok, task, length, depth, random.Random(7), words=words, haystack=haystack, with_answer=True
    )
    assert len(with_answer.with_answer) == length and with_answer.answer_ids == sample.answer_ids


def test_needles_in_code_sit_on_their_own_lines():
    tok = _byte_tokenizer()
    haystack = retrieval.Haystack(tok, _code_documents(tok))
    for seed in range(10):
        sample = retrieval.build_sample(
            tok, "niah_multikey", 400, 0.5, random.Random(seed), words=retrieval.CODE, haystack=haystack
        )
        text = tok.decode(sample.input_ids[1:])
        for line in retrieval.task_text("niah_multikey", retrieval.CODE, random.Random(seed)).lines:
            assert f"\n\n{line}\n" in text  # inserted after a line break: a blank line, the assignment, a line break


def test_evaluated_keys_and_values_are_never_trained_on():
    seen = {True: set(), False: set()}
    for seed in range(200):
        for heldout in (True, False):
            for task in retrieval.TASKS:
                for words in (retrieval.PAPER, retrieval.CODE):
                    text = retrieval.task_text(task, words, random.Random(seed), heldout=heldout)
                    items = set(text.answers) | set(
                        re.findall(r"\b[a-z]+[-_][a-z]+\b|\b\d{5,7}\b", " ".join(text.lines))
                    )
                    assert all(
                        retrieval.is_heldout(item if not item.isdigit() else int(item)) == heldout for item in items
                    )
                    seen[heldout] |= items
    assert seen[True] and seen[False] and not seen[True] & seen[False]
    share = sum(retrieval.is_heldout(value) for value in range(10000, 100000)) / 90000
    assert share == pytest.approx(retrieval.HELDOUT_SHARE, abs=0.01)


def test_samples_depend_only_on_their_cell_and_trial():
    tok = _byte_tokenizer()

    def prompt(*cell):
        return retrieval.build_sample(tok, "passkey", 400, 0.5, retrieval.sample_rng(*cell)).input_ids

    assert prompt(1, "passkey", 400, 0.5, 0) == prompt(1, "passkey", 400, 0.5, 0)
    assert prompt(1, "passkey", 400, 0.5, 0) != prompt(1, "passkey", 400, 0.5, 1) != prompt(2, "passkey", 400, 0.5, 1)


def test_scoring_follows_the_paper_for_the_passkey_and_ruler_for_the_rest():
    assert retrieval.score("passkey", " 17865. Remember", ["17865"]) == 1.0
    assert retrieval.score("passkey", " 00000 is 17865", ["17865"]) == 0.0  # the first integer decides
    assert retrieval.score("niah_multivalue", " 11, 33 and 44", ["11", "22", "33", "44"]) == 0.75
    assert retrieval.score("variable_tracking", "Amber-River, x", ["amber-river", "calm-desert"]) == 0.5
    assert retrieval.parse_first_integer("\u0661\u0662 then 7") == 7  # only ASCII digits count
    assert retrieval.parse_first_integer("no digits") is None


def _answering_generate(tok, correct: bool, samples: dict):
    """A generate that continues each prompt with its answer (or with a wrong one), as the model would."""

    def generate(input_ids, attention_mask=None, **kwargs):
        assert kwargs["do_sample"] is False and attention_mask is not None
        answer = samples[tuple(input_ids[0].tolist())]
        assert kwargs["max_new_tokens"] >= len(answer)
        new = answer if correct else tok(" 0", add_special_tokens=False)["input_ids"]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)

    return generate


@pytest.mark.parametrize("correct", [True, False])
def test_suite_scores_every_cell_of_every_task(model, tokenizer, monkeypatch, correct):
    samples = {}
    build = retrieval.build_sample

    def recording_build(*args, **kwargs):
        sample = build(*args, **kwargs)
        samples[tuple(sample.input_ids)] = sample.answer_ids
        return sample

    monkeypatch.setattr(retrieval, "build_sample", recording_build)
    monkeypatch.setattr(model, "generate", _answering_generate(tokenizer, correct, samples))
    tasks = ["passkey", "niah_single", "niah_multivalue", "variable_tracking"]
    documents = _code_documents(tokenizer)
    reports = retrieval.retrieval_suite(
        model, tokenizer, tasks, [300, 500], [0.0, 1.0], trials=2, words=retrieval.CODE, documents=documents
    )
    assert list(reports) == tasks
    for report in reports.values():
        assert [(cell.length, cell.depth) for cell in report.cells] == [(300, 0.0), (300, 1.0), (500, 0.0), (500, 1.0)]
        assert all(len(cell.trials) == 2 for cell in report.cells)
        assert report.accuracy_by_length() == {300: float(correct), 500: float(correct)}
        assert report.to_dict()["cells"][0]["trials"][0]["score"] == float(correct)


def test_a_grid_that_cannot_hold_a_task_fails_before_any_generation(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model, "generate", lambda *a, **k: pytest.fail("generated before checking the grid"))
    minimum = retrieval.minimum_length(tokenizer, "niah_multiquery", retrieval.PAPER)
    with pytest.raises(LongRopeError, match=rf"retrieval_lengths: \[400\] .*niah_multiquery, .*about {minimum}"):
        retrieval.retrieval_suite(model, tokenizer, ["passkey", "niah_multiquery"], [2000, 400], [0.5], trials=1)
    with pytest.raises(LongRopeError, match="retrieval_tasks: 'niah' is not a retrieval task"):
        retrieval.retrieval_suite(model, tokenizer, ["niah"], [2000], [0.5])
    with pytest.raises(LongRopeError, match="depth"):
        retrieval.build_sample(tokenizer, "passkey", 1000, 1.5, random.Random(0))
    with pytest.raises(LongRopeError, match="retrieval_haystack: the code template hides its needles in code"):
        retrieval.check_haystack("code", "filler")


def test_suite_runs_real_greedy_generation_deterministically(model, tokenizer):
    def run():
        return retrieval.retrieval_suite(model, tokenizer, ["passkey"], [320], [0.5], trials=2)["passkey"]

    first, again = run(), run()
    trials = first.cells[0].trials
    assert [trial.prompt_tokens for trial in trials] == [320, 320]
    assert all(
        trial.score == float(retrieval.parse_first_integer(trial.output) == int(trial.answers[0])) for trial in trials
    )
    assert [trial.output for trial in again.cells[0].trials] == [trial.output for trial in trials]


# ---------------------------------------------------------------------------------------------------------------
# Needle-driven perplexity
# ---------------------------------------------------------------------------------------------------------------


def test_needle_sample_layout(tokenizer):
    document = tokenizer(_text(400, seed=1), add_special_tokens=False)["input_ids"]
    sample = needle.build_needle_sample(tokenizer, document, 600, random.Random(3))
    key = re.search(r"numbers for (\S+) is", tokenizer.decode(sample.input_ids)).group(1)
    value = sample.answers[0]
    assert len(sample.with_answer) == 600 and sample.input_ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(sample.input_ids[1:])
    assert text.startswith(
        retrieval.NEEDLE_INTRO + "\n\n" + f"One of the special magic numbers for {key} is: {value}.\n"
    )
    assert text.endswith("\n" + retrieval.PAPER.question.format(key=key))
    assert tokenizer.decode(sample.answer_ids) == f" {value}" and len(sample.answer_ids) == 8
    # The document's first tokens follow the needle (LongRoPE2: the book from its start).
    start = sample.needle_positions[0] + len(
        tokenizer(f"\nOne of the special magic numbers for {key} is: {value}.\n", add_special_tokens=False)[
            "input_ids"
        ]
    )
    assert sample.input_ids[start : start + 50] == document[:50]


def test_needle_sample_in_the_code_template_with_a_merging_tokenizer():
    tok = _merging_tokenizer()
    document = tok(CODE_TEXT, add_special_tokens=False)["input_ids"]
    sample = needle.build_needle_sample(tok, document, 300, random.Random(2), words=retrieval.CODE)
    assert len(sample.with_answer) == 300
    assert tok.decode(sample.answer_ids).strip() == sample.answers[0]
    # The question restates the needle's assignment up to the value.
    prompt = tok.decode(sample.input_ids)
    question = re.search(r"\n([a-z]+_[a-z]+) =$", prompt)
    assert question and f"\n{question.group(1)} = {sample.answers[0]}\n" in prompt


def test_needle_nll_scores_exactly_the_answer_tokens(model, tokenizer):
    document = tokenizer(_text(300, seed=3), add_special_tokens=False)["input_ids"]
    sample = needle.build_needle_sample(tokenizer, document, 512, random.Random(5))
    result = needle.needle_sample_nll(model, sample, loss_chunk_size=3)
    reference, count = _reference_nll(model, torch.tensor(sample.with_answer), len(sample.input_ids))
    assert result.scored_tokens == count == 8
    assert result.nll_sum == pytest.approx(reference, rel=1e-5)


def test_needle_perplexity_report(model, tokenizer, monkeypatch):
    documents = [tokenizer(_text(300, seed=s), add_special_tokens=False)["input_ids"] for s in (4, 5)]
    report = needle.needle_perplexity(model, tokenizer, documents, [400, 640], seed=3, loss_chunk_size=4)
    expected = [needle.build_needle_sample(tokenizer, documents[i], 400, needle.needle_rng(3, i)) for i in (0, 1)]
    assert report.answers == [sample.answers[0] for sample in expected] and report.answers[0] != report.answers[1]
    for entry in report.per_length:
        assert [doc.scored_tokens for doc in entry.documents] == [8, 8]
        sample = needle.build_needle_sample(tokenizer, documents[1], entry.length, needle.needle_rng(3, 1))
        assert entry.documents[1].nll_sum == pytest.approx(needle.needle_sample_nll(model, sample).nll_sum, rel=1e-6)
        assert entry.ppl == pytest.approx(math.exp(entry.nll_sum / 16), rel=1e-9)
    seen = _record_backbone_inputs(model, monkeypatch)
    with pytest.raises(LongRopeError, match=r"niah_single length 50: .*use lengths >= "):
        needle.needle_perplexity(model, tokenizer, documents, [400, 50])
    with pytest.raises(LongRopeError, match=r"documents\[1\]: .*shorter"):
        needle.needle_perplexity(model, tokenizer, [documents[0] * 4, documents[1]], [3000])
    assert seen == []
