"""Everything train.py needs beyond the Trainer itself: the long-context keys, the RoPE installation, sequence
parallelism checks, checkpoint provenance, throughput logging and the dry run.

The keys (``LongRopeTrainingArguments``) extend transformers' ``TrainingArguments``, so one YAML holds the
hyper-parameters, the RoPE method and the sequence-parallel degree. Every user mistake is a one-line
``LongRopeError`` raised before any heavy work starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback, TrainingArguments

from longrope import factors as factors_io
from longrope import rope
from longrope.distributed import check_sequence_parallel_heads
from longrope.errors import LongRopeError

logger = logging.getLogger(__name__)

ROPE_METHODS = ("none", "pi", "ntk", "yarn", "longrope")
DEFAULT_LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_LORA_TRAINABLE_MODULES = ("embed_tokens", "norm")
LORA_TRAINABLE_FILE_NAME = "lora_trainable_modules.safetensors"
FACTORS_FILE_NAME = "longrope_factors.json"
SHA256_CONFIG_KEY = "longrope_factors_sha256"


@dataclass
class LongRopeTrainingArguments(TrainingArguments):
    """transformers' TrainingArguments plus the keys of long-context fine-tuning (one definition per key)."""

    rope_method: str = field(
        default="none",
        metadata={
            "help": "RoPE scaling installed before training: none (the checkpoint's own RoPE), pi, ntk, yarn, or "
            "longrope (searched factors from rope_factors_path)."
        },
    )
    rope_factors_path: str | None = field(
        default=None,
        metadata={
            "help": "Factors file (search.py's factors.json or an official CSV); required by rope_method longrope."
        },
    )
    target_length: int | None = field(
        default=None,
        metadata={
            "help": "Target context window in tokens (pi/ntk/yarn: required; longrope: default the file's, an "
            "official CSV needs it)."
        },
    )
    rope_mscale: str | None = field(
        default=None,
        metadata={
            "help": "Attention factor: su, yarn, none or a number (default: the method's own; longrope: the file's)."
        },
    )
    mixed_context_windows: bool = field(
        default=False,
        metadata={
            "help": "LongRoPE2 mixed context window training: sequences within the original window (by their "
            "largest position id; prepare with position_ids: document) use the original RoPE (short factors 1.0), "
            "longer ones the long factors. The saved config keeps short factors 1.0, as LongRoPE2 infers."
        },
    )
    allow_start_tokens: bool = field(
        default=False,
        metadata={
            "help": "Accept factors with start tokens > 0; the saved config (stock loaders) then drops them. Off: "
            "such factors are refused."
        },
    )
    sp_size: int = field(
        default=1,
        metadata={
            "help": "Ulysses sequence-parallel degree (DeepSpeed ALST): each sequence is split over this many ranks. "
            "Must divide the world size, the attention heads, the KV heads and the sequence length."
        },
    )
    loss_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Memory-linear training loss: lm_head + cross-entropy over this many tokens at a time, each "
            "chunk recomputed in backward, so no sequence x vocab logits exist (e.g. 4096). Default: the model's loss."
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
            "not exist yet (e.g. the 128k fine-tune a 256k stage starts from); one of longrope.training.ARCHITECTURES."
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
        if self.rope_method not in ROPE_METHODS:
            raise LongRopeError(f"rope_method: {self.rope_method!r} is not one of {', '.join(ROPE_METHODS)}")
        if self.rope_method == "longrope" and not self.rope_factors_path:
            raise LongRopeError("rope_factors_path: required with rope_method longrope; give search.py's factors.json")
        if self.rope_method in ("pi", "ntk", "yarn") and self.target_length is None:
            raise LongRopeError(f"target_length: required with rope_method {self.rope_method}; e.g. 2048")
        if self.mixed_context_windows and self.rope_method == "none":
            raise LongRopeError("mixed_context_windows: needs a rope_method (the long factors); set rope_method")
        if self.rope_factors_path and self.rope_method != "longrope":
            raise LongRopeError(
                f"rope_factors_path: only read with rope_method longrope (got {self.rope_method}); drop one of them"
            )
        if self.target_length is not None and (not isinstance(self.target_length, int) or self.target_length < 1):
            raise LongRopeError(f"target_length: {self.target_length!r} must be a positive integer")
        if self.loss_chunk_size is not None and (
            not isinstance(self.loss_chunk_size, int) or self.loss_chunk_size < 1
        ):
            raise LongRopeError(f"loss_chunk_size: {self.loss_chunk_size!r} must be a positive integer or null")
        if not isinstance(self.sp_size, int) or self.sp_size < 1:
            raise LongRopeError(f"sp_size: {self.sp_size!r} must be a positive integer")
        if self.sp_size > 1:
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
        self._check_memory_keys()
        if self.deepspeed and not self.use_cpu:
            self._configure_cpu_deepspeed_state()
        super().__post_init__()
        if self.offload_activations and not self.activation_checkpointing:
            raise LongRopeError(
                "offload_activations: offloads the activation-checkpointed hidden states; set activation_checkpointing: "
                "true or drop offload_activations"
            )

    def _check_memory_keys(self) -> None:
        if not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise LongRopeError(f"lora_r: {self.lora_r!r} must be an integer >= 0 (0 = no LoRA)")
        if self.lora_r and not self.lora_target_modules:
            raise LongRopeError("lora_target_modules: empty; name the modules that get adapters, e.g. q_proj v_proj")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LongRopeError(f"lora_dropout: {self.lora_dropout!r} must be in [0, 1)")
        for key in ("tiled_mlp_shards", "estimate_world_size", "estimate_seq_len"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise LongRopeError(f"{key}: {value!r} must be a positive integer or null")

    def _configure_cpu_deepspeed_state(self) -> None:
        """Multi-process DeepSpeed on CPU: give Accelerate a gloo process group it counts.

        Without a GPU, Accelerate picks no backend for a DeepSpeed launch, so every rank believes it is the only
        process (all write outputs, no data sharding), and use_cpu would disable DeepSpeed. A PartialState built with
        backend gloo before TrainingArguments sets up devices, and reused by it, has the true world size.
        """
        import torch

        if torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2:
            return
        from accelerate import PartialState

        previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        try:
            PartialState(backend="gloo")
        finally:
            if previous is None:
                os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
            else:
                os.environ["ACCELERATE_USE_DEEPSPEED"] = previous
        if self.accelerator_config is None:
            self.accelerator_config = {}
        if isinstance(self.accelerator_config, dict):
            self.accelerator_config = {**self.accelerator_config, "use_configured_state": True}

    @property
    def mscale_option(self) -> str | float | None:
        """rope_mscale as the rope module expects it (a number, a policy name, or None for the method default)."""
        if self.rope_mscale is None:
            return None
        try:
            return float(self.rope_mscale)
        except ValueError:
            if self.rope_mscale not in rope.MSCALE_POLICIES:
                raise LongRopeError(
                    f"rope_mscale: {self.rope_mscale!r} is not a number or one of {', '.join(rope.MSCALE_POLICIES)}"
                ) from None
            return self.rope_mscale


def read_deepspeed_config(path: str) -> dict[str, Any]:
    if not Path(path).is_file():
        raise LongRopeError(f"deepspeed: {path} does not exist; e.g. configs/deepspeed/zero3.json")
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise LongRopeError(f"deepspeed: {path} line {error.lineno}: invalid JSON ({error.msg})") from None


# ----------------------------------------------------------------------------------------------------------------
# RoPE


@dataclass
class ResolvedRope:
    """The scaling to install, and the factors file it came from (None for computed methods)."""

    scaling: rope.RopeScaling
    factors_path: str | None = None
    sha256: str | None = None


def resolve_rope(args: LongRopeTrainingArguments, config: Any) -> ResolvedRope | None:
    """The scaling the config asks for, checked against the model's RoPE; None for rope_method none."""
    resolved = _resolve_rope(args, config)
    if resolved is not None and args.mixed_context_windows:
        resolved = with_original_short_factors(resolved)
    return resolved


def _resolve_rope(args: LongRopeTrainingArguments, config: Any) -> ResolvedRope | None:
    if args.rope_method == "none":
        return None
    geometry = rope.RopeGeometry.from_config(config)
    mscale = args.mscale_option
    if args.rope_method != "longrope":
        options = {} if mscale is None else {"mscale": mscale}
        scaling = rope.build_scaling(args.rope_method, geometry, args.target_length, **options)
        return ResolvedRope(scaling)
    path = args.rope_factors_path
    loaded = factors_io.load_for_model(path, config, target_length=args.target_length)
    scaling = loaded.scaling
    file_geometry = scaling.geometry
    if not math.isclose(file_geometry.rope_theta, geometry.rope_theta, rel_tol=1e-6):
        raise LongRopeError(
            f"rope_factors_path: {path} is for rope_theta {file_geometry.rope_theta:g} but the model has "
            f"{geometry.rope_theta:g}; use factors searched for this model"
        )
    model_declares_window = "original_max_position_embeddings" in (getattr(config, "rope_parameters", None) or {})
    if (
        model_declares_window
        and file_geometry.original_max_position_embeddings != geometry.original_max_position_embeddings
    ):
        # An already-extended checkpoint states its pre-training window; a base model's max_position_embeddings may
        # not be it (Mistral-7B-v0.1 says 32k, the paper treats 8k), so there the file's window is taken.
        raise LongRopeError(
            f"rope_factors_path: {path} is for an original window of {file_geometry.original_max_position_embeddings} "
            f"but the model's is {geometry.original_max_position_embeddings}; use factors searched for this model"
        )
    if args.target_length is not None and scaling.max_position_embeddings != args.target_length:
        raise LongRopeError(
            f"target_length: {args.target_length}, but {path} extends to {scaling.max_position_embeddings}; "
            "drop target_length or use factors for that length"
        )
    if scaling.start_tokens and not args.allow_start_tokens:
        raise LongRopeError(
            f"rope_factors_path: {path} keeps {scaling.start_tokens} start tokens, which the saved config cannot "
            "express; set allow_start_tokens: true to train with them anyway, or use factors with start tokens 0"
        )
    if mscale is not None:
        value, policy = rope.resolve_mscale(mscale, scaling.scale, geometry.original_max_position_embeddings)
        scaling = rope.RopeScaling(
            **{
                **{f: getattr(scaling, f) for f in scaling.__dataclass_fields__},
                "mscale": value,
                "mscale_policy": policy,
            }
        )
    return ResolvedRope(scaling, factors_path=path, sha256=factors_io.sha256_file(path))


def with_original_short_factors(resolved: ResolvedRope) -> ResolvedRope:
    """The same scaling whose short factors are 1.0 (the original RoPE below the pre-training window)."""
    scaling = resolved.scaling
    original = (1.0,) * scaling.geometry.num_pairs
    return ResolvedRope(replace(scaling, short_factors=original), resolved.factors_path, resolved.sha256)


def sequence_parallel_group() -> Any:
    """DeepSpeed's sequence-parallel group once the Trainer has set it up, else None (no SP, or not yet)."""
    try:
        from deepspeed.utils import groups

        return groups._get_sequence_parallel_group()
    except Exception:  # noqa: BLE001 - before initialisation DeepSpeed raises various errors; all mean "no group"
        return None


def install_rope(model: Any, resolved: ResolvedRope, allow_start_tokens: bool = False) -> None:
    """Install the scaling in place and make the config (so every checkpoint) describe it for stock loaders.

    The factor choice uses the sequence-parallel group's global length, so all ranks of a sequence agree.
    """
    rope.install(model, resolved.scaling, sequence_parallel_group=sequence_parallel_group)
    config = factors_io.apply_to_config(model.config, resolved.scaling, allow_start_tokens=allow_start_tokens)
    if resolved.sha256 is not None:
        setattr(config, SHA256_CONFIG_KEY, resolved.sha256)
    model.config = config


def write_factors_copy(resolved: ResolvedRope, directory: str | os.PathLike) -> None:
    """Copy the training factors into ``directory`` (the output folder or a checkpoint) as longrope_factors.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / FACTORS_FILE_NAME
    temporary = target.with_name(f".{target.name}.tmp")
    if resolved.factors_path is not None and not resolved.factors_path.endswith(".csv"):
        shutil.copyfile(resolved.factors_path, temporary)
        os.replace(temporary, target)
    else:
        factors_io.save(target, resolved.scaling, {"source": resolved.factors_path or "computed by train.py"})


class FactorsCopyCallback(TrainerCallback):
    """Every checkpoint folder gets the factors file beside its config (the config carries its sha256); with W&B on,
    the factors file is also logged as an artifact when training begins."""

    def __init__(self, resolved: ResolvedRope) -> None:
        self.resolved = resolved

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            log_factors_artifact(args.report_to, self.resolved)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if checkpoint.is_dir():
                write_factors_copy(self.resolved, checkpoint)


def check_resume_compatible(checkpoint: str | os.PathLike, config: Any) -> None:
    """Refuse to resume from a checkpoint whose RoPE or architecture differs from this run's (names the key)."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    current = config.to_dict()
    keys = [
        "model_type",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "max_position_embeddings",
        SHA256_CONFIG_KEY,
    ]
    for key in keys:
        if saved.get(key) != current.get(key):
            raise LongRopeError(
                f"resume_from_checkpoint: {checkpoint} has {key} = {saved.get(key)!r} but this run has "
                f"{current.get(key)!r}; use another output_dir or the same config"
            )
    saved_rope = saved.get("rope_parameters") or {}
    current_rope = current.get("rope_parameters") or {}
    for key in sorted(set(saved_rope) | set(current_rope)):
        if saved_rope.get(key) != current_rope.get(key):
            raise LongRopeError(
                f"resume_from_checkpoint: {checkpoint} has rope_parameters.{key} = {saved_rope.get(key)!r} but this "
                f"run has {current_rope.get(key)!r}; use another output_dir or the same rope keys"
            )


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that the Trainer finished writing, or None.

    trainer_state.json is the last file a checkpoint receives, and without it the Trainer would restart at step 0
    with the checkpoint's weights; a newer folder lacking it (the run was killed while saving) is passed over.
    """
    from transformers.trainer import TRAINER_STATE_NAME
    from transformers.trainer_utils import sort_checkpoints

    for path in reversed(sort_checkpoints(str(output_dir))):  # by step number, newest first
        if (Path(path) / TRAINER_STATE_NAME).is_file():
            return path
        logger.warning("%s has no %s (killed while saving?); an older checkpoint is used", path, TRAINER_STATE_NAME)
    return None


# ----------------------------------------------------------------------------------------------------------------
# Sequence parallelism


def launched_world_size() -> int:
    """Processes in this launch (torchrun / accelerate set WORLD_SIZE); TrainingArguments.world_size reads 1 on
    CPU before the Trainer initialises the process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def validate_sequence_parallel(config: Any, sp_size: int, seq_len: int, world_size: int) -> None:
    """One-line errors for an sp_size that cannot split this model, these sequences or this launch."""
    if sp_size == 1:
        return
    if world_size % sp_size:
        raise LongRopeError(
            f"sp_size: {sp_size} does not divide the {world_size} launched process(es); launch a multiple of "
            f"{sp_size} processes (torchrun --nproc_per_node {sp_size}) or lower sp_size"
        )
    check_sequence_parallel_heads(config, sp_size)
    if seq_len % sp_size:
        raise LongRopeError(
            f"sp_size: {sp_size} does not divide the sequence length {seq_len}; prepare the data with a "
            f"max_seq_len divisible by {sp_size}"
        )


def _is_ulysses_loader(dataloader: Any) -> bool:
    try:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter
    except ImportError:
        return False
    return isinstance(dataloader, UlyssesSPDataLoaderAdapter)


def restart_ulysses_epoch(adapter: Any, epoch: int) -> None:
    """Start DeepSpeed's Ulysses adapter on a fresh pass over its data loader, shuffled for ``epoch``, as ``iter()``
    does for a plain data loader at each epoch.

    The adapter is its own iterator and forwards no set_epoch. Left alone, each epoch after the first starts by
    draining the previous pass's spent iterator (one update step with no batch: an uninterrupted run trains a step
    less per epoch boundary than max_steps), and a resumed run's first epoch would shuffle as epoch 0.
    """
    adapter.dl.set_epoch(epoch)
    adapter.micro_batches.clear()
    adapter.iter = iter(adapter.dl)


def skip_first_batches_under_ulysses(adapter: Any, num_batches: int) -> Any:
    """A fresh Ulysses adapter over ``adapter``'s data loader that yields what ``adapter`` yields after its first
    ``num_batches`` micro-batches, without computing anything for the skipped ones.

    Each batch of the wrapped (data-parallel) loader becomes sp_size micro-batches: one per rank of the SP group, each
    sequence-sharded over the whole group. So whole loader batches are skipped in its batch sampler (accelerate's
    skip_first_batches: no rows are read for them), and the micro-batches of a partly trained loader batch are drawn
    and dropped (every rank of the group does so: the adapter's all-gathers stay matched).
    """
    from accelerate import skip_first_batches
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    whole, partial = divmod(num_batches, adapter.sp_world_size)
    skipped = UlyssesSPDataLoaderAdapter(
        skip_first_batches(adapter.dl, whole) if whole else adapter.dl,
        sp_rank=adapter.sp_rank,
        sp_group=adapter.sp_group,
        sp_world_size=adapter.sp_world_size,
        device=adapter.device,
    )
    for _ in range(partial):
        next(skipped)
    return skipped


@contextlib.contextmanager
def _ulysses_aware_batch_skipping() -> Any:
    """Within the block, the Trainer's resume skip (transformers.trainer.skip_first_batches, accelerate's, which
    rebuilds a torch DataLoader and cannot see through DeepSpeed's Ulysses adapter) handles the adapter too."""
    import transformers.trainer as trainer_module

    plain = trainer_module.skip_first_batches  # AttributeError, not a silent no-op, if transformers moves it

    def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
        if _is_ulysses_loader(dataloader):
            return skip_first_batches_under_ulysses(dataloader, num_batches)
        return plain(dataloader, num_batches)

    trainer_module.skip_first_batches = skip_first_batches
    try:
        yield
    finally:
        trainer_module.skip_first_batches = plain


# ----------------------------------------------------------------------------------------------------------------
# Memory-linear loss


def _chunk_nll_sum(hidden: Any, labels: Any, lm_head: Any) -> Any:
    import torch.nn.functional as F

    return F.cross_entropy(lm_head(hidden).float(), labels, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(hidden_states: Any, lm_head: Any, shift_labels: Any, chunk_size: int) -> tuple[Any, Any]:
    """(sum of token NLLs, number of scored tokens) of ``lm_head(hidden_states)`` against ``shift_labels``.

    ``shift_labels`` are already aligned with ``hidden_states`` (-100 = not scored). At most ``chunk_size`` x vocab
    logits exist at a time, in forward and in backward (each chunk is recomputed), so memory grows linearly with the
    sequence length instead of with length x vocab.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels = shift_labels.reshape(-1).to(hidden.device)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk_labels = labels[start : start + chunk_size]
        if bool((chunk_labels != -100).any()):
            total = total + checkpoint(
                _chunk_nll_sum, hidden[start : start + chunk_size], chunk_labels, lm_head, use_reentrant=False
            )
    return total, (labels != -100).sum()


class LongContextTrainer(Trainer):
    """The Trainer, with the memory-linear loss when ``loss_chunk_size`` is set (also under Ulysses SP, where each
    rank scores its shard and the per-rank sums are combined by token count, as transformers does for SP), and
    throughput metrics in every training log when a ThroughputCallback is among its callbacks.

    With ``offload_activations`` each training step (forward and backward) runs inside DeepSpeed's checkpoint-offload
    hooks; ``activation_offload_totals`` sums their counters over the run. A LoRA model's checkpoints also hold the
    fully trained modules (PEFT's adapter files do not), and a resume without DeepSpeed loads them back.

    Under Ulysses SP every epoch restarts DeepSpeed's data loader adapter (restart_ulysses_epoch) and a resumed epoch
    skips the micro-batches already trained on (skip_first_batches_under_ulysses), so a resumed run sees the batches
    of the uninterrupted one in the same order.
    """

    activation_offload_totals: dict[str, int] | None = None

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
        if not getattr(self.args, "offload_activations", False):
            return super().training_step(model, inputs, num_items_in_batch)
        offload = activation_offload_context()
        with offload:
            loss = super().training_step(model, inputs, num_items_in_batch)
            stats = dataclasses.asdict(offload.stats)  # reset when the context exits
        totals = self.activation_offload_totals or {}
        self.activation_offload_totals = {key: totals.get(key, 0) + value for key, value in stats.items()}
        return loss

    def _run_epoch(self, **kwargs: Any) -> Any:
        loader = kwargs.get("train_dataloader")
        if not _is_ulysses_loader(loader):
            return super()._run_epoch(**kwargs)
        restart_ulysses_epoch(loader, kwargs["epoch"])
        with _ulysses_aware_batch_skipping():
            return super()._run_epoch(**kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        model = self.accelerator.unwrap_model(self.model)
        if not (self.args.should_save and _is_peft(model)):
            return
        from safetensors.torch import save_file

        names = set(lora_extra_trainable_names(model))
        source = state_dict if state_dict else dict(model.named_parameters())
        extra = {name: tensor.detach().cpu().contiguous() for name, tensor in source.items() if name in names}
        if extra:
            save_file(extra, str(Path(output_dir or self.args.output_dir) / LORA_TRAINABLE_FILE_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        model = model if model is not None else self.accelerator.unwrap_model(self.model)
        path = Path(resume_from_checkpoint) / LORA_TRAINABLE_FILE_NAME
        if _is_peft(model) and path.is_file():
            from safetensors.torch import load_file

            result = model.load_state_dict(load_file(str(path)), strict=False)
            if result.unexpected_keys:
                raise LongRopeError(
                    f"resume_from_checkpoint: {path} holds {result.unexpected_keys[:3]}, not parameters of this run"
                )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, ThroughputCallback):
                    logs = {**logs, **callback.metrics(self.state.global_step)}
        super().log(logs, *args, **kwargs)

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        chunk_size = getattr(self.args, "loss_chunk_size", None)
        if not chunk_size or not model.training:
            self.loss_is_scaled_for_ga = None  # the Trainer's own rule for its own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # A per-micro-batch token mean: the Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False
        import torch
        import torch.nn.functional as F

        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        shift_labels = inputs.pop("shift_labels", None)
        if shift_labels is None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        causal_lm = self.accelerator.unwrap_model(model)
        captured: dict[str, Any] = {}

        # The decoder's last hidden state (the lm_head input of every position) is taken from the base model.
        def keep_hidden(module: Any, args: Any, output: Any) -> None:
            captured["hidden"] = output[0]

        handle = causal_lm.get_decoder().register_forward_hook(keep_hidden)
        try:
            # Only the last position's logits are computed by the model; the chunked loss scores all positions.
            outputs = model(**inputs, logits_to_keep=1)
        finally:
            handle.remove()
        nll_sum, tokens = chunked_causal_lm_loss(
            captured["hidden"], causal_lm.get_output_embeddings(), shift_labels, chunk_size
        )
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and pc.sp_backend == "deepspeed" and pc.sp_enabled:
            group = sequence_parallel_group()
            nll_sum = torch.stack(torch.distributed.nn.functional.all_gather(nll_sum, group=group)).sum()
            tokens = torch.stack(torch.distributed.nn.functional.all_gather(tokens, group=group)).sum()
        loss = nll_sum / tokens.clamp(min=1)
        return (loss, outputs) if return_outputs else loss


# ----------------------------------------------------------------------------------------------------------------
# LoRA (PEFT)


def apply_lora(model: Any, args: LongRopeTrainingArguments) -> Any:
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


def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def lora_extra_trainable_names(model: Any) -> list[str]:
    """Names of the trainable parameters PEFT's adapter files do not hold (lora_trainable_modules)."""
    return [name for name, p in model.named_parameters() if p.requires_grad and "lora_" not in name]


@contextlib.contextmanager
def _zero3_init_disabled() -> Any:
    """Build a model in full on this process even though the run's DeepSpeed config is ZeRO-3 (zero.Init off)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def trainable_state_dict(trainer: Any) -> dict[str, Any]:
    """Every trainable parameter in full (the LoRA adapters and lora_trainable_modules), on CPU.

    Under ZeRO-3 a collective on every rank (the result is only complete on rank 0); the frozen weights are left out:
    they equal the checkpoint the run started from.
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.model_wrapped.zero_optimization_stage() == 3:
        gathered = trainer.model_wrapped._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        return dict(gathered or {})  # None on the other ranks
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


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
    with _zero3_init_disabled():
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


# ----------------------------------------------------------------------------------------------------------------
# Activation memory: TiledMLP and checkpoint offload (DeepSpeed ALST)


def enable_tiled_mlp(model: Any, shards: int | None = None) -> int:
    """Run every gated MLP (gate_proj/up_proj/down_proj) through DeepSpeed's TiledMLP; returns how many.

    ``shards`` slices per call, default ceil(local length / hidden size) as DeepSpeed suggests. Every rank computes the
    same count from its sequence shard (packed rows all have max_seq_len tokens, SP shards are equal), which ZeRO-3
    needs: each slice gathers the MLP's parameters, a collective.
    """
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    tiled = 0
    for module in model.modules():
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
            continue
        untiled_forward = module.forward

        def call_untiled(mlp: Any, x: Any, untiled_forward: Any = untiled_forward) -> Any:
            return untiled_forward(x)

        def tiled_forward(x: Any, mlp: Any = module, call_untiled: Any = call_untiled) -> Any:
            count = shards or max(1, math.ceil(x.shape[-2] / x.shape[-1]))
            if count == 1:
                return call_untiled(mlp, x)
            return TiledMLP.apply(call_untiled, mlp, x, count, list(mlp.parameters()))

        module.forward = tiled_forward
        tiled += 1
    if not tiled:
        raise LongRopeError("tiled_mlp: the model has no gated MLP (gate_proj, up_proj, down_proj); turn it off")
    return tiled


def activation_offload_context() -> Any:
    """DeepSpeed's saved-tensor hooks that move each checkpointed decoder-layer input to (pinned) CPU memory until
    backward; everything else stays on the device. On a CPU-only machine it marks the tensors and moves nothing."""
    from deepspeed.runtime.activation_checkpointing.offload_activations import (
        get_checkpoint_hidden_states_offloading_ctx_manager,
    )

    return get_checkpoint_hidden_states_offloading_ctx_manager()


# ----------------------------------------------------------------------------------------------------------------
# Logging


def count_parameters(model: Any) -> int:
    """Parameters of the whole model, also when ZeRO-3 has already partitioned them at load time (zero.Init)."""
    return sum(getattr(p, "ds_numel", 0) or p.numel() for p in model.parameters())


# Dense bf16 peak FLOP/s per device, for the MFU estimate when peak_flops is not set.
PEAK_FLOPS_BY_DEVICE = {"H100": 989e12, "A100": 312e12, "A10G": 125e12, "L4": 121e12, "V100": 125e12}


def device_peak_flops() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS_BY_DEVICE.items() if key in name), None)


def reset_peak_memory() -> None:
    """Restart the peak that peak_memory_gib reports from the current usage (CUDA allocator; Linux RSS high-water
    mark), so loading and set-up peaks do not hide the training peak."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass  # elsewhere the peak stays the process lifetime's


def peak_memory_gib() -> float:
    """Peak memory of this process since the last reset_peak_memory: CUDA allocations on a GPU, the resident set size
    high-water mark on CPU (the lifetime ru_maxrss where /proc is not available)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class ThroughputCallback(TrainerCallback):
    """Times training so LongContextTrainer.log can add tokens/s (all ranks), peak memory since training began (this
    rank) and an MFU estimate (6 N tokens/s / peak FLOP/s) to every training log, before W&B and trainer_state.json
    see it.

    Under sequence parallelism a batch's tokens are shared by sp_size ranks, so the global count per optimizer step
    is tokens per micro-batch x gradient accumulation x data-parallel ranks.
    """

    def __init__(self, tokens_per_step: int, num_parameters: int, world_size: int, peak_flops: float | None) -> None:
        self.tokens_per_step = tokens_per_step
        self.num_parameters = num_parameters
        self.world_size = world_size
        self.peak_flops = peak_flops
        self._start: float | None = None
        self._start_step = 0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self._start is None:
            reset_peak_memory()  # the model, engine and optimizer are set up: report the training peak
            self._start = time.perf_counter()
            self._start_step = state.global_step

    def metrics(self, global_step: int) -> dict[str, float]:
        """tokens_per_second, peak_memory_gib and (with a peak FLOP/s) mfu since training (or resuming) began."""
        steps = global_step - self._start_step
        elapsed = time.perf_counter() - self._start if self._start is not None else 0.0
        if steps <= 0 or elapsed <= 0:
            return {}
        tokens_per_second = steps * self.tokens_per_step / elapsed
        metrics = {"tokens_per_second": round(tokens_per_second, 2), "peak_memory_gib": round(peak_memory_gib(), 3)}
        if self.peak_flops:
            mfu = 6 * self.num_parameters * tokens_per_second / (self.peak_flops * self.world_size)
            metrics["mfu"] = round(mfu, 5)
        return metrics


def log_factors_artifact(report_to: Any, resolved: ResolvedRope | None) -> None:
    """The factors file as a W&B artifact when W&B is on (the run exists once the Trainer has started)."""
    if resolved is None or resolved.factors_path is None or "wandb" not in (report_to or []):
        return
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is None:
        return
    artifact = wandb.Artifact(f"factors-{(resolved.sha256 or 'computed')[:12]}", type="longrope-factors")
    artifact.add_file(resolved.factors_path, name=FACTORS_FILE_NAME)
    wandb.run.log_artifact(artifact)


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate


# CUDA context, NCCL buffers and allocator fragmentation: a rule of thumb, not derived from the config.
OVERHEAD_GIB = 3.0


@dataclass
class MemoryEstimate:
    """Per-GPU memory of a training config: ``rows`` of (component, GPU GiB, CPU GiB per rank, how it was counted)."""

    rows: list[tuple[str, float, float, str]]
    world_size: int
    seq_len: int
    num_parameters: int
    trainable_parameters: int

    @property
    def gpu_gib(self) -> float:
        return sum(row[1] for row in self.rows)

    @property
    def cpu_gib(self) -> float:
        return sum(row[2] for row in self.rows)

    def table(self) -> str:
        lines = ["| component | GPU GiB | CPU GiB / rank | counted as |", "|---|---:|---:|---|"]
        lines += [f"| {name} | {gpu:.2f} | {cpu:.2f} | {note} |" for name, gpu, cpu, note in self.rows]
        lines.append(f"| **total per GPU** | **{self.gpu_gib:.2f}** | {self.cpu_gib:.2f} | |")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "num_parameters": self.num_parameters,
            "trainable_parameters": self.trainable_parameters,
            "rows": [{"component": r[0], "gpu_gib": r[1], "cpu_gib": r[2], "note": r[3]} for r in self.rows],
            "total_gpu_gib": self.gpu_gib,
            "total_cpu_gib_per_rank": self.cpu_gib,
        }


