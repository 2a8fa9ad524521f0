"""Building the model a run uses, one way for every entry point: load or initialise, RoPE, LoRA, memory options.

:func:`prepare_model` is the only path from keys to a model object: train.py, its dry run and its memory estimate
all call it (the estimate on the meta device, the dry run on a shrunk architecture), so what they report describes
the model train.py trains. search.py and evaluate.py load through :func:`load_for_evaluation`. Every failure to
find or read a model or tokenizer is one line naming the key.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from typing import Any

from longrope.args import ExportArguments, ModelArguments
from longrope.cpu_features import warn_if_bf16_is_emulated
from longrope.errors import LongRopeError

# A hub repository id: "name" or "namespace/name", no path syntax.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve_attn_implementation(requested: str) -> str:
    """``auto`` becomes flash_attention_2 with CUDA and flash-attn installed, else sdpa; a kernel this machine cannot
    run falls back to sdpa with a warning. ``cpu_bf16`` is registered with transformers here (and compiled)."""
    import torch
    from transformers.utils import is_flash_attn_2_available

    if requested == "cpu_bf16":
        from longrope import cpu_attention

        reason = cpu_attention.unavailable_reason()
        if reason is not None:
            warnings.warn(f"attn_implementation: cpu_bf16 {reason}; falling back to sdpa", stacklevel=2)
            return "sdpa"
        cpu_attention.register()
        return requested

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


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: path syntax, or a hub-shaped name whose first part is a local folder."""
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or not _HUB_ID.match(name):
        return True
    return "/" in name and Path(name).parent.is_dir()


def check_model_source(name: str, key: str, needs: str = "config.json") -> None:
    """One-line errors for a model or tokenizer location that cannot be what ``key`` asks for, before transformers
    answers with a hub error about a path that was meant to be local."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LongRopeError(f"{key}: {name} is a file; give the model folder that holds it")
        if needs and not (path / needs).is_file():
            raise LongRopeError(f"{key}: {name} is a folder but not a model folder (no {needs}); check the path")
        return
    if _looks_local(name):
        raise LongRopeError(f"{key}: {name} does not exist; give a model folder (e.g. models/tiny) or a hub name")


def _load_error(key: str, name: str, error: BaseException) -> LongRopeError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return LongRopeError(f"{key}: cannot load '{name}' ({first}); check the path or hub name")


def load_tokenizer(name_or_path: str | None, key: str = "tokenizer_name_or_path") -> Any:
    from transformers import AutoTokenizer

    from longrope.data import require_bos_eos

    if name_or_path is None:
        raise LongRopeError(f"{key}: required; e.g. models/tiny")
    check_model_source(name_or_path, key, needs="")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise _load_error(key, name_or_path, error) from None
    require_bos_eos(tokenizer, key)
    return tokenizer


def load_config(model_args: ModelArguments) -> Any:
    """The checkpoint's config alone (no weights), for every check that needs the architecture before loading."""
    from transformers import AutoConfig

    name = model_args.model_name_or_path
    check_model_source(name, "model_name_or_path")
    try:
        return AutoConfig.from_pretrained(
            name, trust_remote_code=model_args.trust_remote_code, **(model_args.config_overrides or {})
        )
    except (OSError, ValueError) as error:
        raise _load_error("model_name_or_path", name, error) from None


def config_from_mapping(mapping: dict[str, Any], tokenizer: Any) -> Any:
    """A new model's config from ``model_config`` keys; vocab size and special tokens default to the tokenizer's."""
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
    if tokenizer is not None:
        values.setdefault("vocab_size", len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            values.setdefault(name, getattr(tokenizer, name))
    return AutoConfig.for_model(model_type, **values)


def new_model_config(model_args: ModelArguments, tokenizer: Any = None) -> Any:
    """The config of a model pretrained from scratch (``model_config``: a mapping or a config path)."""
    from transformers import AutoConfig

    if isinstance(model_args.model_config, dict):
        return config_from_mapping(model_args.model_config, tokenizer)
    if not Path(model_args.model_config).exists():
        raise LongRopeError(f"model_config: '{model_args.model_config}' is neither a mapping nor an existing path")
    return AutoConfig.from_pretrained(model_args.model_config)


def build_model(model_args: ModelArguments, tokenizer: Any = None, config: Any = None, **load_kwargs: Any) -> Any:
    """The model ``model_args`` describe: a loaded checkpoint, or a new one from ``model_config``; ``config`` builds a
    new model from that config instead (a dry run's shrunk architecture, the estimate's meta model).

    ``load_kwargs`` go to ``from_pretrained`` (e.g. ``device_map``, ``max_memory``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    attn_implementation = resolve_attn_implementation(model_args.attn_implementation)
    if model_args.dtype == "bfloat16" and not torch.cuda.is_available():
        warn_if_bf16_is_emulated("dtype")
    if config is None and model_args.model_name_or_path is not None:
        name = model_args.model_name_or_path
        check_model_source(name, "model_name_or_path")
        dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                name,
                dtype=dtype,
                attn_implementation=attn_implementation,
                trust_remote_code=model_args.trust_remote_code,
                **(model_args.config_overrides or {}),
                **load_kwargs,
            )
        except (OSError, ValueError) as error:
            raise _load_error("model_name_or_path", name, error) from None
    else:
        if config is None:
            if model_args.model_config is None:
                raise LongRopeError(
                    "model_name_or_path: required (a checkpoint folder or hub name), or set model_config"
                )
            config = new_model_config(model_args, tokenizer)
        dtype = torch.float32 if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if tokenizer is not None and model.config.vocab_size < len(tokenizer):
        raise LongRopeError(
            f"model_config.vocab_size: {model.config.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens"
        )
    return model


def prepare_model(
    model_args: ModelArguments,
    rope: Any = None,
    options: Any = None,
    export_args: ExportArguments | None = None,
    *,
    tokenizer: Any = None,
    config: Any = None,
) -> Any:
    """The model a training run trains: built (:func:`build_model`), its RoPE installed (``rope``: a
    ``ResolvedRope``; none keeps the checkpoint's own), then LoRA and TiledMLP from ``options`` (the training keys:
    ``lora_*``, ``tiled_mlp``, ``tiled_mlp_shards``).

    LoRA wraps the model with its RoPE installed, so the merged export keeps the rope config; TiledMLP wraps whatever
    MLP results. Under ``torch.device("meta")`` with a ``config`` it builds no weights (the memory estimate).
    """
    from longrope.rope_config import install_rope

    model = build_model(model_args, tokenizer, config=config)
    if rope is not None and rope.method != "none":
        install_rope(
            model,
            rope,
            allow_start_tokens=bool(export_args and export_args.allow_start_tokens),
            allow_shared_mscale=bool(export_args and export_args.allow_shared_mscale),
        )
    if options is not None and getattr(options, "lora_r", 0):
        from longrope.lora import apply_lora

        model = apply_lora(model, options)
    if options is not None and getattr(options, "tiled_mlp", False):
        from longrope.memory_options import enable_tiled_mlp

        enable_tiled_mlp(model, options.tiled_mlp_shards)
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
