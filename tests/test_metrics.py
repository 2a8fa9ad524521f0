"""Tests for longrope.perplexity, longrope.passkey and longrope.needle: chunked perplexity, sliding windows, BOS, passkey and needle perplexity.

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

from longrope import needle, passkey, perplexity
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
    corpus = [passkey.PASSKEY_INTRO, passkey.PASSKEY_FILLER * 20, passkey.PASSKEY_NEEDLE, passkey.PASSKEY_QUESTION]
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
# Passkey
# ---------------------------------------------------------------------------------------------------------------


def _longest_filler_word_tokens(tok) -> int:
    return max(len(tok(" " + word, add_special_tokens=False)["input_ids"]) for word in passkey.PASSKEY_FILLER.split())


def test_prompts_start_as_the_tokenizer_starts_a_text():
    adds_bos = _byte_tokenizer()
    plain = _byte_tokenizer()
    plain.backend_tokenizer.post_processor = None  # like SmolLM2's: BOS is a chat-turn marker, never prepended
    bos = adds_bos.bos_token_id
    assert passkey.bos_prefix(adds_bos) == [bos] and passkey.bos_prefix(plain) == []
    assert passkey.bos_prefix(plain, True) == [bos] and passkey.bos_prefix(adds_bos, False) == []
    with_bos = passkey.build_passkey_prompt(adds_bos, 400, 0.5, 17865)
    without = passkey.build_passkey_prompt(plain, 400, 0.5, 17865)
    assert with_bos.input_ids[0] == bos and without.input_ids[0] != bos
    assert without.input_ids == plain(without.text)["input_ids"]  # exactly what the model reads for that text
    assert passkey.passkey_min_length(adds_bos) == passkey.passkey_min_length(plain) + 1
    sample = needle.build_needle_sample(plain, list(range(30, 130)) * 6, 500, key="alpha", value=42)
    assert bos not in sample.input_ids


@pytest.mark.parametrize("tokenizer_kind", ["bytes", "bpe"])
@pytest.mark.parametrize("length", [300, 1000, 2500])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_fits_length_and_places_key_at_depth(tokenizer_kind, length, depth):
    tok = _byte_tokenizer() if tokenizer_kind == "bytes" else _merging_tokenizer()
    prompt = passkey.build_passkey_prompt(tok, length, depth, 17865)
    # Filler is added one word at a time, so the prompt is short by less than one word (+1 for a merge at the seam).
    tolerance = _longest_filler_word_tokens(tok) + 1
    assert length - tolerance <= len(prompt.input_ids) <= length
    assert prompt.input_ids[0] == tok.bos_token_id
    assert prompt.input_ids == [tok.bos_token_id] + tok(prompt.text, add_special_tokens=False)["input_ids"]
    assert prompt.text.startswith(passkey.PASSKEY_INTRO)
    assert prompt.text.endswith(passkey.PASSKEY_QUESTION)
    needle_line = "The pass key is 17865. Remember it. 17865 is the pass key."
    assert prompt.text.count(needle_line) == 1
    needle_ids = tok(needle_line, add_special_tokens=False)["input_ids"]
    assert prompt.input_ids[prompt.needle_position : prompt.needle_position + len(needle_ids)] == needle_ids
    intro_tokens = 1 + len(tok(passkey.PASSKEY_INTRO + "\n", add_special_tokens=False)["input_ids"])
    filler_tokens = len(prompt.input_ids) - passkey.passkey_min_length(tok, 17865)
    filler_before = prompt.needle_position - intro_tokens
    assert filler_before / filler_tokens == pytest.approx(depth, abs=0.05)


def test_parse_first_integer():
    assert passkey.parse_first_integer(" 17865. Remember") == 17865
    assert passkey.parse_first_integer("is 42 and 17") == 42
    assert passkey.parse_first_integer("key: 007") == 7
    assert passkey.parse_first_integer("no digits here") is None
    assert passkey.parse_first_integer("\u0661\u0662 then 7") == 7  # only ASCII digits count


def _fake_generate(tok, answer_for):
    def generate(input_ids, attention_mask=None, **kwargs):
        assert kwargs["do_sample"] is False and kwargs["max_new_tokens"] >= 6
        assert attention_mask is not None and attention_mask.shape == input_ids.shape
        key = re.search(r"The pass key is (\d+)\.", tok.decode(input_ids[0].tolist())).group(1)
        new = tok(answer_for(key), add_special_tokens=False)["input_ids"]
        return torch.cat([input_ids, torch.tensor([new])], dim=1)

    return generate


@pytest.mark.parametrize(
    ("answer_for", "expected"),
    [
        (lambda key: f" {key}. Remember it.", 1.0),
        (lambda key: "I do not know.", 0.0),
        (lambda key: " 00000 is the key", 0.0),
        (lambda key: f"s {int(key) + 1}", 0.0),
    ],
)
def test_passkey_accuracy_with_stub_generation(model, tokenizer, monkeypatch, answer_for, expected):
    monkeypatch.setattr(model, "generate", _fake_generate(tokenizer, answer_for))
    report = passkey.passkey_retrieval(model, tokenizer, [400, 800], [0.0, 0.5, 1.0], trials=3, seed=5)
    assert len(report.cells) == 6 and all(len(cell.trials) == 3 for cell in report.cells)
    assert report.accuracy == expected
    assert all(cell.accuracy == expected for cell in report.cells)
    assert report.accuracy_by_length() == {400: expected, 800: expected}
    keys = [trial.key for cell in report.cells for trial in cell.trials]
    assert all(10000 <= key <= 99999 for key in keys) and len(set(keys)) > 1


def test_passkey_keys_are_seeded(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model, "generate", _fake_generate(tokenizer, lambda key: f" {key}"))
    first = passkey.passkey_retrieval(model, tokenizer, [400], [0.5], trials=4, seed=1)
    again = passkey.passkey_retrieval(model, tokenizer, [400], [0.5], trials=4, seed=1)
    other = passkey.passkey_retrieval(model, tokenizer, [400], [0.5], trials=4, seed=2)
    keys = [[trial.key for trial in report.cells[0].trials] for report in (first, again, other)]
    assert keys[0] == keys[1] != keys[2]


def test_passkey_grid_too_small_raises_with_minimum(model, tokenizer, monkeypatch):
    monkeypatch.setattr(model, "generate", _fake_generate(tokenizer, lambda key: key))
    minimum = passkey.passkey_min_length(tokenizer)
    with pytest.raises(LongRopeError, match=rf"passkey length 100: .*at least {minimum}"):
        passkey.passkey_retrieval(model, tokenizer, [1000, 100], [0.5], trials=1)
    with pytest.raises(LongRopeError, match="depth"):
        passkey.build_passkey_prompt(tokenizer, 1000, 1.5, 12345)
    assert passkey.build_passkey_prompt(tokenizer, minimum, 0.5, 99999).filler_words == 0


def test_passkey_runs_real_greedy_generation(model, tokenizer):
    report = passkey.passkey_retrieval(model, tokenizer, [320], [0.5], trials=2, max_new_tokens=4)
    trials = report.cells[0].trials
    assert len(trials) == 2
    for trial in trials:
        assert 310 <= trial.prompt_tokens <= 320
        assert trial.answer == passkey.parse_first_integer(trial.answer_text)
    # Greedy decoding is deterministic: the same grid gives the same continuations.
    again = passkey.passkey_retrieval(model, tokenizer, [320], [0.5], trials=2, max_new_tokens=4)
    assert [t.answer_text for t in again.cells[0].trials] == [t.answer_text for t in trials]


# ---------------------------------------------------------------------------------------------------------------
# Needle-driven perplexity
# ---------------------------------------------------------------------------------------------------------------


def test_needle_sample_layout(tokenizer):
    document = tokenizer(_text(400, seed=1), add_special_tokens=False)["input_ids"]
    sample = needle.build_needle_sample(tokenizer, document, 600, key="quiet-river", value=6716097)
    assert len(sample.input_ids) == 600
    assert sample.input_ids[0] == tokenizer.bos_token_id
    text = tokenizer.decode(sample.input_ids[1:])
    needle_line = "One of the special magic numbers for quiet-river is: 6716097."
    assert text.startswith(needle.NEEDLE_INTRO + "\n" + needle_line + "\n")
    question = needle.NEEDLE_QUESTION.format(key="quiet-river")
    assert text.endswith("\n" + question + " 6716097")
    assert tokenizer.decode(sample.input_ids[sample.answer_start :]) == " 6716097"
    assert sample.answer_tokens == 8
    tail_tokens = len(tokenizer("\n" + question + " 6716097", add_special_tokens=False)["input_ids"])
    document_end = 600 - tail_tokens
    assert sample.input_ids[document_end - sample.document_tokens : document_end] == document[: sample.document_tokens]


def test_needle_answer_split_with_merging_tokenizer():
    tok = _merging_tokenizer()
    document = tok(_text(300, seed=2), add_special_tokens=False)["input_ids"]
    sample = needle.build_needle_sample(tok, document, 300, key="amber-kettle", value=1234567)
    assert len(sample.input_ids) == 300
    assert tok.decode(sample.input_ids[sample.answer_start :]).strip() == "1234567"


def test_needle_nll_scores_exactly_the_answer_tokens(model, tokenizer):
    document = tokenizer(_text(300, seed=3), add_special_tokens=False)["input_ids"]
    sample = needle.build_needle_sample(tokenizer, document, 512, key="odd-violin", value=9081726)
    result = needle.needle_sample_nll(model, sample, loss_chunk_size=3)
    ids = torch.tensor(sample.input_ids)
    reference, count = _reference_nll(model, ids, sample.answer_start)
    assert result.scored_tokens == count == 8
    assert result.nll_sum == pytest.approx(reference, rel=1e-5)


def test_needle_perplexity_report(model, tokenizer, monkeypatch):
    documents = [tokenizer(_text(300, seed=s), add_special_tokens=False)["input_ids"] for s in (4, 5)]
    report = needle.needle_perplexity(model, tokenizer, documents, [400, 640], seed=3, loss_chunk_size=4)
    assert report.samples == [needle.needle_key_value(3, 0), needle.needle_key_value(3, 1)]
    assert report.samples[0] != report.samples[1]
    for entry in report.per_length:
        assert [doc.scored_tokens for doc in entry.documents] == [8, 8]
        key, value = report.samples[1]
        sample = needle.build_needle_sample(tokenizer, documents[1], entry.length, key=key, value=value)
        assert entry.documents[1].nll_sum == pytest.approx(needle.needle_sample_nll(model, sample).nll_sum, rel=1e-6)
        assert entry.ppl == pytest.approx(math.exp(entry.nll_sum / 16), rel=1e-9)
    seen = _record_backbone_inputs(model, monkeypatch)
    with pytest.raises(LongRopeError, match=r"needle length 50: .*use lengths >= "):
        needle.needle_perplexity(model, tokenizer, documents, [400, 50])
    with pytest.raises(LongRopeError, match=r"documents\[1\]: .*shorter"):
        needle.needle_perplexity(model, tokenizer, [documents[0] * 4, documents[1]], [3000])
    assert seen == []


def test_long_passkey_prompt_needs_few_tokenizations(monkeypatch):
    tok = _merging_tokenizer()
    calls = []
    encode = passkey.encode
    monkeypatch.setattr(passkey, "encode", lambda t, text: calls.append(len(text)) or encode(t, text))
    prompt = passkey.build_passkey_prompt(tok, 20000, 0.5, 24680)
    assert 20000 - _longest_filler_word_tokens(tok) - 1 <= len(prompt.input_ids) <= 20000
    # A linear estimate plus a bracketed bisection, not a bisection over [0, length].
    assert len(calls) <= 30