def architecture_config(model_name_or_path: str, fallback: str | None = None, overrides: dict | None = None) -> Any:
    """The full-size config: a local folder's config.json, a known hub architecture (ARCHITECTURES, offline), or
    ``fallback`` (dry_run_architecture) when the checkpoint does not exist yet."""
    from transformers import AutoConfig

    values = None
    for name in (model_name_or_path, fallback):
        if not name:
            continue
        if (Path(name) / "config.json").is_file():
            values = json.loads((Path(name) / "config.json").read_text())
            break
        if name in ARCHITECTURES:
            values = dict(ARCHITECTURES[name])
            break
    if values is None:
        raise LongRopeError(
            f"model_name_or_path: no config for {model_name_or_path!r} offline; use a local folder, one of "
            f"{', '.join(ARCHITECTURES)}, or set dry_run_architecture"
        )
    values.update(overrides or {})
    model_type = values.pop("model_type")
    for key in ("torch_dtype", "dtype", "architectures", "transformers_version"):
        values.pop(key, None)
    return AutoConfig.for_model(model_type, **values)


def _deepspeed_settings(args: LongRopeTrainingArguments) -> dict[str, Any]:
    config = args.deepspeed
    if isinstance(config, str):
        config = read_deepspeed_config(config)
    return config or {}


