"""The architectures of the models the shipped recipes fine-tune, offline, and their shrunk dry-run versions.

A dry run (train.py --dry_run) and the memory estimate (--estimate_memory) need a recipe's architecture without a
hub: the architecture keys of its model come from a local config.json, or from ARCHITECTURES (the published
config.json of each hub model the recipes name).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from longrope.errors import LongRopeError

# Architecture keys of the models the shipped recipes fine-tune (and of the ~1B model the GPU check trains), so a dry
# run builds them offline and the memory estimate sizes them (from the models' published config.json). A dry run keeps heads, head_dim and rope settings
# real and shrinks the rest (dry_run_config).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    # Not fine-tuned by a shipped recipe: the ~1B shape of benchmarks/gpu_check.py (numerics and training on one
    # GPU). Its published rope_scaling (llama3) keeps the 8k pre-training window as original_max_position_embeddings.
    "meta-llama/Llama-3.2-1B": {
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "vocab_size": 128256,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    },
    # The real model every machine has (configs/smollm2-135m): its local copy is converted from a GGUF file a pip
    # package ships, so a fresh clone dry-runs its recipe before the conversion has been run.
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "vocab_size": 49152,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
    },
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "vocab_size": 32000,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "vocab_size": 128256,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
    },
}


def architecture_values(
    model_name_or_path: str | None, fallback: str | None = None, overrides: dict | None = None
) -> dict[str, Any]:
    """The config keys of ``model_name_or_path``: its local config.json, else its entry in ARCHITECTURES, else
    ``fallback``'s (dry_run_architecture: the checkpoint a later stage starts from does not exist yet)."""
    for name in (model_name_or_path, fallback):
        if not name:
            continue
        local = Path(name) / "config.json"
        if local.is_file():
            values = json.loads(local.read_text())
            break
        if name in ARCHITECTURES:
            values = dict(ARCHITECTURES[name])
            break
    else:
        raise LongRopeError(
            f"model_name_or_path: no architecture known offline for {model_name_or_path!r}; use a local folder with "
            f"config.json, one of {', '.join(ARCHITECTURES)}, or set dry_run_architecture"
        )
    values.update(overrides or {})
    for key in ("torch_dtype", "dtype", "architectures", "transformers_version"):
        values.pop(key, None)
    return values


def architecture_config(
    model_name_or_path: str | None, fallback: str | None = None, overrides: dict | None = None
) -> Any:
    """The full-size transformers config of an architecture (see :func:`architecture_values`)."""
    from transformers import AutoConfig

    values = architecture_values(model_name_or_path, fallback, overrides)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def dry_run_config(model_name_or_path: str | None, fallback: str | None = None, overrides: dict | None = None) -> Any:
    """The architecture shrunk to 2 layers, a hidden size of about 64 and a 512-token vocabulary, with its real heads,
    head_dim and RoPE: what a dry run builds with random weights."""
    from transformers import AutoConfig

    values = architecture_values(model_name_or_path, fallback, overrides)
    heads = values["num_attention_heads"]
    values.setdefault("head_dim", values.get("hidden_size", 0) // heads or 64)
    values.update(
        # transformers requires the hidden size to be a multiple of the heads (9 for SmolLM2)
        hidden_size=-(-64 // heads) * heads,
        intermediate_size=128,
        num_hidden_layers=2,
        vocab_size=512,
        tie_word_embeddings=False,
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        values.pop(key, None)
    return AutoConfig.for_model(values.pop("model_type"), **values)
