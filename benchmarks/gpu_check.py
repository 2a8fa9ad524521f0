"""One prepared GPU check: RoPE numerics, training throughput, MFU and memory, evaluation and search cost at 16k-256k
tokens on one GPU, offline, within a time budget, its results written as files.

Launch from the repository root (no install needed; nothing is downloaded):

    python -m benchmarks.gpu_check                                  # one CUDA GPU, at most --budget_s 480 seconds
    python -m benchmarks.gpu_check --budget_s 900 --numerics_layers 2   # a longer lease: a deeper numerics model
    python -m benchmarks.gpu_check --device cpu --tiny              # the same code on tiny models (seconds)
    python -m benchmarks.gpu_check --device cuda --tiny             # the same on a GPU (seconds)
    PYTHONUNBUFFERED=1 timeout 570 python3 -m benchmarks.gpu_check --output_dir $OUT   # a 10-minute GPU lease

Every model is random-init from the architecture tables of longrope/architectures.py and built by
longrope.modeling.prepare_model (the one path to a training model); every token is random. Packages beyond PyTorch
and transformers are optional: flash-attn (flash_attention_2 numerics, and attention everywhere through
``attn_implementation: auto``) and DeepSpeed (TiledMLP); a missing one skips its cells with a line saying so.

1. numerics: longrope.rope.install of PI, YaRN, LongRoPE with 4 start tokens and a factors set with short and long
   factors (the installed module picks a set per sequence from its length: short up to the 8k window, long beyond)
   into a small random-init model, a few layers (--numerics_layers, default 1) of the Llama-3.2-1B shape: bf16 on the
   device (sdpa, and flash_attention_2 where flash-attn is importable) against an fp32 CPU forward of the same weights,
   max abs / rel logit error and top-1 agreement at 32 positions spread over each length (4k..64k). The CPU reference
   runs in a background thread (most cores) while the GPU works on the other sections; it keeps to the same budget.
2. training: LongContextTrainer steps (activation checkpointing, loss_chunk_size 4096, bf16, AdamW, batch 1, yarn
   RoPE) at 16k..128k tokens on the Llama-3.2-1B shape (16 layers) and the LLaMA2-7B shape cut to 4 of its 32 layers,
   and TiledMLP on the 1B shape at 64k and 128k: tokens/s and MFU of the steps after a warm-up step, peak memory
   (torch.cuda.max_memory_allocated), and longrope.memory_estimate.estimate_memory of the same run beside it.
3. evaluation: longrope.perplexity.sequence_nll at 64k, 128k, 256k and one search candidate at 128k (what
   longrope.searcher.Fitness does: install a candidate, score one sample) on the 4-layer LLaMA2-7B shape; from them
   the projected GPU-hours of the paper's searches for LLaMA2-7B at 128k, 256k and 2048k (paper and fast mode).

Budget: every cell has an estimated cost (its FLOPs over the rate its kind last achieved, a prior from a measured
matmul before that, plus its set-up time). Before a cell runs, the cells still to run are taken smallest first while
they fit in the time left; a cell outside that set is recorded as "skipped: budget", so the largest go first.
OOM: a cell that runs out of memory is recorded with a line, its memory is freed and the next cell runs.

Writes <output_dir>/gpu_check.json and gpu_check.md (default benchmarks/results, or outputs/gpu-check-tiny with
--tiny so a tiny run never replaces a GPU measurement) after every cell, atomically: a run cut short keeps what it
measured.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Offline by construction: no hub look-ups, no tracking.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from longrope import rope  # noqa: E402
from longrope.errors import LongRopeError, exit_on_user_error  # noqa: E402
from longrope.io import atomic_write_json, atomic_write_text, check_output_dir  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
TINY_RESULTS = REPO_ROOT / "outputs" / "gpu-check-tiny"
NAME = "gpu_check"
SECTIONS = ("numerics", "training", "evaluation")

SHAPE_1B = "meta-llama/Llama-3.2-1B"
SHAPE_7B = "meta-llama/Llama-2-7b-hf"
NUMERICS_METHODS = {
    "pi": "PI",
    "yarn": "YaRN",
    "longrope_start_tokens": "LongRoPE, 4 start tokens",
    "longrope_short_long": "LongRoPE, short + long factors",
}
START_TOKENS = 4
WARMUP_STEPS = 1
# Fast mode's evaluated tokens to reach the paper mode's final fitness (benchmarks/README.md, median of 6 seeds);
# read from benchmarks/results/search_efficiency.json when it is there.
FAST_TOKEN_RATIO = 0.085
SEARCH_CONFIGS = {
    131072: "configs/llama2-7b/search-128k.yaml",
    262144: "configs/llama2-7b/search-256k.yaml",
    2097152: "configs/llama2-7b/search-2048k.yaml",
}
FULL_7B_LAYERS = 32
# The files are rewritten after a cell when the last write is this old: a run cut short loses a few seconds at most.
WRITE_EVERY_S = 5.0


@dataclass(frozen=True)
class Sizes:
    """The lengths and depths of one run: the GPU check, or its tiny version (the same code in seconds)."""

    numerics_lengths: tuple[int, ...]
    train_lengths: tuple[int, ...]
    tiled_lengths: tuple[int, ...]
    eval_lengths: tuple[int, ...]
    search_length: int
    numerics_layers: int
    layers_7b: int  # the LLaMA2-7B shape's depth here (the ~1B shape keeps all of its layers)
    loss_chunk_size: int
    sample_positions: int
    tiny: bool = False

    def measured_steps(self, length: int) -> int:
        # One timed step is enough where a step takes seconds; two where it takes well under one.
        return 2 if self.tiny or length <= 32768 else 1


FULL = Sizes(
    numerics_lengths=(4096, 8192, 16384, 32768, 65536),
    train_lengths=(16384, 32768, 65536, 131072),
    tiled_lengths=(65536, 131072),
    eval_lengths=(65536, 131072, 262144),
    search_length=131072,
    numerics_layers=1,
    layers_7b=4,
    loss_chunk_size=4096,
    sample_positions=32,
)
# Tiny: the architectures shrunk as a dry run shrinks them (2 layers, hidden 64, real heads and head_dim), with a
# 64-token pre-training window so the lengths below cross it as the real ones cross 4k/8k.
TINY_WINDOW = 64
TINY = Sizes(
    numerics_lengths=(32, 64, 128, 256),
    train_lengths=(128, 256),
    tiled_lengths=(256,),
    eval_lengths=(256, 512),
    search_length=512,
    numerics_layers=1,
    layers_7b=2,
    loss_chunk_size=64,
    sample_positions=8,
    tiny=True,
)


# ----------------------------------------------------------------------------------------------------------------
# FLOPs, costs and the budget


@dataclass(frozen=True)
class Flops:
    """Matmul FLOPs of a decoder-only model: 2 per weight per token (decoder layers and output head; the input
    embedding is a lookup) plus causal attention, 2 L^2 x heads x head_dim per layer forward (QK^T and AV over half the
    L x L square). Training model FLOPs are 3x the forward (backward 2x), as MFU counts them; the activation
    checkpoint recompute adds one more forward to the hardware FLOPs."""

    layers: int
    layer_weights: int
    head_weights: int
    attention_width: int

    @classmethod
    def of(cls, config: Any, layers: int | None = None) -> Flops:
        hidden = config.hidden_size
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
        attention = 2 * hidden * heads * head_dim + 2 * hidden * kv  # q, o and k, v projections
        return cls(
            layers if layers is not None else config.num_hidden_layers,
            attention + 3 * hidden * config.intermediate_size,
            config.vocab_size * hidden,
            heads * head_dim,
        )

    def forward(self, length: int, head_rows: int | None = None) -> float:
        """``head_rows``: the rows the output head scores (default every position)."""
        head = 2.0 * self.head_weights * (length if head_rows is None else head_rows)
        return (
            2.0 * self.layers * self.layer_weights * length
            + head
            + 2.0 * self.layers * self.attention_width * float(length) ** 2
        )

    def training(self, length: int) -> float:
        return 3.0 * self.forward(length)

    def training_with_recompute(self, length: int) -> float:
        return 4.0 * self.forward(length)


@dataclass
class Cell:
    """One measurement: a model x length x setting of a section, its estimated cost, and what came of it."""

    section: str
    label: str
    kind: str  # cells of one kind share a cost model (set-up and achieved FLOP rate)
    flops: float
    run: Callable[[], dict[str, Any]]
    info: dict[str, Any] = field(default_factory=dict)
    unavailable: str | None = None  # why it cannot run here (a missing package): skipped with this line
    builds_model: bool = True  # its device memory is freed afterwards
    status: str = "planned"
    line: str = ""
    estimate_s: float | None = None
    seconds: float | None = None
    result: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "section": self.section,
            "label": self.label,
            **self.info,
            "status": self.status,
            "line": self.line,
            "estimate_s": self.estimate_s,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            **self.result,
        }


class CostModel:
    """Seconds a cell will take: its kind's set-up time plus its FLOPs over the rate its kind last achieved (a prior
    until a cell of the kind has run), times a margin. Cells run smallest first, so the last cell of a kind is the
    closest in size to the next."""

    MARGIN = 1.15

    def __init__(
        self, default_setup_s: float, default_rate: float, priors: dict[str, tuple[float, float]] | None = None
    ):
        self.default = (default_setup_s, default_rate)
        self.priors = dict(priors or {})

    def _setup_and_rate(self, kind: str) -> tuple[float, float]:
        return self.priors.get(kind, self.default)

    def estimate(self, cell: Cell) -> float:
        setup, rate = self._setup_and_rate(cell.kind)
        return self.MARGIN * (setup + cell.flops / rate)

    def observe(self, cell: Cell, setup_s: float, compute_s: float) -> None:
        _, rate = self._setup_and_rate(cell.kind)
        if compute_s > 0 and cell.flops > 0:
            rate = cell.flops / compute_s
        self.priors[cell.kind] = (max(setup_s, 0.0), rate)


def choose(cells: Sequence[Cell], remaining_s: float, estimate: Callable[[Cell], float]) -> set[int]:
    """Indices of the cells that fit in ``remaining_s``, taken smallest estimate first: the largest are left out."""
    chosen: set[int] = set()
    used = 0.0
    for index in sorted(range(len(cells)), key=lambda i: estimate(cells[i])):
        cost = estimate(cells[index])
        if used + cost > remaining_s:
            break
        chosen.add(index)
        used += cost
    return chosen


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    message = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in message or "can't allocate memory" in message)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".strip().rstrip(":")


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def execute(cell: Cell, device: torch.device) -> None:
    """Run one cell: an OOM or any other failure becomes its status and line, never the end of the check."""
    started = time.perf_counter()
    failure: tuple[str, str] | None = None
    try:
        cell.result = dict(cell.run() or {})
        cell.status = "ok"
    except Exception as error:  # noqa: BLE001 - a cell reports whatever stopped it; the check goes on
        failure = ("oom" if is_out_of_memory(error) else "error", first_line(error))
    cell.seconds = time.perf_counter() - started
    # Outside the except block the traceback (and the tensors its frames hold) is gone, so the memory can be freed.
    # A full collection pauses every thread for a fraction of a second: only where device memory is to be had back.
    if (cell.builds_model and device.type == "cuda") or failure is not None:
        free_memory(device)
    if failure is not None:
        kind, message = failure
        cell.status = kind
        if kind == "oom":
            left = allocated_gib(device)
            cell.line = f"OOM: {message[:200]}; memory freed ({left:.2f} GiB still allocated), next cell"
            cell.result = {"allocated_after_oom_gib": left}
        else:
            cell.line = f"error: {message[:300]}"


def run_cells(
    cells: Sequence[Cell],
    deadline: float,
    costs: CostModel,
    device: torch.device,
    later: Sequence[Cell] = (),
    on_done: Callable[[Cell], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
    run: Callable[[Cell, torch.device], None] = execute,
) -> None:
    """Run ``cells`` in order within ``deadline``: before each, the cells still to run (these and ``later`` ones) are
    chosen smallest first while they fit in the time left; a cell not chosen is skipped."""
    pending = list(cells)
    while pending:
        cell = pending.pop(0)
        if cell.status != "planned":
            continue
        cell.estimate_s = round(costs.estimate(cell), 2)
        if cell.unavailable:
            cell.status, cell.line = "skipped", f"skipped: {cell.unavailable}"
        else:
            remaining = deadline - clock()
            waiting = [c for c in (*pending, *later) if c.status == "planned" and not c.unavailable]
            if 0 not in choose([cell, *waiting], remaining, costs.estimate):
                cell.status = "skipped: budget"
                cell.line = f"skipped: budget (estimated {cell.estimate_s:.1f} s, {max(remaining, 0.0):.1f} s left)"
            else:
                run(cell, device)
                if cell.status == "ok":
                    # Everything after the set-up does the cell's FLOPs (a training cell's warm-up step included).
                    setup = float(cell.result.get("setup_s", 0.0))
                    costs.observe(cell, setup, (cell.seconds or 0.0) - setup)
        if on_done is not None:
            on_done(cell)


# ----------------------------------------------------------------------------------------------------------------
# Memory and time on the device (CUDA allocator; the process's resident set on CPU)


def _proc_status_gib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # VmHWM restarts from the current RSS
    except OSError:
        pass


def allocated_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    return _proc_status_gib("VmRSS") or 0.0


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return _proc_status_gib("VmHWM") or 0.0


def reserved_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None


def measure_matmul(device: torch.device, tiny: bool) -> dict[str, float]:
    """The achieved dense matmul rate (bf16 on a GPU, fp32 on CPU): the MFU denominator when the device is not in
    the table, and the prior of every cost estimate."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" and not tiny else (256 if tiny else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    seconds = (time.perf_counter() - started) / repeats
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2.0 * n**3 / seconds}


