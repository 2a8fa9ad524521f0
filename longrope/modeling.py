"""Loading models and tokenizers the same way in every script (attention kernel, dtype, devices, no remote code)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any

from longrope.args import ModelArguments
from longrope.data import require_bos_eos
from longrope.errors import LongRopeError


def resolve_attn_implementation(requested: str) -> str:
    """``auto`` becomes flash_attention_2 with CUDA and flash-attn installed, else sdpa; impossible asks are errors."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    flash_ready = torch.cuda.is_available() and is_flash_attn_2_available()
    if requested == "auto":
        return "flash_attention_2" if flash_ready else "sdpa"
    if requested == "flash_attention_2" and not flash_ready:
        warnings.warn(
            "attn_implementation: flash_attention_2 needs a CUDA device and flash-attn; falling back to sdpa",
            stacklevel=2,
        )
        return "sdpa"
    return requested


def load_tokenizer(name_or_path: str | None, key: str = "tokenizer_name_or_path") -> Any:
    from transformers import AutoTokenizer

    if name_or_path is None:
        raise LongRopeError(f"{key}: required; e.g. models/tiny")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise LongRopeError(f"{key}: cannot load '{name_or_path}' ({str(error).splitlines()[0]})") from None
    require_bos_eos(tokenizer, key)
    return tokenizer


def _config_from_mapping(mapping: dict[str, Any], tokenizer: Any) -> Any:
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    values = dict(mapping)
    model_type = values.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise LongRopeError(
            f"model_config.model_type: unknown architecture {model_type!r}; e.g. llama, mistral, qwen2"
        )
    config_class = CONFIG_MAPPING[model_type]
    known = set(config_class().to_dict()) | set(inspect.signature(config_class.__init__).parameters)
    for key in values:
        if key not in known:
            raise LongRopeError(f"model_config.{key}: not a {config_class.__name__} key; fix or remove it")
    values.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        values.setdefault(name, getattr(tokenizer, name))
    return AutoConfig.for_model(model_type, **values)


def build_model(model_args: ModelArguments, tokenizer: Any = None, **load_kwargs: Any) -> Any:
    """A new model from ``model_config`` or a loaded checkpoint, with the attention kernel and dtype resolved.

    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``device_map``, ``max_memory``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    attn_implementation = resolve_attn_implementation(model_args.attn_implementation)
    if model_args.model_name_or_path is not None:
        dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_args.model_name_or_path,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=model_args.trust_remote_code,
                **(model_args.config_overrides or {}),
                **load_kwargs,
            )
        except OSError as error:
            raise LongRopeError(
                f"model_name_or_path: cannot load '{model_args.model_name_or_path}' ({str(error).splitlines()[0]})"
            ) from None
    else:
        if model_args.model_config is None:
            raise LongRopeError("model_name_or_path: required (a checkpoint folder or hub name), or set model_config")
        if isinstance(model_args.model_config, dict):
            config = _config_from_mapping(model_args.model_config, tokenizer)
        else:
            if not Path(model_args.model_config).exists():
                raise LongRopeError(
                    f"model_config: '{model_args.model_config}' is neither a mapping nor an existing path"
                )
            config = AutoConfig.from_pretrained(model_args.model_config)
        dtype = torch.float32 if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if tokenizer is not None and model.config.vocab_size < len(tokenizer):
        raise LongRopeError(
            f"model_config.vocab_size: {model.config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    return model


def load_for_evaluation(model_args: ModelArguments, gpus_per_process: int = 1) -> Any:
    """A checkpoint in eval mode on this process's device(s).

    ``gpus_per_process > 1`` spreads one model over that many GPUs (``device_map="auto"`` restricted to this
    process's group), for models too large for one device: one evaluator per group of GPUs.
    """
    import torch

    from longrope.distributed import device_for_rank, local_rank

    if torch.cuda.is_available() and gpus_per_process > 1:
        first = local_rank() * gpus_per_process
        total = torch.cuda.device_count()
        if first + gpus_per_process > total:
            raise LongRopeError(
                f"gpus_per_process: {gpus_per_process} GPUs per process x {local_rank() + 1} processes need "
                f"{first + gpus_per_process} GPUs, only {total} visible; launch fewer processes"
            )
        max_memory = {index: torch.cuda.get_device_properties(index).total_memory for index in range(total)}
        max_memory = {k: (v if first <= k < first + gpus_per_process else 0) for k, v in max_memory.items()}
        model = build_model(model_args, device_map="auto", max_memory=max_memory)
    else:
        model = build_model(model_args).to(device_for_rank())
    return model.eval()