def _parameter_counts(config: Any, args: LongRopeTrainingArguments) -> tuple[int, int, int, int]:
    """(all parameters, trainable ones, one decoder layer's, the largest embedding matrix's) of the architecture."""
    import torch
    from transformers import AutoModelForCausalLM

    with _zero3_init_disabled(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.get_decoder().layers[0].parameters())
    embedding = max(model.get_input_embeddings().weight.numel(), model.get_output_embeddings().weight.numel())
    if not args.lora_r:
        return total, total, layer, embedding
    adapters = sum(
        args.lora_r * (module.in_features + module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in args.lora_target_modules
    )
    unfrozen = sum(
        p.numel() for name, p in model.named_parameters() if any(part in name for part in args.lora_trainable_modules)
    )
    return total + adapters, adapters + unfrozen, layer, embedding


def estimate_memory(config: Any, args: LongRopeTrainingArguments, seq_len: int, world_size: int) -> MemoryEstimate:
    """Per-GPU memory of training ``config`` at ``seq_len`` on ``world_size`` GPUs, from the config alone.

    Model states: 16 bytes per trained parameter (bf16 weight and gradient, fp32 master weight and Adam moments; fp32
    training has no master copy but 4-byte weights and gradients: also 16), 2 (or 4) per frozen LoRA base weight,
    divided by the world size under ZeRO-3; DeepSpeed CPU offload moves the fp32 optimizer part (offload_optimizer)
    and the weight shards (offload_param) to CPU. Activations, per micro-batch at the local length seq_len / sp_size:
    with activation checkpointing one hidden state per layer plus one layer's recompute working set (its saved
    tensors and their gradients: attention linear in length, as with flash/sdpa kernels; the MLP intermediates
    divided by the tiles with tiled_mlp); without it every layer's working set. Logits: a loss_chunk_size x vocab
    chunk (or the whole local length) as bf16 logits, fp32 log-probabilities and fp32 gradients.
    """
    zero = _deepspeed_settings(args).get("zero_optimization", {})
    zero3 = zero.get("stage") == 3
    offload_optimizer = (zero.get("offload_optimizer") or {}).get("device") == "cpu"
    offload_param = (zero.get("offload_param") or {}).get("device") == "cpu"
    half = getattr(args, "half_precision_requested", bool(args.bf16 or args.fp16))
    width = 2 if half else 4  # bytes of one weight or activation element
    total, trainable, layer_params, embedding_params = _parameter_counts(config, args)
    frozen = total - trainable
    shards = world_size if zero3 else 1
    gib = 2.0**30
    rows: list[tuple[str, float, float, str]] = []

    weights_and_grads = (trainable * 2 * width + frozen * width) / shards
    optimizer = trainable * (16 - 2 * width) / shards  # fp32 master (mixed precision only) + Adam m and v
    gpu_states, cpu_states = weights_and_grads + optimizer, 0.0
    where = f"/ {shards} ranks (ZeRO-3)" if zero3 else "replicated (no ZeRO-3)"
    note = f"16 B x {trainable / 1e9:.2f}B trained" + (f" + {width} B x {frozen / 1e9:.2f}B frozen" if frozen else "")
    if offload_optimizer:
        gpu_states, cpu_states = weights_and_grads, optimizer
        note += ", optimizer on CPU"
    if offload_param:
        moved = (trainable + frozen) * width / shards
        gpu_states, cpu_states = gpu_states - moved, cpu_states + moved
        note += ", weights on CPU"
    rows.append(("model states (weights, grads, Adam)", gpu_states / gib, cpu_states / gib, f"{note}, {where}"))
    if zero3:
        gathered = 2 * max(layer_params, embedding_params) * width
        rows.append(("ZeRO-3 gathered weights", gathered / gib, 0.0, "largest module (layer or vocab matrix) x 2"))

    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    q = heads * head_dim
    intermediate = config.intermediate_size
    layers = config.num_hidden_layers
    local = seq_len // args.sp_size * args.per_device_train_batch_size
    # Saved per token by one decoder layer: 2 norms' outputs, q, k, v, rotated q and k, attention output, o_proj and
    # down_proj outputs (hidden each). Under Ulysses the attention kernel saves the all-to-all'd q, k, v instead of
    # the local ones: the same bytes per rank (the all-to-all buffers themselves are transient).
    attention = 2 * hidden + 2 * q + 3 * kv
    attention_bytes = local * attention * width * 2 + local * heads * 4  # x2: their gradients; + fp32 softmax stats
    tiles = 1
    if args.tiled_mlp:
        tiles = args.tiled_mlp_shards or max(1, math.ceil(local / hidden))
    mlp_bytes = (local * 2 * hidden + math.ceil(local / tiles) * 4 * intermediate) * width * 2
    if args.activation_checkpointing:
        checkpoints = layers * local * hidden * width
        gpu_checkpoints, cpu_checkpoints = checkpoints, 0.0
        if args.offload_activations:
            # DeepSpeed keeps the newest input on the GPU and two copies in flight.
            gpu_checkpoints = min(layers, 3) * local * hidden * width
            cpu_checkpoints = checkpoints
        rows.append(
            (
                "checkpointed hidden states",
                gpu_checkpoints / gib,
                cpu_checkpoints / gib,
                f"{layers} layers x {local} tokens x {hidden}"
                + (", offloaded to CPU" if args.offload_activations else ""),
            )
        )
        rows.append(
            ("layer recompute: attention", attention_bytes / gib, 0.0, "one layer, linear in length (flash/sdpa)")
        )
        rows.append(("layer recompute: MLP", mlp_bytes / gib, 0.0, f"one layer, {tiles} tile(s)"))
    else:
        rows.append(
            (
                "activations (no checkpointing)",
                layers * (attention_bytes + mlp_bytes) / 2 / gib,
                0.0,
                f"{layers} layers' saved tensors, linear in length (flash/sdpa)",
            )
        )
    vocab = config.vocab_size
    chunk = min(args.loss_chunk_size or local, local)
    logits = chunk * vocab * (width + 8)
    label = f"{chunk} x {vocab} " + ("(loss_chunk_size)" if args.loss_chunk_size else "(whole local length)")
    rows.append(("logits and loss", logits / gib, 0.0, label))
    rows.append(("overhead", OVERHEAD_GIB, 0.0, "CUDA context, NCCL buffers, fragmentation (rule of thumb)"))
    return MemoryEstimate(rows, world_size, seq_len, total, trainable)


def estimate_for_config(model_args: Any, data_args: Any, args: LongRopeTrainingArguments) -> MemoryEstimate:
    """estimate_memory for a parsed train.py config: the sequence length from estimate_seq_len, max_seq_len,
    target_length or the prepared dataset; the world size from estimate_world_size, the launch, or sp_size."""
    if model_args.model_name_or_path is None and model_args.model_config is None:
        raise LongRopeError("estimate_memory: needs model_name_or_path or model_config (the architecture)")
    if model_args.model_name_or_path is not None:
        config = architecture_config(
            model_args.model_name_or_path, args.dry_run_architecture, model_args.config_overrides
        )
    elif isinstance(model_args.model_config, dict):
        from transformers import AutoConfig

        values = {"vocab_size": 32000, **model_args.model_config}  # the tokenizer's size, when not given
        config = AutoConfig.for_model(values.pop("model_type"), **values)
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_args.model_config)
    seq_len = args.estimate_seq_len or data_args.max_seq_len or args.target_length
    if seq_len is None and data_args.dataset_path and Path(data_args.dataset_path).is_dir():
        from longrope.data import load_prepared_dataset

        seq_len = len(load_prepared_dataset(data_args.dataset_path)["train"][0]["input_ids"])
    if seq_len is None:
        raise LongRopeError("estimate_seq_len: cannot tell the training length; set estimate_seq_len or max_seq_len")
    world_size = args.estimate_world_size or (launched_world_size() if "WORLD_SIZE" in os.environ else args.sp_size)
    if world_size % args.sp_size:
        raise LongRopeError(f"estimate_world_size: {world_size} is not a multiple of sp_size {args.sp_size}")
    return estimate_memory(config, args, seq_len, world_size)