# ----------------------------------------------------------------------------------------------------------------
# The environment


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def transformers_features() -> dict[str, bool]:
    """What the check uses of transformers that an older version may lack (each absence is noted)."""
    import inspect

    from transformers import LlamaForCausalLM, PreTrainedModel, TrainingArguments

    return {
        "TrainingArguments.activation_checkpointing": "activation_checkpointing"
        in {f.name for f in dataclasses.fields(TrainingArguments)},
        "forward(logits_to_keep=...)": "logits_to_keep" in inspect.signature(LlamaForCausalLM.forward).parameters,
        "set_attn_implementation": hasattr(PreTrainedModel, "set_attn_implementation"),
    }


def flash_attention_2_ready(device: torch.device) -> str | None:
    """None when flash_attention_2 can run here, else why not."""
    if device.type != "cuda":
        return "flash_attention_2 needs a CUDA device"
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn is not importable (pip install flash-attn)"
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        return f"transformers {_version('transformers')} does not accept flash-attn {_version('flash-attn')}"
    return None


def tiled_mlp_ready() -> str | None:
    if importlib.util.find_spec("deepspeed") is None:
        return "TiledMLP needs DeepSpeed, which is not importable (pip install deepspeed)"
    return None


def environment(device: torch.device, tiny: bool) -> dict[str, Any]:
    from longrope.throughput import peak_flops_for

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        **{name: _version(name) for name in ("transformers", "accelerate", "peft", "deepspeed", "flash-attn")},
        "device": str(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info["device_name"] = properties.name
        info["capability"] = f"{properties.major}.{properties.minor}"
        info["memory_gib"] = round(properties.total_memory / 2**30, 1)
        info["peak_bf16_flops_table"] = peak_flops_for(properties.name)
    else:
        info["device_name"] = platform.processor() or platform.machine()
        info["peak_bf16_flops_table"] = None
    info["matmul"] = measure_matmul(device, tiny)
    # The CPU reference's speed, for its first cost estimate (the GPU run's CPU is another machine's).
    info["cpu_matmul"] = info["matmul"] if device.type == "cpu" else measure_matmul(torch.device("cpu"), tiny)
    info["transformers_features"] = transformers_features()
    return info


# ----------------------------------------------------------------------------------------------------------------
# The check


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: a non-finite float becomes None (and the cell's line says why)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


class StepTimer(TrainerCallback):
    """Times the steps after the warm-up ones (the warm-up step also creates the optimizer state and picks kernels)
    and measures their peak memory from the memory in use when they begin."""

    def __init__(self, warmup: int, device: torch.device) -> None:
        self.warmup = warmup
        self.device = device
        self.start: float | None = None
        self.end: float | None = None
        self.base_gib = self.peak_gib = 0.0
        self.reserved_gib: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.start is None and state.global_step == self.warmup:
            synchronize(self.device)
            reset_peak(self.device)
            self.base_gib = allocated_gib(self.device)
            self.start = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == state.max_steps:
            synchronize(self.device)
            self.end = time.perf_counter()
            self.peak_gib = peak_gib(self.device)
            self.reserved_gib = reserved_gib(self.device)


class GpuCheck:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.device = torch.device(options.device)
        self.sizes = TINY if options.tiny else FULL
        if options.numerics_layers is not None:
            self.sizes = dataclasses.replace(self.sizes, numerics_layers=options.numerics_layers)
        self.sections = tuple(options.sections)
        self.seed = options.seed
        self.output_dir = Path(options.output_dir or (TINY_RESULTS if options.tiny else RESULTS))
        self.lock = threading.RLock()  # the logits and cells the CPU reference thread fills
        self.write_lock = threading.Lock()  # one writer at a time, so the newest state is the one left on disk
        self.notes: list[str] = []
        self.cells: list[Cell] = []
        self.reference_cells: list[Cell] = []
        self.device_logits: dict[tuple[str, str, int], torch.Tensor] = {}
        self.reference_logits: dict[tuple[str, int], torch.Tensor] = {}
        self.comparisons: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.numerics_model: Any = None
        self.reference_model: Any = None
        self.started = time.perf_counter()
        self.last_write = -math.inf
        self.env: dict[str, Any] = {}

    # -- configuration ------------------------------------------------------------------------------------------

    def shape_config(self, name: str, layers: int | None) -> Any:
        """The architecture of ``name`` with ``layers`` decoder layers; tiny: its dry-run shrink with a 64-token
        window."""
        from longrope.architectures import architecture_config, architecture_values, dry_run_config

        if not self.sizes.tiny:
            return architecture_config(name, overrides={"num_hidden_layers": layers} if layers else None)
        theta = architecture_values(name)["rope_parameters"]["rope_theta"]
        overrides = {
            "max_position_embeddings": TINY_WINDOW,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        }
        config = dry_run_config(name, overrides=overrides)
        if layers is not None:
            config.num_hidden_layers = min(layers, config.num_hidden_layers)
        return config

    def model_args(self, name: str, dtype: str | None = None, attention: str = "auto") -> Any:
        from longrope.args import ModelArguments

        dtype = dtype or ("bfloat16" if self.device.type == "cuda" else "float32")
        return ModelArguments(model_name_or_path=name, attn_implementation=attention, dtype=dtype)

    def build(self, name: str, config: Any, resolved: Any = None, options: Any = None, **model_keys: Any) -> Any:
        """The model through longrope.modeling.prepare_model, its weights created on the device."""
        from longrope.modeling import prepare_model

        torch.manual_seed(self.seed)
        with torch.device(self.device):
            return prepare_model(self.model_args(name, **model_keys), resolved, options, config=config)

    def tokens(self, vocab: int, length: int, salt: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + length + salt)
        return torch.randint(0, vocab, (length,), generator=generator)

    @property
    def peak_flops(self) -> float:
        return self.env.get("peak_bf16_flops_table") or self.env["matmul"]["flops_per_s"]

    # -- 1. numerics --------------------------------------------------------------------------------------------

    def numerics_scalings(self, config: Any) -> dict[str, rope.RopeScaling]:
        geometry = rope.RopeGeometry.from_config(config)
        target = max(self.sizes.numerics_lengths)
        scale = target / geometry.original_max_position_embeddings
        generator = torch.Generator().manual_seed(self.seed)
        pairs = geometry.num_pairs
        # Factors shaped like a search result: monotone, 1 at the highest frequency, up to 1.25 s (the search space).
        long = sorted((1.0 + (1.25 * scale - 1.0) * torch.rand(pairs, generator=generator)).tolist())
        short = sorted((1.0 + 0.25 * torch.rand(pairs, generator=generator)).tolist())
        long, short = [1.0, *long[1:]], [1.0, *short[1:]]
        return {
            "pi": rope.build_scaling("pi", geometry, target),
            "yarn": rope.build_scaling("yarn", geometry, target),
            "longrope_start_tokens": rope.longrope_scaling(geometry, target, long, start_tokens=START_TOKENS),
            "longrope_short_long": rope.longrope_scaling(geometry, target, long, short_factors=short),
        }

    def sample_rows(self, length: int) -> torch.Tensor:
        return torch.linspace(0, length - 1, self.sizes.sample_positions).round().long().unique()

    def sampled_logits(self, model: Any, length: int) -> tuple[torch.Tensor, str]:
        """Logits at the sampled positions of one random sequence, and the factor set the installed module served."""
        from longrope.perplexity import input_device

        device = input_device(model)
        ids = self.tokens(model.config.vocab_size, length).to(device)[None]
        positions = torch.arange(length, device=device)[None]
        with torch.inference_mode():
            output = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False)
            hidden = output.last_hidden_state[0, self.sample_rows(length).to(device)]
            logits = model.get_output_embeddings()(hidden)
        module = rope.installed_modules(model)[0]
        sequence_length = int(module.sequence_lengths(positions.cpu()).item())
        has_short = module.scaling.short_factors is not None
        window = module.scaling.geometry.original_max_position_embeddings
        return logits.cpu(), "short" if has_short and sequence_length <= window else "long"

    def prepare_numerics(self) -> None:
        """The reference model (fp32, CPU) and its bf16 copy on the device: the same weights."""
        config = self.shape_config(SHAPE_1B, self.sizes.numerics_layers)
        self.numerics_config = config
        self.scalings = self.numerics_scalings(config)
        torch.manual_seed(self.seed)
        from longrope.modeling import prepare_model

        with torch.device("cpu"):
            reference = prepare_model(self.model_args(SHAPE_1B, "float32", "sdpa"), None, None, config=config)
        self.reference_model = reference.eval()
        self.numerics_model = copy.deepcopy(self.reference_model).to(device=self.device, dtype=torch.bfloat16)
        rope.install(self.reference_model, self.scalings["pi"])
        rope.install(self.numerics_model, self.scalings["pi"])

    def plan_numerics(self) -> list[Cell]:
        """The two models and the cells: the device's here, the CPU reference's in self.reference_cells."""
        self.prepare_numerics()
        self.numerics_description = (
            f"{model_label(SHAPE_1B, self.numerics_config)} (random init), bf16 on {self.device.type} against "
            f"fp32 on CPU, logits at {self.sizes.sample_positions} positions spread over each length"
        )
        device_cells, self.reference_cells = self.numerics_cells()
        return device_cells

    def numerics_cells(self) -> tuple[list[Cell], list[Cell]]:
        config = self.numerics_config
        rows = self.sizes.sample_positions
        flops = Flops.of(config)
        device_cells, reference_cells = [], []
        flash = flash_attention_2_ready(self.device)
        for length in self.sizes.numerics_lengths:
            for method in NUMERICS_METHODS:
                info = {"method": method, "length": length}
                reference_cells.append(
                    Cell(
                        "numerics",
                        f"fp32 CPU reference, {method}, {length:,} tokens",
                        "reference",
                        flops.forward(length, rows),
                        lambda method=method, length=length: self._numerics_reference(method, length),
                        info,
                        builds_model=False,
                    )
                )
                for attention, unavailable in (("sdpa", None), ("flash_attention_2", flash)):
                    device_cells.append(
                        Cell(
                            "numerics",
                            f"bf16 {attention}, {method}, {length:,} tokens",
                            "numerics",
                            flops.forward(length, rows),
                            lambda m=method, a=attention, n=length: self._numerics_device(m, a, n),
                            {**info, "attention": attention},
                            unavailable=unavailable,
                            builds_model=False,
                        )
                    )
        probe = Cell(
            "numerics",
            f"sdpa through torch's flash kernel only, {self.sizes.numerics_lengths[0]:,} tokens",
            "numerics",
            flops.forward(self.sizes.numerics_lengths[0], rows),
            self._flash_kernel_probe,
            {"probe": "sdpa_flash_kernel", "length": self.sizes.numerics_lengths[0]},
            builds_model=False,
        )
        return [probe, *device_cells], reference_cells

    def _use_attention(self, model: Any, attention: str) -> None:
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attention)
        else:  # older transformers read the kernel from the config at every forward
            model.config._attn_implementation = attention

    def _numerics_device(self, method: str, attention: str, length: int) -> dict[str, Any]:
        model = self.numerics_model
        self._use_attention(model, attention)
        rope.install(model, self.scalings[method])
        synchronize(self.device)
        started = time.perf_counter()
        logits, served = self.sampled_logits(model, length)
        seconds = time.perf_counter() - started
        with self.lock:
            self.device_logits[(method, attention, length)] = logits
        return {"factors_served": served, "compute_s": seconds, "setup_s": 0.0}

    def _numerics_reference(self, method: str, length: int) -> dict[str, Any]:
        model = self.reference_model
        rope.install(model, self.scalings[method])
        started = time.perf_counter()
        logits, served = self.sampled_logits(model, length)
        with self.lock:
            self.reference_logits[(method, length)] = logits.float()
        return {"factors_served": served, "compute_s": time.perf_counter() - started, "setup_s": 0.0}

    def _flash_kernel_probe(self) -> dict[str, Any]:
        """Whether torch's flash kernel alone serves transformers' sdpa path (no L x L mask is built), which the
        linear memory of every long-context number here rests on."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        model = self.numerics_model
        self._use_attention(model, "sdpa")
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                self.sampled_logits(model, self.sizes.numerics_lengths[0])
        except (RuntimeError, NotImplementedError) as error:  # torch: "No available kernel"
            return {"flash_kernel": False, "why_not": first_line(error)[:300]}
        return {"flash_kernel": True}

    def compare(self) -> None:
        """Errors of every device cell whose reference exists (computed once)."""
        with self.lock:
            for (method, attention, length), logits in self.device_logits.items():
                key = (method, attention, length)
                reference = self.reference_logits.get((method, length))
                if key in self.comparisons or reference is None:
                    continue
                difference = (logits.float() - reference).abs()
                scale = reference.abs().max().item()
                self.comparisons[key] = {
                    "max_abs_error": difference.max().item(),
                    "max_rel_error": difference.max().item() / scale if scale else None,
                    "mean_abs_error": difference.mean().item(),
                    "top1_agreement": (logits.float().argmax(-1) == reference.argmax(-1)).float().mean().item(),
                    "reference_max_abs_logit": scale,
                }

    # -- 2. training --------------------------------------------------------------------------------------------

    def training_cells(self) -> list[Cell]:
        tiled = tiled_mlp_ready()
        models = [(SHAPE_1B, None), (SHAPE_7B, self.sizes.layers_7b)]
        cells = []
        for name, layers in models:
            config = self.shape_config(name, layers)
            flops = Flops.of(config)
            for length in self.sizes.train_lengths:
                steps = WARMUP_STEPS + self.sizes.measured_steps(length)
                cells.append(self._training_cell(name, layers, config, flops, length, steps, tiled=False))
            if name == SHAPE_1B:
                for length in self.sizes.tiled_lengths:
                    steps = WARMUP_STEPS + self.sizes.measured_steps(length)
                    cells.append(
                        self._training_cell(name, layers, config, flops, length, steps, tiled=True, unavailable=tiled)
                    )
        return cells

    def _training_cell(self, name, layers, config, flops, length, steps, tiled, unavailable=None) -> Cell:  # noqa: ANN001
        label = f"{model_label(name, config)}, {length:,} tokens" + (", TiledMLP" if tiled else "")
        return Cell(
            "training",
            label,
            f"train {name}",
            steps * flops.training_with_recompute(length),
            lambda: self._train(name, layers, config, length, tiled),
            {"model": model_label(name, config), "length": length, "tiled_mlp": tiled},
            unavailable=unavailable,
        )

    def training_keys(self, directory: str, steps: int, tiled: bool) -> dict[str, Any]:
        from transformers import TrainingArguments

        names = {f.name for f in dataclasses.fields(TrainingArguments)}
        # transformers renamed gradient_checkpointing to activation_checkpointing; either turns it on.
        checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
        cuda = self.device.type == "cuda"
        return {
            "output_dir": directory,
            "per_device_train_batch_size": 1,
            "gradient_accumulation_steps": 1,
            "max_steps": steps,
            "learning_rate": 1e-5,
            "lr_scheduler_type": "constant",
            checkpointing: True,
            "loss_chunk_size": self.sizes.loss_chunk_size,
            "logging_strategy": "no",
            "save_strategy": "no",
            "report_to": "none",
            "disable_tqdm": True,
            "remove_unused_columns": False,
            "dataloader_num_workers": 0,
            "seed": self.seed,
            "use_cpu": not cuda,
            "bf16": cuda,
            "tiled_mlp": tiled,
        }

    def _train(self, name: str, layers: int | None, config: Any, length: int, tiled: bool) -> dict[str, Any]:
        import numpy as np
        from transformers.trainer_callback import PrinterCallback

        from longrope.memory_estimate import estimate_memory
        from longrope.packing import PackedCollator
        from longrope.rope_config import ResolvedRope
        from longrope.throughput import ThroughputCallback, count_parameters
        from longrope.train_args import LongRopeTrainingArguments
        from longrope.trainer import LongContextTrainer

        started = time.perf_counter()
        measured = self.sizes.measured_steps(length)
        steps = WARMUP_STEPS + measured
        geometry = rope.RopeGeometry.from_config(config)
        resolved = ResolvedRope(rope.build_scaling("yarn", geometry, max(self.sizes.train_lengths)))
        before = allocated_gib(self.device)
        with tempfile.TemporaryDirectory(prefix="gpu-check-") as directory:
            args = LongRopeTrainingArguments(**self.training_keys(directory, steps, tiled))
            if not hasattr(args, "activation_checkpointing"):
                args.activation_checkpointing = True  # what the estimate reads (older transformers: the old name)
            model_args = self.model_args(name)
            model = self.build(name, config, resolved, args)
            parameters = count_parameters(model)
            gradient_gib = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) / 2**30
            rows = [
                {
                    "input_ids": self.tokens(config.vocab_size, length, salt=row).numpy(),
                    "position_ids": np.arange(length),
                }
                for row in range(steps)
            ]
            timer = StepTimer(WARMUP_STEPS, self.device)
            logged = ThroughputCallback(length, parameters, 1, self.peak_flops)
            trainer = LongContextTrainer(
                model=model,
                args=args,
                train_dataset=rows,
                data_collator=PackedCollator(),
                callbacks=[logged, timer],
            )
            trainer.remove_callback(PrinterCallback)  # the timer and this check report; no metrics dicts on stdout
            attention = model.config._attn_implementation
            setup_s = time.perf_counter() - started
            try:
                output = trainer.train()
            finally:
                if self.device.type == "cuda":
                    trainer.accelerator.free_memory()  # the engine's references to model and optimizer
            logged_metrics = logged.metrics(steps)
            del trainer, model
            estimate = estimate_memory(config, args, length, world_size=1, model_args=model_args)
        compute_s = timer.end - timer.start
        tokens_per_second = measured * length / compute_s
        model_flops_per_s = Flops.of(config).training(length) / length * tokens_per_second
        peak_flops = self.peak_flops
        loss = float(output.training_loss)
        result = {
            "setup_s": setup_s,
            "compute_s": compute_s,
            "attention": attention,
            "parameters": parameters,
            "measured_steps": measured,
            "loss": loss,
            "tokens_per_second": tokens_per_second,
            "model_tflops_per_s": model_flops_per_s / 1e12,
            "mfu": model_flops_per_s / peak_flops,
            "mfu_vs_measured_matmul": model_flops_per_s / self.env["matmul"]["flops_per_s"],
            "mfu_6n": 6 * parameters * tokens_per_second / peak_flops,
            "logged_by_train_py": logged_metrics,
            "memory": self._memory_comparison(estimate, before, timer, gradient_gib),
        }
        if not math.isfinite(loss):
            raise LongRopeError(f"training loss is {loss} at {length} tokens")
        return result

    def _memory_comparison(self, estimate: Any, before: float, timer: StepTimer, gradient_gib: float) -> dict:
        """The estimate's components beside what the run held. Measured: weights and optimizer state when a measured
        step begins (gradients are freed between steps), plus the gradients; the step's own peak above that start
        (activations, logits chunks, gradients); the whole peak."""
        rows = {row[0]: row[1] for row in estimate.rows}
        states = rows.get("model states (weights, grads, Adam)", 0.0)
        activations = sum(value for key, value in rows.items() if key.startswith(("checkpointed", "layer recompute")))
        activations += rows.get("activations (no checkpointing)", 0.0)
        logits = rows.get("logits and loss", 0.0)
        overhead = rows.get("overhead", 0.0)
        # The estimate's 16 B per parameter hold gradients of the weights' width: the same bytes as measured.
        grads_estimated = gradient_gib
        measured_states = timer.base_gib - before + gradient_gib
        # On CPU these are the process's resident set, whose counters lag by a few pages: never below zero.
        measured_step = max(timer.peak_gib - timer.base_gib, 0.0)
        measured_total = timer.peak_gib - before
        return {
            "estimate_rows_gib": {key: round(value, 3) for key, value in rows.items()},
            "estimate_total_gib": round(estimate.gpu_gib, 3),
            "measured_peak_allocated_gib": round(timer.peak_gib, 3),
            "measured_peak_reserved_gib": None if timer.reserved_gib is None else round(timer.reserved_gib, 3),
            "measured_before_model_gib": round(before, 3),
            "states": {
                "estimate_gib": round(states, 3),
                "measured_gib": round(measured_states, 3),
                "estimate_over_measured": _ratio(states, measured_states),
            },
            "step": {
                "estimate_gib": round(activations + logits + grads_estimated, 3),
                "measured_gib": round(measured_step, 3),
                "estimate_over_measured": _ratio(activations + logits + grads_estimated, measured_step),
            },
            "total_without_overhead": {
                "estimate_gib": round(estimate.gpu_gib - overhead, 3),
                "measured_gib": round(measured_total, 3),
                "estimate_over_measured": _ratio(estimate.gpu_gib - overhead, measured_total),
            },
        }

    # -- 3. evaluation and search -------------------------------------------------------------------------------

    def evaluation_cells(self) -> list[Cell]:
        config = self.shape_config(SHAPE_7B, self.sizes.layers_7b)
        flops = Flops.of(config)
        label = model_label(SHAPE_7B, config)
        cells = [
            Cell(
                "evaluation",
                f"perplexity (sequence_nll), {label}, {length:,} tokens",
                "evaluate",
                flops.forward(length),
                lambda length=length: self._evaluate(config, length),
                {"what": "sequence_nll", "model": label, "length": length},
            )
            for length in self.sizes.eval_lengths
        ]
        length = self.sizes.search_length
        cells.append(
            Cell(
                "evaluation",
                f"one search candidate (Fitness.install + sample_nll), {label}, {length:,} tokens",
                "evaluate",
                flops.forward(length),
                lambda: self._search_candidate(config, length),
                {"what": "search_candidate", "model": label, "length": length},
            )
        )
        return cells

    def _eval_model(self, config: Any, resolved: Any = None) -> Any:
        return self.build(SHAPE_7B, config, resolved).eval()

    def _evaluate(self, config: Any, length: int) -> dict[str, Any]:
        from longrope.perplexity import sequence_nll
        from longrope.rope_config import ResolvedRope

        started = time.perf_counter()
        geometry = rope.RopeGeometry.from_config(config)
        model = self._eval_model(
            config, ResolvedRope(rope.build_scaling("yarn", geometry, max(self.sizes.eval_lengths)))
        )
        ids = self.tokens(config.vocab_size, length)
        warmup = min(length, 4 * self.sizes.loss_chunk_size)
        sequence_nll(model, ids[:warmup], loss_chunk_size=self.sizes.loss_chunk_size)  # kernels picked, caches made
        synchronize(self.device)
        reset_peak(self.device)
        base = allocated_gib(self.device)
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        result = sequence_nll(model, ids, loss_chunk_size=self.sizes.loss_chunk_size)
        synchronize(self.device)
        compute_s = time.perf_counter() - started
        nll = result.nll_sum / result.scored_tokens
        if not math.isfinite(nll):
            raise LongRopeError(f"sequence_nll is {nll} at {length} tokens")
        return {
            "setup_s": setup_s,
            "compute_s": compute_s,
            "attention": model.config._attn_implementation,
            "tokens_per_second": length / compute_s,
            "forward_tflops_per_s": Flops.of(config).forward(length) / compute_s / 1e12,
            "nll_per_token": nll,
            "weights_gib": round(base, 3),
            "peak_allocated_gib": round(peak_gib(self.device), 3),
            "peak_above_weights_gib": round(peak_gib(self.device) - base, 3),
        }

    def _search_candidate(self, config: Any, length: int) -> dict[str, Any]:
        from longrope.args import RopeArguments
        from longrope.perplexity import sequence_nll
        from longrope.search_stages import SearchArguments, plan_stage, scaling_for
        from longrope.searcher import Fitness

        started = time.perf_counter()
        model = self._eval_model(config)
        # The keys search.py would read; Fitness writes nothing, and the samples are given, not read.
        args = SearchArguments(
            documents_path="(random tokens)",
            num_documents=1,
            output_dir=str(self.output_dir),
            loss_chunk_size=self.sizes.loss_chunk_size,
        )
        plan = plan_stage(args, RopeArguments(target_length=length), model.config)
        sample = self.tokens(config.vocab_size, length, salt=7).tolist()
        fitness = Fitness(model, args, plan, [sample])
        candidate = plan.seeds.get("yarn") or next(iter(plan.seeds.values()))
        fitness.install(scaling_for(args, plan, candidate))  # the first install builds the module: not timed
        warmup = min(length, 4 * self.sizes.loss_chunk_size)
        sequence_nll(model, sample[:warmup], loss_chunk_size=self.sizes.loss_chunk_size)  # kernels picked
        synchronize(self.device)
        reset_peak(self.device)
        base = allocated_gib(self.device)
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        fitness.install(scaling_for(args, plan, candidate))
        synchronize(self.device)
        install_s = time.perf_counter() - started
        nll = fitness.sample_nll(0)
        synchronize(self.device)
        compute_s = time.perf_counter() - started
        if not math.isfinite(nll):
            raise LongRopeError(f"sample_nll is {nll} at {length} tokens")
        return {
            "setup_s": setup_s,
            "compute_s": compute_s,
            "install_s": install_s,
            "sample_s": compute_s - install_s,
            "tokens_per_second": length / compute_s,
            "forward_tflops_per_s": Flops.of(config).forward(length) / compute_s / 1e12,
            "nll_per_token": nll,
            "peak_allocated_gib": round(peak_gib(self.device), 3),
            "peak_above_weights_gib": round(peak_gib(self.device) - base, 3),
        }

    # -- projection ---------------------------------------------------------------------------------------------

    def projection(self) -> dict[str, Any]:
        """Projected cost of the paper's searches for LLaMA2-7B from the measured 4-layer forwards (scaled to 32
        layers by FLOPs at the achieved rate)."""
        from longrope.architectures import architecture_config

        measured = [c for c in self.cells if c.section == "evaluation" and c.status == "ok"]
        forwards = sorted((c for c in measured if c.info["what"] == "sequence_nll"), key=lambda c: c.info["length"])
        candidate = next((c for c in measured if c.info["what"] == "search_candidate"), None)
        assumptions = [
            f"per-sample time: the forward FLOPs of all {FULL_7B_LAYERS} LLaMA2-7B layers at the target length, at the "
            "FLOP rate sequence_nll achieved on the "
            f"{self.sizes.layers_7b}-layer shape at the largest measured length not above the target (the smallest "
            "measured one beyond it)",
            "paper mode: every candidate of Algorithm 1 scored on all N samples: population + generations x "
            "(mutations + crossovers) candidates, settings from configs/llama2-7b/search-*.yaml",
            "fast mode: the paper mode's tokens x the token ratio fast mode needed to reach the paper mode's final "
            "fitness on the tiny model (benchmarks/README.md); assumed to carry over to LLaMA2-7B",
            "GPU-hours count every GPU of an evaluator (gpus_per_process, from the config's launch line); "
            "installing a candidate adds its measured time once per candidate",
            "evaluator peak: all 32 layers' bf16 weights plus the measured working set above the weights (one "
            "layer's at a time, so independent of depth) grown linearly with the length; a device_map over "
            "gpus_per_process GPUs divides the weights, not that working set",
        ]
        if self.sizes.tiny:
            assumptions.append("tiny run: the rates are a tiny model's on this device, so the hours mean nothing")
        if not forwards:
            return {"assumptions": assumptions, "rows": [], "line": "no sequence_nll cell ran: nothing to project"}
        full = Flops.of(architecture_config(SHAPE_7B))
        measured_flops = Flops.of(self.shape_config(SHAPE_7B, self.sizes.layers_7b))
        measured_rates = {
            c.info["length"]: measured_flops.forward(c.info["length"]) / c.result["compute_s"] for c in forwards
        }
        ratio = fast_token_ratio()
        install_s = candidate.result["install_s"] if candidate else 0.0
        rows = []
        for target, path in SEARCH_CONFIGS.items():
            settings = search_settings(REPO_ROOT / path)
            below = [length for length in measured_rates if length <= target]
            rate_length = max(below) if below else min(measured_rates)
            sample_s = full.forward(target) / measured_rates[rate_length]
            candidates = settings["population_size"] + settings["num_generations"] * (
                settings["num_mutations"] + settings["num_crossovers"]
            )
            samples = settings["num_documents"]
            gpus = settings["gpus_per_process"]
            paper_hours = candidates * (install_s + samples * sample_s) * gpus / 3600
            rows.append(
                {
                    "target_length": target,
                    "config": path,
                    "num_documents": samples,
                    "candidates_paper_mode": candidates,
                    "gpus_per_evaluator": gpus,
                    "rate_from_length": rate_length,
                    "sample_s": sample_s,
                    "paper_mode_tokens": candidates * samples * target,
                    "paper_mode_gpu_hours": paper_hours,
                    "fast_mode_gpu_hours": paper_hours * ratio,
                    "projected_peak_gib": self._projected_peak(forwards, full, target),
                }
            )
        result = {"assumptions": assumptions, "fast_token_ratio": ratio, "install_s": install_s, "rows": rows}
        if candidate is not None:
            same = next((c for c in forwards if c.info["length"] == candidate.info["length"]), None)
            if same is not None:
                result["sample_nll_over_sequence_nll"] = _ratio(candidate.result["sample_s"], same.result["compute_s"])
        return result

    def _projected_peak(self, forwards: list[Cell], full: Flops, target: int) -> float:
        """An evaluator's peak at ``target``: the 32-layer bf16 weights plus the measured inference working set above
        the weights (one layer's, independent of depth) grown linearly from the largest measured length."""
        largest = forwards[-1]
        working = largest.result["peak_above_weights_gib"] * target / largest.info["length"]
        weights = (full.layers * full.layer_weights + 2 * full.head_weights) * 2 / 2**30
        return round(weights + working, 1)

    # -- the run ------------------------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        self.compare()
        with self.lock:
            numerics_rows = []
            for cell in self.cells:
                if cell.section != "numerics":
                    continue
                row = cell.as_dict()
                if "probe" not in cell.info:
                    key = (cell.info["method"], cell.info["attention"], cell.info["length"])
                    reference = next(
                        c
                        for c in self.reference_cells
                        if (c.info["method"], c.info["length"]) == (cell.info["method"], cell.info["length"])
                    )
                    row["reference_status"] = reference.status
                    row["reference_line"] = reference.line
                    row.update(self.comparisons.get(key, {}))
                numerics_rows.append(row)
            report = {
                "check": NAME,
                "command": "python -m benchmarks.gpu_check " + " ".join(self.options.argv),
                "elapsed_s": round(time.perf_counter() - self.started, 1),
                "budget_s": self.options.budget_s,
                "sections": list(self.sections),
                "environment": self.env,
                "notes": list(self.notes),
                "numerics": {
                    "model": getattr(self, "numerics_description", None),
                    "methods": NUMERICS_METHODS,
                    "cells": numerics_rows,
                    "reference_cells": [c.as_dict() for c in self.reference_cells],
                },
                "training": {
                    "assumptions": TRAINING_ASSUMPTIONS,
                    "cells": [c.as_dict() for c in self.cells if c.section == "training"],
                },
                "evaluation": {"cells": [c.as_dict() for c in self.cells if c.section == "evaluation"]},
            }
        try:
            report["search_projection"] = self.projection() if "evaluation" in self.sections else {"rows": []}
        except Exception as error:  # noqa: BLE001 - a projection is derived; the measurements stand without it
            report["search_projection"] = {"rows": [], "line": f"projection failed: {first_line(error)[:300]}"}
        return _finite(report)

    def write(self, at_most_every_s: float = 0.0) -> dict[str, Any] | None:
        """Both files, from the state of now; with ``at_most_every_s`` only if the last write is that old (every cell
        of a GPU run takes seconds, the tiny run's cells milliseconds)."""
        with self.write_lock:
            if time.perf_counter() - self.last_write < at_most_every_s:
                return None
            report = self.report()
            atomic_write_json(self.output_dir / f"{NAME}.json", report)
            try:
                text = markdown(report)
            except Exception as error:  # noqa: BLE001 - the JSON holds every number; never lose it to the table
                text = f"# GPU check\n\nThe table could not be written ({first_line(error)}); see {NAME}.json.\n"
            atomic_write_text(self.output_dir / f"{NAME}.md", text)
            self.last_write = time.perf_counter()
        return report

    def announce(self, cell: Cell, lane: str = "") -> None:
        if cell.status == "skipped":
            return  # a missing package: one note says so for all its cells
        took = "" if cell.seconds is None else f" ({cell.seconds:.1f} s)"
        # One write per line: the CPU reference thread prints too.
        sys.stdout.write(f"[{lane or cell.section}] {cell.label}: {summary(cell)}{took}\n")
        sys.stdout.flush()

    def run(self) -> dict[str, Any]:
        check_output_dir(self.output_dir)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise LongRopeError("device: cuda, but torch sees no CUDA device; run with --device cpu --tiny")
        threads = torch.get_num_threads()
        if self.sizes.tiny:
            # Tiny matmuls: thread hand-offs cost more than they save (20x on a busy 2-core machine).
            torch.set_num_threads(1)
        elif self.device.type == "cuda" and "numerics" in self.sections:
            # The CPU reference runs beside the GPU work: leave a core to the thread that drives the GPU.
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 2))
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # the cells' lines, not transformers' notes on each model built
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)
            transformers_logging.set_verbosity(verbosity)

    def _run(self) -> dict[str, Any]:
        deadline = self.started + self.options.budget_s
        self.env = environment(self.device, self.sizes.tiny)
        for feature, present in self.env["transformers_features"].items():
            if not present:
                self.notes.append(f"transformers {_version('transformers')} lacks {feature}; cells that need it fail")
        for reason in (flash_attention_2_ready(self.device), tiled_mlp_ready()):
            if reason:
                self.notes.append(f"skipped: {reason}")
        print(
            f"gpu_check: {self.env['device_name']}, torch {self.env['torch']}, transformers "
            f"{self.env['transformers']}, budget {self.options.budget_s:.0f} s, sections {', '.join(self.sections)}",
            flush=True,
        )
        sections: dict[str, list[Cell]] = {}
        lane = None
        planners = {
            "numerics": self.plan_numerics,
            "training": self.training_cells,
            "evaluation": self.evaluation_cells,
        }
        for name in self.sections:
            try:
                sections[name] = planners[name]()
            except Exception as error:  # noqa: BLE001 - e.g. an older transformers: say so, run the other sections
                self.notes.append(f"{name}: not run, its set-up failed: {first_line(error)[:300]}")
                self.numerics_model = None if name == "numerics" else self.numerics_model
        if self.reference_cells:
            # Attention runs at about a third of the matmul rate on CPU (measured on this project's 2-core machine).
            reference_costs = CostModel(0.0, 0.3 * self.env["cpu_matmul"]["flops_per_s"])
            lane = threading.Thread(
                target=run_cells,
                args=(self.reference_cells, deadline, reference_costs, torch.device("cpu")),
                kwargs={"on_done": self._reference_done},
                daemon=True,
            )
            lane.start()
        costs = self.main_costs()
        for cells in sections.values():
            cells.sort(key=costs.estimate)  # smallest first: each cell's time refines the next one's estimate
            self.cells.extend(cells)  # the report lists them in the order they run
        order = list(sections)
        for index, name in enumerate(order):
            later = [cell for other in order[index + 1 :] for cell in sections[other]]
            run_cells(sections[name], deadline, costs, self.device, later, on_done=self._done)
            if name == "numerics":
                self.numerics_model = None  # its GPU memory must not count in the training peaks
                free_memory(self.device)
        if lane is not None:
            # A reference cell runs past the deadline only by its estimate's error; the lease must not.
            lane.join(timeout=max(0.0, deadline - time.perf_counter()) + 45.0)
            if lane.is_alive():
                self.notes.append("the CPU reference overran the budget; its unfinished cells are not compared")
        report = self.write()
        print((self.output_dir / f"{NAME}.md").read_text(), flush=True)
        return report

    def _done(self, cell: Cell) -> None:
        self.announce(cell)
        self.write(WRITE_EVERY_S)

    def _reference_done(self, cell: Cell) -> None:
        self.announce(cell, "reference")
        self.write(WRITE_EVERY_S)

    def main_costs(self) -> CostModel:
        """Priors from the measured matmul rate: training reaches about a third of it (recompute, attention, the
        optimizer), a forward about half; set-up is model building (and a Trainer)."""
        rate = self.env["matmul"]["flops_per_s"]
        tiny = self.sizes.tiny
        priors = {f"train {name}": (1.0 if tiny else 15.0, 0.3 * rate) for name in (SHAPE_1B, SHAPE_7B)}
        priors["evaluate"] = (0.2 if tiny else 6.0, 0.4 * rate)
        priors["numerics"] = (0.0, 0.3 * rate)
        return CostModel(1.0, 0.3 * rate, priors)


