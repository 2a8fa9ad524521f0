"""train.py's own keys: transformers' TrainingArguments plus those of long-context fine-tuning.

``LongRopeTrainingArguments`` is transformers' ``TrainingArguments`` (hyper-parameters, DeepSpeed, output_dir,
report_to, ...) with the shared ``sp_size`` and ``loss_chunk_size`` groups of :mod:`longrope.args` and the keys only
train.py reads (LoRA, memory options, dry run, memory estimate). The RoPE keys are the shared
:class:`longrope.args.RopeArguments`. Parsing has no side effects of this project's own: the gloo process group a
multi-process CPU DeepSpeed run needs is created where train.py starts (:func:`longrope.distributed.init_cpu_deepspeed`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainingArguments

from longrope import distributed
from longrope.args import LossArguments, SequenceParallelArguments, require_positive_int
from longrope.cpu_features import warn_if_bf16_is_emulated
from longrope.errors import LongRopeError
from longrope.lora import DEFAULT_LORA_TARGET_MODULES, DEFAULT_LORA_TRAINABLE_MODULES


@dataclass
class LongRopeTrainingArguments(SequenceParallelArguments, LossArguments, TrainingArguments):
    """transformers' TrainingArguments plus the keys of long-context fine-tuning (one definition per key)."""

    mixed_context_windows: bool = field(
        default=False,
        metadata={
            "help": "LongRoPE2 mixed context window training: sequences within the original window (by their "
            "largest position id; prepare with position_ids: document) use the original RoPE (short factors 1.0), "
            "longer ones the long factors. The saved config keeps short factors 1.0, as LongRoPE2 infers."
        },
    )
    peak_flops: float | None = field(
        default=None,
        metadata={
            "help": "Peak FLOP/s of one device for the MFU estimate (default: a small table of known GPUs; none on "
            "CPU)."
        },
    )
    dry_run_architecture: str | None = field(
        default=None,
        metadata={
            "help": "Hub name whose architecture a dry run builds when model_name_or_path is a checkpoint that does "
            "not exist yet (e.g. the 128k fine-tune a 256k stage starts from); one of longrope.architectures.ARCHITECTURES."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Build the configured architecture shrunk to 2 tiny layers with random weights, install the RoPE "
            "and run one step on random tokens: checks a recipe without weights, data or GPUs."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={
            "help": "LoRA rank (PEFT); 0 trains every weight. With LoRA only the adapters and lora_trainable_modules "
            "train, and output_dir receives the merged model (stock transformers, rope config kept)."
        },
    )
    lora_alpha: float | None = field(default=None, metadata={"help": "LoRA scaling alpha (default: 2 x lora_r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGET_MODULES),
        metadata={"help": "Module names that get LoRA adapters (default: the attention and MLP projections)."},
    )
    lora_trainable_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TRAINABLE_MODULES),
        metadata={
            "help": "Parameters trained in full beside the adapters: every parameter whose name contains one of "
            "these (default: embeddings and norms, LongLoRA's finding for long context); [] for adapters only."
        },
    )
    tiled_mlp: bool = field(
        default=False,
        metadata={
            "help": "DeepSpeed ALST TiledMLP: each MLP runs over tiled_mlp_shards slices of the sequence and is "
            "recomputed slice by slice in backward, so its intermediate activations exist for one slice at a time."
        },
    )
    tiled_mlp_shards: int | None = field(
        default=None,
        metadata={"help": "Slices per MLP call for tiled_mlp (default: ceil(local sequence length / hidden size))."},
    )
    offload_activations: bool = field(
        default=False,
        metadata={
            "help": "Move the activation-checkpointed hidden states (one per decoder layer) to CPU memory until "
            "backward needs them (DeepSpeed's checkpoint offload; needs activation_checkpointing; no-op on CPU)."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate on the first this many rows of the validation split (default: all of it), as in "
            "transformers' run_clm example."
        },
    )
    estimate_memory: bool = field(
        default=False,
        metadata={
            "help": "Print the per-GPU memory estimate of this config (from the model config only: ZeRO-3 states, "
            "activations at the local sequence length, logits, overhead) and exit without training."
        },
    )
    estimate_world_size: int | None = field(
        default=None,
        metadata={"help": "GPUs to estimate for (default: the launch's WORLD_SIZE, else sp_size)."},
    )
    estimate_seq_len: int | None = field(
        default=None,
        metadata={
            "help": "Sequence length to estimate for (default: max_seq_len, else target_length, else the prepared "
            "dataset's row length)."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.sp_size, int) and not isinstance(self.sp_size, bool) and self.sp_size > 1:
            if self.parallelism_config is not None:
                raise LongRopeError("sp_size: set either sp_size or parallelism_config, not both")
            from accelerate.parallelism_config import ParallelismConfig
            from accelerate.utils import DeepSpeedSequenceParallelConfig

            self.parallelism_config = ParallelismConfig(
                sp_backend="deepspeed",
                sp_size=self.sp_size,
                sp_handler=DeepSpeedSequenceParallelConfig(sp_attn_implementation="sdpa"),
            )
            self.deepspeed_config_path = self.deepspeed if isinstance(self.deepspeed, str) else None
            if self.deepspeed_config_path is not None:
                self.deepspeed = read_deepspeed_config(self.deepspeed_config_path)
            if isinstance(self.deepspeed, dict):
                # ZeRO-3's zero.Init (model loading) builds a DeepSpeed config before the SP groups exist; this key
                # tells it the data-parallel size is world / sp_size, or its batch-size check fails.
                # Transformers would fill train_batch_size as world x micro x accumulation, which counts the SP ranks
                # as data-parallel; without the key DeepSpeed derives it from its data-parallel size.
                self.deepspeed = {
                    **{k: v for k, v in self.deepspeed.items() if k != "train_batch_size"},
                    "sequence_parallel_size": self.sp_size,
                }
        self.half_precision_requested = bool(self.bf16 or self.fp16)  # what a memory estimate sizes for
        if self.dry_run or self.estimate_memory:
            import torch

            if not torch.cuda.is_available():
                # A dry run checks the recipe, not the precision; CPUs refuse the bf16/fp16 a GPU recipe sets.
                self.bf16 = self.fp16 = False
        if self.max_eval_samples is not None and (
            isinstance(self.max_eval_samples, bool)
            or not isinstance(self.max_eval_samples, int)
            or self.max_eval_samples < 1
        ):
            raise LongRopeError(
                f"max_eval_samples: {self.max_eval_samples!r} must be an integer >= 1; drop it to evaluate every row"
            )
        self._check_memory_keys()
        if self.bf16 and not self.use_cpu and not _accelerator_available():
            # transformers refuses bf16 without a GPU unless use_cpu is set; a GPU recipe's bf16: true then runs
            # under the CPU's bf16 autocast, which is what this machine's CPU has (avx512_bf16 / AMX).
            self.use_cpu = True
        if self.bf16 and self.use_cpu:
            warn_if_bf16_is_emulated("bf16")
        if self.deepspeed and distributed.cpu_deepspeed_state_ready():
            # Reuse the gloo state train.py created at start (without it every CPU rank would train alone).
            if self.accelerator_config is None:
                self.accelerator_config = {}
            if isinstance(self.accelerator_config, dict):
                self.accelerator_config = {**self.accelerator_config, "use_configured_state": True}
        super().__post_init__()  # the shared key groups, then transformers' TrainingArguments
        if self.offload_activations and not self.activation_checkpointing:
            raise LongRopeError(
                "offload_activations: offloads the activation-checkpointed hidden states; set activation_checkpointing: "
                "true or drop offload_activations"
            )

    def _check_memory_keys(self) -> None:
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise LongRopeError(f"lora_r: {self.lora_r!r} must be an integer >= 0 (0 = no LoRA)")
        if self.lora_r and not self.lora_target_modules:
            raise LongRopeError("lora_target_modules: empty; name the modules that get adapters, e.g. q_proj v_proj")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LongRopeError(f"lora_dropout: {self.lora_dropout!r} must be in [0, 1)")
        for key in ("tiled_mlp_shards", "estimate_world_size", "estimate_seq_len"):
            require_positive_int(key, getattr(self, key), allow_none=True)


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def read_deepspeed_config(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise LongRopeError(f"deepspeed: {path} does not exist; e.g. configs/deepspeed/zero3.json")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise LongRopeError(f"deepspeed: {path} line {error.lineno}: invalid JSON ({error.msg})") from None