# ----------------------------------------------------------------------------------------------------------------
# Dry run


# Architecture keys of the models the shipped recipes fine-tune, so a dry run builds them offline and the memory
# estimate sizes them (from the models' published config.json). A dry run keeps heads, head_dim and rope settings
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


def dry_run_config(model_name_or_path: str, config_overrides: dict | None = None) -> Any:
    """The architecture of ``model_name_or_path`` (a local folder, or a hub name from ARCHITECTURES) shrunk to 2
    layers, hidden size 2 x heads and a 512-token vocabulary, with its real heads, head_dim and RoPE."""
    from transformers import AutoConfig

    local = Path(model_name_or_path) / "config.json"
    if local.is_file():
        values = json.loads(local.read_text())
    elif model_name_or_path in ARCHITECTURES:
        values = dict(ARCHITECTURES[model_name_or_path])
    else:
        raise LongRopeError(
            f"model_name_or_path: dry_run knows no architecture for {model_name_or_path!r} offline; use one of "
            f"{', '.join(ARCHITECTURES)} or a local folder with config.json"
        )
    values.update(config_overrides or {})
    model_type = values.pop("model_type")
    heads = values["num_attention_heads"]
    values.setdefault("head_dim", values.get("hidden_size", 0) // heads or 64)
    values.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=512, tie_word_embeddings=False
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "architectures"):
        values.pop(key, None)
    return AutoConfig.for_model(model_type, **values)


