"""Shared fixtures: tiny random configs of every supported architecture, built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The files with the most CPU time (the CI-sized demo, the multi-process training runs), first under xdist, longest
# first: a file is one work unit there, the first two go one to each worker, and the longest one started last would
# leave the other worker idle while it finishes.
LONGEST_FIRST = ("test_pipeline.py", "test_train_scale.py", "test_search.py", "test_evaluate.py")

ORIGINAL_LENGTH = 64

# Small enough for milliseconds per forward, large enough for 16 frequency pairs (head_dim 32).
_COMMON = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=ORIGINAL_LENGTH,
    attn_implementation="eager",
)


def tiny_config(
    arch: str = "llama", rope_parameters: dict | None = None, max_position_embeddings: int | None = None, **overrides
):
    """The one tiny-model factory of the test suite: a tiny config of ``arch`` (``overrides`` change any key, e.g.
    the vocabulary of a tokenizer); ``rope_parameters`` merges into the default (theta 10000)."""
    import transformers

    rope = {"rope_type": "default", "rope_theta": 10000.0}
    kwargs = dict(_COMMON)
    if max_position_embeddings is not None:
        kwargs["max_position_embeddings"] = max_position_embeddings
    if arch == "llama":
        cls = transformers.LlamaConfig
    elif arch == "mistral":
        cls = transformers.MistralConfig
        kwargs["sliding_window"] = None
    elif arch == "qwen2":
        cls = transformers.Qwen2Config
    elif arch == "qwen3":
        cls = transformers.Qwen3Config
        kwargs["head_dim"] = 32
    elif arch == "phi3":
        cls = transformers.Phi3Config
        kwargs.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
        # Phi-3 keeps its pre-training window in a top-level key that wins over rope_parameters.
        kwargs["original_max_position_embeddings"] = ORIGINAL_LENGTH
        rope["partial_rotary_factor"] = 0.5  # Phi-4-mini style: only part of each head rotates
    elif arch == "gpt_neox":
        cls = transformers.GPTNeoXConfig
        kwargs.pop("num_key_value_heads")
        rope["partial_rotary_factor"] = 0.5
    else:
        raise ValueError(arch)
    rope.update(rope_parameters or {})
    kwargs["rope_parameters"] = rope
    kwargs.update(overrides)
    return cls(**kwargs)


def tiny_model(arch: str = "llama", seed: int = 0, **config_kwargs):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs))
    return model.eval()


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gpt_neox"]
# Stock Phi-3 configs accept only rope_type longrope, so baselines are compared on the others (GPT-NeoX covers
# partial rotary there).
BASELINE_ARCHITECTURES = [a for a in ARCHITECTURES if a != "phi3"]


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


def user_error(capsys, call, *args, **kwargs) -> str:
    """Run an entry point's ``main`` that must refuse its input: exit status 2 and exactly one stderr line, returned."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as refused:
        call(*args, **kwargs)
    assert refused.value.code == 2, f"expected exit status 2, got {refused.value.code!r}"
    lines = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert len(lines) == 1, f"expected one error line, got {lines!r}"
    return lines[0]


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: skipped with a reason on CPU machines, where their CPU twin runs instead. Under xdist
    the files of LONGEST_FIRST come first (make test keeps this order: --no-loadscope-reorder)."""
    if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
        rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; its CPU twin covers the same code path")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_WORLD_ORIGINAL = 64
TINY_WORLD_TARGET = 4 * TINY_WORLD_ORIGINAL


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A saved tiny Llama with the byte tokenizer (window 64) under ``model``, four long documents of stdlib source
    under ``docs`` (prepared documents) and eight 256-token training rows under ``rows`` (prepared packed data)."""
    import datasets
    import transformers

    from longrope.corpus import build_byte_tokenizer, stdlib_documents
    from longrope.data import save_dataset_atomically

    root = tmp_path_factory.mktemp("tiny_world")
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer),
        head_dim=32,
        max_position_embeddings=TINY_WORLD_ORIGINAL,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    length = TINY_WORLD_TARGET
    texts = [d.text for d in stdlib_documents(max_files=40) if len(d.text) > 2 * length][:4]
    docs = [tokenizer(text)["input_ids"][: 2 * length] for text in texts]
    documents = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": docs})})
    save_dataset_atomically(documents, root / "docs", {})
    rows = [ids[:length] for ids in docs] * 2
    packed = {"input_ids": rows, "position_ids": [list(range(length))] * len(rows)}
    save_dataset_atomically(datasets.DatasetDict({"train": datasets.Dataset.from_dict(packed)}), root / "rows", {})
    return root
