"""Everything train.py needs beyond the Trainer itself: the long-context keys, the RoPE installation, sequence
parallelism checks, checkpoint provenance, throughput logging and the dry run.

The keys (``LongRopeTrainingArguments``) extend transformers' ``TrainingArguments``, so one YAML holds the
hyper-parameters, the RoPE method and the sequence-parallel degree. Every user mistake is a one-line
``LongRopeError`` raised before any heavy work starts.
"""

from __future__ import annotations

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
        if self.dry_run:
            import torch

            if not torch.cuda.is_available():
                # A dry run checks the recipe, not the precision; CPUs refuse the bf16/fp16 a GPU recipe sets.
                self.bf16 = self.fp16 = False
        if self.deepspeed and not self.use_cpu:
            self._configure_cpu_deepspeed_state()
        super().__post_init__()

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


def check_resume_supported(args: LongRopeTrainingArguments, checkpoint: str | os.PathLike) -> None:
    """Resuming under sequence parallelism cannot skip the already-seen batches yet: accelerate's
    skip_first_batches does not accept DeepSpeed's UlyssesSPDataLoaderAdapter (no ``dataset``); refuse clearly."""
    if args.sp_size > 1 and not args.ignore_data_skip:
        raise LongRopeError(
            f"ignore_data_skip: resuming {checkpoint} with sp_size {args.sp_size} cannot skip the batches already "
            "trained on (accelerate cannot skip inside DeepSpeed's Ulysses data loader); set ignore_data_skip: true "
            "to resume weights, optimizer and schedule and restart the data order"
        )


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
    throughput metrics in every training log when a ThroughputCallback is among its callbacks."""

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


def peak_memory_gib() -> float:
    """Peak memory of this process: CUDA allocations on a GPU, the resident set size on CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class ThroughputCallback(TrainerCallback):
    """Times training so LongContextTrainer.log can add tokens/s (all ranks), peak memory (this rank) and an MFU
    estimate (6 N tokens/s / peak FLOP/s) to every training log, before W&B and trainer_state.json see it.

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
# Dry run


# Architecture keys of the models the shipped recipes fine-tune, so a dry run builds them offline (from the models'
# published config.json). Only what shapes attention and RoPE is kept: heads, head_dim and rope settings stay real,
# the rest is shrunk by dry_run_config.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": {
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "mistralai/Mistral-7B-v0.1": {
        "model_type": "mistral",
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "sliding_window": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "meta-llama/Meta-Llama-3-8B": {
        "model_type": "llama",
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
    if args.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    input_ids = torch.randint(0, config.vocab_size, (1, seq_len))
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