def dry_run(model_name_or_path: str, config_overrides: dict | None, args: LongRopeTrainingArguments) -> dict[str, Any]:
    """Install the configured RoPE into the shrunk architecture and take one optimizer step on random tokens.

    Factors files that do not exist yet (the search has not run) are replaced by PI factors of the right shape,
    and the report says so; everything else (method, geometry, sp_size against the heads) is checked for real.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # Parsing a deepspeed key registered ZeRO-3 globally; the dry run builds a plain model in this one process.
    unset_hf_deepspeed_config()
    config = dry_run_config(model_name_or_path, config_overrides)
    notes = []
    if args.rope_method == "longrope" and not Path(args.rope_factors_path).exists():
        notes.append(f"{args.rope_factors_path} does not exist yet; PI factors of the same shape stand in")
        geometry = rope.RopeGeometry.from_config(config)
        target = args.target_length or 32 * geometry.original_max_position_embeddings
        resolved = ResolvedRope(rope.build_scaling("pi", geometry, target))
    else:
        resolved = resolve_rope(args, config)
    seq_len = 64 * args.sp_size
    validate_sequence_parallel(config, args.sp_size, seq_len, args.sp_size)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    if resolved is not None:
        install_rope(model, resolved, allow_start_tokens=args.allow_start_tokens)
        # Long factors apply only past the original window, which a tiny dry run cannot reach on a CPU.
        rope.select_factors(model, "long")
    if args.lora_r:
        model = apply_lora(model, args)
    if args.tiled_mlp:
        enable_tiled_mlp(model, args.tiled_mlp_shards)
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)
    input_ids = torch.randint(0, config.vocab_size, (1, seq_len))
    offload = activation_offload_context() if args.offload_activations else contextlib.nullcontext()
    with offload:
        loss = model(input_ids=input_ids, labels=input_ids, position_ids=torch.arange(seq_len)[None]).loss
        loss.backward()
    optimizer.step()
    loss = loss.detach()
    if not torch.isfinite(loss):
        raise LongRopeError(f"dry_run: the loss is {loss.item()}; check the rope keys")
    return {
        "dry_run_loss": loss.item(),
        "architecture": config.model_type,
        "num_attention_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "rope": None if resolved is None else args.rope_method,
        "rope_factors_used": None if resolved is None else list(resolved.scaling.long_factors),
        "notes": notes,
    }