TRAINING_ASSUMPTIONS = [
    "one GPU, no DeepSpeed: the Trainer's bf16 autocast over a bf16 model and torch AdamW (moments in bf16), so model "
    "states are 8 B per parameter where the recipes' DeepSpeed bf16 + fp32 master weights and Adam hold 16 B; the "
    "estimate (estimate_memory with world_size 1, no ZeRO-3) counts 16 B: its states ratio is about 2 by construction",
    "step: the peak of the measured steps above the memory in use when they begin (weights and optimizer state), "
    "i.e. activations, logits chunks and gradients; the estimate's activation, logits and gradient bytes beside it",
    "MFU: model FLOPs (6 x matmul weights + causal attention, no recompute) per second over the device's dense bf16 "
    "peak from longrope.throughput's table (else the measured matmul); mfu_6n is the training logs' 6 N definition, "
    "which leaves attention out",
    "the CUDA context, NCCL buffers and fragmentation (the estimate's 3 GiB overhead) are outside "
    "max_memory_allocated: compared without them",
]


def model_label(name: str, config: Any) -> str:
    short = {SHAPE_1B: "Llama-3.2-1B shape", SHAPE_7B: "LLaMA2-7B shape"}[name]
    layers = config.num_hidden_layers
    return f"{short}, {layers} layer{'s' if layers != 1 else ''}, hidden {config.hidden_size}"


