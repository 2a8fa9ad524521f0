"""The committed tiny model (models/tiny): loads in stock transformers and is good at its training length."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from longrope import corpus, data

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny"
TRAINING_LENGTH = 256
MAX_PERPLEXITY_PER_BYTE = 4.0


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = TINY / "model.safetensors"
    assert weights.is_file(), f"{weights} is missing: pretrain it in three stages (data/tiny/README.md, Model)"
    model = AutoModelForCausalLM.from_pretrained(TINY, trust_remote_code=False).eval()
    return model, AutoTokenizer.from_pretrained(TINY)


def test_committed_model_is_a_small_stock_llama_at_256(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert config.max_position_embeddings == TRAINING_LENGTH
    assert config.head_dim == 64 and config.rope_parameters["rope_type"] == "default"
    assert config.vocab_size == len(tokenizer) == 259
    assert (config.bos_token_id, config.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (TINY / "model.safetensors").stat().st_size <= 20 * 2**20


def test_heldout_perplexity_at_the_training_length(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    windows = torch.from_numpy(data.heldout_windows(tokenizer, TRAINING_LENGTH, num_windows=64)).long()
    assert windows.shape == (64, TRAINING_LENGTH) and (windows[:, 0] == tokenizer.bos_token_id).all()
    assert (windows[:, 1:] != tokenizer.bos_token_id).all() and (windows[:, 1:] <= tokenizer.eos_token_id).all()
    with torch.no_grad():
        loss = model(input_ids=windows, labels=windows).loss.item()
    perplexity = math.exp(loss)
    assert perplexity <= MAX_PERPLEXITY_PER_BYTE, f"held-out perplexity {perplexity:.3f} per byte"
    # A model that learned nothing scores ~259; a broken position encoding lands far above the bound too. And it reads
    # its context: the same bytes in a shuffled order are far less predictable.
    shuffled = windows[:, torch.randperm(TRAINING_LENGTH - 1, generator=torch.Generator().manual_seed(0)) + 1]
    shuffled = torch.cat([windows[:, :1], shuffled], dim=1)
    with torch.no_grad():
        shuffled_perplexity = math.exp(model(input_ids=shuffled, labels=shuffled).loss.item())
    assert shuffled_perplexity > 3 * perplexity, (shuffled_perplexity, perplexity)


def test_heldout_windows_are_consecutive_slices_of_the_test_split():
    tokenizer = corpus.build_byte_tokenizer()
    windows = data.heldout_windows(tokenizer, 64, num_windows=None)
    stream: list[int] = []
    for document in corpus.stdlib_documents(splits=["test"]):
        stream += [*document.text.encode("utf-8"), tokenizer.eos_token_id]
    bodies = windows[:, 1:].reshape(-1).tolist()
    assert bodies == stream[: len(bodies)] and len(stream) - len(bodies) < 63
    assert (windows[:, 0] == tokenizer.bos_token_id).all()
    chosen = np.linspace(0, len(windows) - 1, 5).round().astype(int)
    assert data.heldout_windows(tokenizer, 64, num_windows=5).tolist() == windows[chosen].tolist()


def test_copy_probe_writes_one_string_twice_and_scores_each_occurrence(model_and_tokenizer):
    """benchmarks/tiny_model.py's copy probe: the same seeded string once in each half of a held-out window, and the
    loss on each occurrence matches a direct computation."""
    from benchmarks import tiny_model

    model, tokenizer = model_and_tokenizer
    windows = torch.from_numpy(data.heldout_windows(tokenizer, TRAINING_LENGTH, num_windows=tiny_model.COPY_WINDOWS))
    rows, starts = tiny_model.copy_windows(windows.long())
    again, same_starts = tiny_model.copy_windows(windows.long())
    assert torch.equal(rows, again) and starts == same_starts  # seeded
    length = tiny_model.COPY_CHARS
    strings = set()
    for row, (first, second) in zip(rows, starts):
        assert 0 < first and first + length <= TRAINING_LENGTH // 2 <= second <= TRAINING_LENGTH - length
        assert torch.equal(row[first : first + length], row[second : second + length])
        assert bytes(row[first : first + length].tolist()).decode().isalnum()
        strings.add(bytes(row[first : first + length].tolist()))
    assert len(strings) == len(rows)  # a new string per window
    losses = tiny_model.copy_losses(model, rows, starts)
    with torch.no_grad():
        logprobs = model(input_ids=rows[:1]).logits.log_softmax(-1)[0]
    first = starts[0][0]
    direct = -sum(logprobs[first + i - 1, rows[0, first + i]].item() for i in range(1, length))
    one_row = tiny_model.copy_losses(model, rows[:1], starts[:1])
    assert math.isclose(one_row["first"] * (length - 1), direct, rel_tol=1e-4)
    assert all(math.isfinite(value) and value > 0 for value in losses.values())


def test_committed_model_copies_and_retrieves_inside_its_window(model_and_tokenizer):
    """Issue 13: the committed model uses its context. A random string seen once costs it a fraction of its first
    occurrence the second time, and inside its window, with plain RoPE, it answers passkeys and single needles hidden
    in held-out code with keys it never trained on (configs/tiny/eval-retrieval-256.yaml is the full grid)."""
    from benchmarks import tiny_model
    from longrope import retrieval

    model, tokenizer = model_and_tokenizer
    windows = torch.from_numpy(data.heldout_windows(tokenizer, TRAINING_LENGTH, num_windows=16)).long()
    rows, starts = tiny_model.copy_windows(windows)
    losses = tiny_model.copy_losses(model, rows, starts)
    assert losses["second"] < 0.25 * losses["first"], losses

    texts = [document.text for document in corpus.stdlib_documents(splits=["test"])]
    documents = [retrieval.encode(tokenizer, text) for text in texts if len(text) >= 4096]
    reports = retrieval.retrieval_suite(
        model,
        tokenizer,
        ["passkey", "niah_single"],
        [160, 247],  # 247: an 8-token answer ends before position 255, where training rows hold </s>
        [0.0, 0.5, 1.0],
        trials=4,
        seed=13,
        words=retrieval.CODE,
        documents=documents,
    )
    accuracy = {task: report.accuracy_by_length() for task, report in reports.items()}
    assert all(value >= 0.9 for by_length in accuracy.values() for value in by_length.values()), accuracy
