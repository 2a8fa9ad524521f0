"""LoRA fine-tuning through PEFT: adapters, the modules trained in full beside them, and the merged export.

The fully trained modules (``lora_trainable_modules``: embeddings and norms by default, LongLoRA's finding for long
context) are unfrozen in place; their weights are saved beside PEFT's adapter files in every checkpoint
(``LORA_TRAINABLE_FILE_NAME``), and output_dir receives the merged model, which stock transformers loads.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from longrope.errors import LongRopeError

DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TRAINABLE_MODULES = ("embed_tokens", "norm")
LORA_TRAINABLE_FILE_NAME = "lora_trainable_modules.safetensors"


def apply_lora(model: Any, args: Any) -> Any:
    """``model`` wrapped by PEFT LoRA on ``lora_target_modules``, with ``lora_trainable_modules`` trained in full.

    The fully trained parameters are unfrozen in place (requires_grad on matching names, as LongLoRA does) rather than
    through PEFT's ``modules_to_save``: that one deep-copies each module, which doubles the embedding and copies
    parameters ZeRO-3 has already partitioned at load time; in place, ZeRO-3 shards and optimizes them like any
    other parameter.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha if args.lora_alpha is not None else 2 * args.lora_r,
        lora_dropout=args.lora_dropout,
        target_modules=list(args.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise LongRopeError(f"lora_target_modules: {str(error).splitlines()[0]}") from None
    names = [name for name, _ in peft_model.named_parameters()]
    for pattern in args.lora_trainable_modules:
        if not any(pattern in name and "lora_" not in name for name in names):
            raise LongRopeError(
                f"lora_trainable_modules: no parameter name contains {pattern!r}; e.g. embed_tokens, norm, lm_head"
            )
    for name, parameter in peft_model.named_parameters():
        if "lora_" not in name and any(pattern in name for pattern in args.lora_trainable_modules):
            parameter.requires_grad_(True)
    if args.activation_checkpointing and not any(
        p.requires_grad for p in peft_model.get_input_embeddings().parameters()
    ):
        # Frozen embeddings give the checkpointed layers inputs without grad; the adapters inside would get none.
        peft_model.enable_input_require_grads()
    return peft_model


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_extra_trainable_names(model: Any) -> list[str]:
    """Names of the trainable parameters PEFT's adapter files do not hold (lora_trainable_modules)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]


@contextlib.contextmanager
def zero3_init_disabled(hf_deepspeed_config: Any = None) -> Any:
    """Build a model in full on this process even though the run's DeepSpeed config is ZeRO-3 (zero.Init off).

    ``hf_deepspeed_config`` (``TrainingArguments.hf_deepspeed_config``) is registered again afterwards.
    """
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if hf_deepspeed_config is not None:
            set_hf_deepspeed_config(hf_deepspeed_config)


def trainable_state_dict(trainer: Any) -> dict[str, Any]:
    """Every trainable parameter in full (the LoRA adapters and lora_trainable_modules), on CPU.

    Under ZeRO-3 a collective on every rank, one gathered parameter at a time (the result is only filled on the
    saving rank); the frozen weights are left out: they equal the checkpoint the run started from.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not (trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3):
        return {name: p.detach().cpu() for name, p in trained}
    import deepspeed

    gathered = {}
    for name, parameter in trained:
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=None):
            if trainer.args.should_save:
                gathered[name] = parameter.detach().cpu().clone()
    return gathered


def save_merged_lora(trainer: Any, model_args: Any, output_dir: str | os.PathLike) -> None:
    """Save the LoRA run as one stock transformers model: the adapters merged into the starting checkpoint's weights,
    the fully trained modules replaced, the run's config (rope included). Call on every rank (ZeRO-3 gathers).

    Rank 0 reloads the starting checkpoint on CPU (the frozen weights never changed), wraps it with the same PEFT
    config, loads the trained parameters and lets PEFT merge: one extra model copy in CPU memory, no GPU memory.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    trained = trainable_state_dict(trainer)
    if not trainer.args.should_save:
        return
    peft_model = trainer.accelerator.unwrap_model(trainer.model)
    config = type(peft_model.get_base_model().config).from_dict(peft_model.get_base_model().config.to_dict())
    config.use_cache = True
    dtype = "auto" if model_args.dtype == "auto" else getattr(torch, model_args.dtype)
    with zero3_init_disabled(getattr(trainer.args, "hf_deepspeed_config", None)):
        base = AutoModelForCausalLM.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            dtype=dtype,
            trust_remote_code=model_args.trust_remote_code,
        )
    rebuilt = get_peft_model(base, peft_model.peft_config[peft_model.active_adapter])
    result = rebuilt.load_state_dict(trained, strict=False)
    if result.unexpected_keys:
        raise LongRopeError(f"lora: trained parameters {result.unexpected_keys[:3]} do not fit the rebuilt model")
    merged = rebuilt.merge_and_unload()
    merged.config = config
    merged.save_pretrained(str(output_dir))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(output_dir))