def fast_token_ratio() -> float:
    import json

    path = RESULTS / "search_efficiency.json"
    try:
        return float(json.loads(path.read_text())["median_token_ratio"])
    except (OSError, KeyError, ValueError, TypeError):
        return FAST_TOKEN_RATIO


def search_settings(path: Path) -> dict[str, int]:
    """Population, operators, generations, N samples and GPUs per evaluator of a shipped search config."""
    import yaml

    from longrope.evolution import EvolutionConfig

    text = path.read_text()
    config = yaml.safe_load(text)
    evolution = config.get("evolution") or {}
    defaults = {f.name: f.default for f in dataclasses.fields(EvolutionConfig)}
    settings = {
        key: int(evolution.get(key, defaults[key]))
        for key in ("population_size", "num_mutations", "num_crossovers", "num_generations")
    }
    settings["num_documents"] = int(config.get("num_documents") or 5)
    launch = re.search(r"--gpus_per_process\s+(\d+)", text)
    settings["gpus_per_process"] = int(config.get("gpus_per_process") or (launch.group(1) if launch else 1))
    return settings


# ----------------------------------------------------------------------------------------------------------------
# Text


def summary(cell: Cell) -> str:
    """One line per cell: its status, or its headline numbers."""
    if cell.status != "ok":
        return cell.line or cell.status
    result = cell.result
    if cell.section == "training":
        memory = result["memory"]
        return (
            f"{result['tokens_per_second']:,.0f} tok/s, MFU {100 * result['mfu']:.1f}% (6N: "
            f"{100 * result['mfu_6n']:.1f}%), peak {memory['measured_peak_allocated_gib']:.2f} GiB, step "
            f"{memory['step']['measured_gib']:.2f} GiB (estimate {_number(memory['step']['estimate_over_measured'])}x)"
        )
    if cell.section == "evaluation":
        return (
            f"{result['tokens_per_second']:,.0f} tok/s, {result['compute_s']:.2f} s, peak "
            f"{result['peak_allocated_gib']:.2f} GiB, NLL {result['nll_per_token']:.3f}"
        )
    if "flash_kernel" in result:
        return "served by torch's flash kernel" if result["flash_kernel"] else f"not: {result['why_not']}"
    return f"ok, {result.get('factors_served', '')} factors"


def _number(value: Any, digits: str = ".3g") -> str:
    return "–" if value is None else format(value, digits)


def _not_run(section: str, report: dict[str, Any]) -> list[str]:
    return (
        [] if section in report["sections"] else [f"Not in this run (--sections {' '.join(report['sections'])}).", ""]
    )


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check (`{report['command']}`)",
        "",
        f"{env.get('device_name')} ({env.get('device')}), torch {env.get('torch')}, CUDA {env.get('cuda')}, "
        f"transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, flash-attn "
        f"{env.get('flash-attn')}, DeepSpeed {env.get('deepspeed')}. Dense bf16 peak from the table: "
        f"{_number(env.get('peak_bf16_flops_table'), '.3g')} FLOP/s; measured {env['matmul']['dtype']} matmul "
        f"({env['matmul']['n']}^3): {env['matmul']['flops_per_s'] / 1e12:.3g} TFLOP/s. Budget {report['budget_s']:.0f}"
        f" s, elapsed {report['elapsed_s']:.0f} s.",
        "",
    ]
    lines += [f"- {note}" for note in report["notes"]]
    numerics = report["numerics"]
    lines += ["", "## 1. RoPE numerics", ""] + _not_run("numerics", report)
    if numerics["model"]:
        lines += [f"{numerics['model']}.", ""]
    for row in numerics["cells"]:
        if "probe" in row:
            probe = "yes" if row.get("flash_kernel") else f"no ({row.get('why_not') or row['line'] or row['status']})"
            lines += [f"transformers' sdpa path served by torch's flash kernel alone: {probe}.", ""]
    lines += [
        "| method | attention | length | factors | max abs error | max rel error | top-1 agreement | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in numerics["cells"]:
        if "probe" in row or row["status"] == "skipped":  # a missing package: one note above says so
            continue
        status = row["line"] or (row.get("reference_line") if row.get("reference_status") != "ok" else "ok")
        lines.append(
            f"| {NUMERICS_METHODS[row['method']]} | {row['attention']} | {row['length']:,} | "
            f"{row.get('factors_served', '–')} | {_number(row.get('max_abs_error'))} | "
            f"{_number(row.get('max_rel_error'))} | {_number(row.get('top1_agreement'), '.3f')} | {status or 'ok'} |"
        )
    lines += ["", "## 2. Training throughput, MFU and memory", ""] + _not_run("training", report)
    lines += [f"- {line}" for line in report["training"]["assumptions"]]
    lines += [
        "",
        "| model | length | TiledMLP | attention | tok/s | MFU | MFU (6N) | peak GiB | step GiB: measured / estimate "
        "(ratio) | states GiB: measured / estimate | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["training"]["cells"]:
        memory = row.get("memory") or {}
        step, states = memory.get("step") or {}, memory.get("states") or {}
        mfu = None if row.get("mfu") is None else 100 * row["mfu"]
        mfu_6n = None if row.get("mfu_6n") is None else 100 * row["mfu_6n"]
        lines.append(
            f"| {row['model']} | {row['length']:,} | {'yes' if row['tiled_mlp'] else 'no'} | "
            f"{row.get('attention', '–')} | {_number(row.get('tokens_per_second'), ',.0f')} | "
            f"{_number(mfu, '.1f')}% | {_number(mfu_6n, '.1f')}% | "
            f"{_number(memory.get('measured_peak_allocated_gib'), '.2f')} | "
            f"{_number(step.get('measured_gib'), '.2f')} / {_number(step.get('estimate_gib'), '.2f')} "
            f"({_number(step.get('estimate_over_measured'), '.2f')}) | {_number(states.get('measured_gib'), '.2f')} / "
            f"{_number(states.get('estimate_gib'), '.2f')} | {row['line'] or row['status']} |"
        )
    lines += ["", "## 3. Evaluation and one search candidate", ""] + _not_run("evaluation", report)
    lines += [
        "| what | model | length | tok/s | seconds | peak GiB | above weights GiB | NLL/token | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["evaluation"]["cells"]:
        lines.append(
            f"| {row['what']} | {row['model']} | {row['length']:,} | {_number(row.get('tokens_per_second'), ',.0f')} |"
            f" {_number(row.get('compute_s'), '.2f')} | {_number(row.get('peak_allocated_gib'), '.2f')} | "
            f"{_number(row.get('peak_above_weights_gib'), '.2f')} | {_number(row.get('nll_per_token'), '.3f')} | "
            f"{row['line'] or row['status']} |"
        )
    projection = report["search_projection"]
    lines += ["", "## 4. Projected search cost, LLaMA2-7B (a projection, not a measurement)", ""]
    lines += [f"- {line}" for line in projection.get("assumptions", [])]
    if projection.get("line"):
        lines += ["", projection["line"]]
    if projection.get("rows"):
        lines += [
            "",
            f"Fast-mode token ratio {projection['fast_token_ratio']:.3f}; candidate install "
            f"{projection['install_s']:.2f} s"
            + (
                f"; sample_nll / sequence_nll time at the same length: {projection['sample_nll_over_sequence_nll']}"
                if projection.get("sample_nll_over_sequence_nll") is not None
                else ""
            )
            + ".",
            "",
            "| target | config | N samples | candidates (paper mode) | GPUs per evaluator | s per sample | paper mode "
            "GPU-h | fast mode GPU-h | evaluator peak GiB |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for row in projection["rows"]:
            lines.append(
                f"| {row['target_length']:,} | `{row['config']}` | {row['num_documents']} | "
                f"{row['candidates_paper_mode']:,} | {row['gpus_per_evaluator']} | {row['sample_s']:.1f} | "
                f"{row['paper_mode_gpu_hours']:,.1f} | {row['fast_mode_gpu_hours']:,.1f} | {row['projected_peak_gib']} |"
            )
    lines += [
        "",
        "## Cells and budget",
        "",
        "| section | cell | estimate s | took s | status |",
        "|---|---|---|---|---|",
    ]
    everything = numerics["cells"] + numerics["reference_cells"]
    everything += report["training"]["cells"] + report["evaluation"]["cells"]
    unavailable = [row for row in everything if row["status"] == "skipped"]
    for row in everything:
        if row["status"] == "skipped":
            continue
        lines.append(
            f"| {row['section']} | {row['label']} | {_number(row['estimate_s'], '.1f')} | "
            f"{_number(row['seconds'], '.1f')} | {row['line'] or row['status']} |"
        )
    if unavailable:
        lines += ["", f"{len(unavailable)} more cells skipped for a missing package (see the notes above)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="tiny models and lengths: the same code in seconds")
    parser.add_argument("--budget_s", type=float, default=480.0, help="wall-clock budget; the largest cells go first")
    parser.add_argument("--output_dir", default=None, help="default benchmarks/results (outputs/gpu-check-tiny)")
    parser.add_argument("--numerics_layers", type=int, default=None, help="decoder layers of the numerics model")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--seed", type=int, default=0)
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parser.parse_args(argv)
    options.argv = argv
    with exit_on_user_error("gpu_check"):
        return GpuCheck(options).run()


if __name__ == "__main__":
    main()
