"""Training at length on CPU: per-rank activation memory and throughput of Ulysses SP=2 against SP=1, through train.py.

    python -m benchmarks.train_scaling                      # 4k, 8k, 16k, 32k (about 10 minutes on 2 cores)
    python -m benchmarks.train_scaling --lengths 4096 8192  # a quicker look

Both sides are 2 processes with DeepSpeed ZeRO-3 over gloo, activation checkpointing and loss_chunk_size 1024, on a
tiny random Llama (hidden 256, 4 heads, 2 layers, byte vocabulary) and random tokens. SP=1 is ZeRO-3 data parallel
(each rank a whole sequence per step), SP=2 is ZeRO-3 + Ulysses (each rank half of one sequence): the same cores,
processes and sharded model states, so the only difference is how a sequence is split, and tokens/s compare
directly (global tokens per second).

Activation memory per rank (the headline, and the measure the target is checked on): the peak RSS of the measured
training steps minus the RSS when they begin. The measured steps are all but the first: the first (warm-up) step
also faults in libtorch code pages it is the first to execute (file-backed RSS, about 12 MiB per rank) and makes
torch create Adam's moment buffers at the first optimizer step (8.5 MiB per rank); neither is an activation nor
depends on SP. Once it is done the optimizer state exists and the code is resident, so what the measured steps add
over their starting RSS is activations and their transient buffers (gathered ZeRO-3 weights, gradients, all-to-all
buffers). The peak is exact, not sampled: when the measured steps begin each rank restarts its peak-RSS counter
(Linux /proc/self/clear_refs, 5; VmHWM then restarts from the current RSS) and reads VmHWM when training ends.
glibc's mmap threshold is fixed at 64 KiB (see MMAP_THRESHOLD) so freed tensors leave RSS.

Reported beside it, so nothing is hidden: the same peak measured from the first step's start (the counter restarted
when the first step begins; "incl. first-step set-up", the window this benchmark first reported), the libtorch
code pages faulted in during the first step and during the measured steps (the latter should be about 0), and the
bytes of Adam's moments when the measured steps begin and at the end (equal: the state exists before the window).

Throughput: global tokens of the measured steps over their wall time (the warm-up step is not timed). Every length
runs 1 warm-up step and at least 2 measured steps (MEASURED_STEPS).

Writes benchmarks/results/train_scaling.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from longrope.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
LENGTHS = (4096, 8192, 16384, 32768)
# Steps measured (memory and throughput) after the one warm-up step: 2 or more, so the peak is a steady-state step's
# and not one step's accident. At most 3, so SP=1 (2 rows a step) stays within one epoch of the 8-row dataset.
MEASURED_STEPS = {4096: 3, 8192: 2, 16384: 2, 32768: 2}
MIN_MEASURED_STEPS = 2
CHUNK = 1024
# A fixed glibc mmap threshold: every tensor above 64 KiB gets its own mapping, returned to the OS when freed, so RSS
# follows the live tensors (as a GPU allocator's allocated bytes do). With glibc's default dynamic threshold, tensors
# up to 32 MiB come from the heap, whose freed holes stay resident: that fragmentation depended on the tensor sizes,
# hence on the length, and made a first run's 32k SP=1 peak lower than its 16k one.
MMAP_THRESHOLD = 65536
TARGET_MEMORY_RATIO = 0.6
TARGET_OVERHEAD = 0.30

WORKER = r"""
import json, os, sys, time
sys.path.insert(0, os.getcwd())
import torch
import train
from longrope import throughput


def status(key):
    return throughput.process_status_bytes(key)


def reset_peak():
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM restarts from the current RSS


def optimizer_state_bytes(optimizer):
    while hasattr(optimizer, "optimizer"):  # accelerate's wrapper, then DeepSpeed's ZeRO-3 optimizer
        optimizer = optimizer.optimizer
    tensors = [value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)]
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


class Measured(throughput.ThroughputCallback):
    marks = {}

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        if "first_step_baseline" not in self.marks:
            reset_peak()
            self.marks["first_step_baseline"] = status("VmRSS")
            self.marks["first_step_baseline_file"] = status("RssFile")
        elif state.global_step == 1 and "measured_baseline" not in self.marks:
            self.marks["first_step_peak"] = status("VmHWM")
            reset_peak()
            self.marks["measured_baseline"] = status("VmRSS")
            self.marks["measured_baseline_file"] = status("RssFile")
            self.marks["measured_start_optimizer_state"] = optimizer_state_bytes(kwargs["optimizer"])
            self.marks["measured_start"] = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.marks["measured_end"] = time.perf_counter()
        self.marks["measured_steps"] = state.global_step - 1
        self.marks["measured_peak"] = status("VmHWM")
        self.marks["end_file"] = status("RssFile")
        self.marks["end_optimizer_state"] = optimizer_state_bytes(kwargs["optimizer"])


throughput.ThroughputCallback = Measured
train.main(sys.argv[1:])
with open(os.path.join(os.environ["REPORT_DIR"], os.environ["RANK"] + ".json"), "w") as handle:
    json.dump(Measured.marks, handle)
"""


def build_world(root: Path, lengths: tuple[int, ...]) -> None:
    """The tiny model (saved) and one random-token dataset per length (8 rows)."""
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, LlamaConfig

    from longrope.corpus import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max(lengths),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(0)
    for length in lengths:
        rows = torch.randint(0, 256, (8, length), generator=generator).tolist()
        positions = [list(range(length))] * 8
        dataset = DatasetDict({"train": Dataset.from_dict({"input_ids": rows, "position_ids": positions})})
        dataset.save_to_disk(str(root / f"data-{length}"))


def run(root: Path, length: int, sp_size: int) -> dict:
    """One 2-process run: per-rank activation memory (MiB) of the measured steps and global tokens/s over them."""
    import yaml

    name = f"sp{sp_size}-{length}"
    measured_steps = max(MEASURED_STEPS.get(length, MIN_MEASURED_STEPS), MIN_MEASURED_STEPS)
    config = {
        "model_name_or_path": str(root / "model"),
        "attn_implementation": "sdpa",
        "dataset_path": str(root / f"data-{length}"),
        "output_dir": str(root / name),
        "max_steps": 1 + measured_steps,
        "per_device_train_batch_size": 1,
        "learning_rate": 1.0e-4,
        "activation_checkpointing": True,
        "loss_chunk_size": CHUNK,
        "sp_size": sp_size,
        "deepspeed": str(ROOT / "configs/deepspeed/zero3.json"),
        "save_strategy": "no",
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    reports = root / f"{name}-report"
    reports.mkdir()
    (root / "worker.py").write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(root / "worker.py"), "--config", str(root / f"{name}.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "REPORT_DIR": str(reports)}
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stderr[-3000:]}")
    marks = [json.loads((reports / f"{rank}.json").read_text()) for rank in (0, 1)]
    if any(mark["measured_steps"] != measured_steps for mark in marks):
        raise SystemExit(
            f"{name}: ran {[mark['measured_steps'] for mark in marks]} measured steps, not {measured_steps}"
        )

    def mib(values: list[float]) -> list[float]:
        return [round(value / 2**20, 1) for value in values]

    activation = mib([mark["measured_peak"] - mark["measured_baseline"] for mark in marks])
    # The whole run's peak is the larger of the first step's and the measured steps' (the counter restarted between).
    incl_first_step = mib(
        [max(mark["first_step_peak"], mark["measured_peak"]) - mark["first_step_baseline"] for mark in marks]
    )
    diagnostics = {
        "code_pages_first_step_mib_per_rank": mib(
            [mark["measured_baseline_file"] - mark["first_step_baseline_file"] for mark in marks]
        ),
        "code_pages_measured_steps_mib_per_rank": mib(
            [mark["end_file"] - mark["measured_baseline_file"] for mark in marks]
        ),
        "optimizer_state_at_measured_start_mib_per_rank": mib(
            [mark["measured_start_optimizer_state"] for mark in marks]
        ),
        "optimizer_state_at_end_mib_per_rank": mib([mark["end_optimizer_state"] for mark in marks]),
    }
    timed = max(mark["measured_end"] for mark in marks) - min(mark["measured_start"] for mark in marks)
    data_parallel = 2 // sp_size
    tokens = measured_steps * length * data_parallel
    return {
        "activation_mib_per_rank": activation,
        "activation_mib_max_rank": max(activation),
        "activation_incl_first_step_mib_per_rank": incl_first_step,
        "activation_incl_first_step_mib_max_rank": max(incl_first_step),
        "measured_baseline_mib_per_rank": mib([mark["measured_baseline"] for mark in marks]),
        "first_step_baseline_mib_per_rank": mib([mark["first_step_baseline"] for mark in marks]),
        "tokens_per_second": round(tokens / timed, 1),
        "measured_steps": measured_steps,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "diagnostics": diagnostics,
    }


def markdown(results: dict) -> str:
    """The headline table: activation memory of the measured steps (the target's measure), the first-step-inclusive
    window beside it, and throughput."""
    lines = [
        "| length | SP=1 act. MiB/rank | SP=2 act. MiB/rank | memory ratio | incl. first-step set-up: SP=1 / SP=2 MiB "
        "(ratio) | SP=1 tok/s | SP=2 tok/s | throughput SP=2/SP=1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        sp1, sp2 = row["sp1"], row["sp2"]
        lines.append(
            f"| {row['length']:,} | {sp1['activation_mib_max_rank']:,.0f} | {sp2['activation_mib_max_rank']:,.0f} | "
            f"{row['memory_ratio']:.3f} | {sp1['activation_incl_first_step_mib_max_rank']:,.0f} / "
            f"{sp2['activation_incl_first_step_mib_max_rank']:,.0f} ({row['memory_ratio_incl_first_step']:.3f}) | "
            f"{sp1['tokens_per_second']:,.0f} | {sp2['tokens_per_second']:,.0f} | {row['throughput_ratio']:.3f} |"
        )
    return "\n".join(lines)


def diagnostics_markdown(results: dict) -> str:
    """What the first step adds that the measured steps do not: code pages and Adam's moments, per rank (max rank)."""
    lines = [
        "| length | code pages MiB, first step: SP=1 / SP=2 | code pages MiB, measured steps: SP=1 / SP=2 | "
        "Adam moments MiB, measured start / end |",
        "|---|---|---|---|",
    ]
    for row in results["rows"]:
        sp1, sp2 = row["sp1"]["diagnostics"], row["sp2"]["diagnostics"]
        first = (
            f"{max(sp1['code_pages_first_step_mib_per_rank']):.1f} / "
            f"{max(sp2['code_pages_first_step_mib_per_rank']):.1f}"
        )
        measured = (
            f"{max(sp1['code_pages_measured_steps_mib_per_rank']):.1f} / "
            f"{max(sp2['code_pages_measured_steps_mib_per_rank']):.1f}"
        )
        adam_start = max(
            sp1["optimizer_state_at_measured_start_mib_per_rank"]
            + sp2["optimizer_state_at_measured_start_mib_per_rank"]
        )
        adam_end = max(sp1["optimizer_state_at_end_mib_per_rank"] + sp2["optimizer_state_at_end_mib_per_rank"])
        adam = f"{adam_start:.1f} / {adam_end:.1f}"
        lines.append(f"| {row['length']:,} | {first} | {measured} | {adam} |")
    return "\n".join(lines)


def main(lengths: tuple[int, ...] = LENGTHS) -> dict:
    """Measure every length at SP=1 and SP=2, write and return the results."""
    from longrope.io import atomic_write_json, atomic_write_text

    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-scaling-") as directory:
        root = Path(directory)
        build_world(root, lengths)
        for length in lengths:
            sp1, sp2 = run(root, length, 1), run(root, length, 2)
            row = {
                "length": length,
                "sp1": sp1,
                "sp2": sp2,
                "memory_ratio": round(sp2["activation_mib_max_rank"] / sp1["activation_mib_max_rank"], 3),
                "memory_ratio_incl_first_step": round(
                    sp2["activation_incl_first_step_mib_max_rank"] / sp1["activation_incl_first_step_mib_max_rank"], 3
                ),
                "throughput_ratio": round(sp2["tokens_per_second"] / sp1["tokens_per_second"], 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    results = {
        "setup": "tiny Llama hidden 256, 4 heads, 2 layers, vocab 259, fp32, sdpa; 2 processes, ZeRO-3 over gloo, "
        f"activation checkpointing, loss_chunk_size {CHUNK}; SP=1 is 2-way data parallel",
        "targets": {"memory_ratio_max": TARGET_MEMORY_RATIO, "throughput_overhead_max": TARGET_OVERHEAD},
        "load_average_before": [round(value, 2) for value in load_before],
        "load_average_after": [round(value, 2) for value in os.getloadavg()],
        "rows": rows,
        "memory_target_met": all(row["memory_ratio"] <= TARGET_MEMORY_RATIO for row in rows),
        "throughput_target_met": all(row["throughput_ratio"] >= 1 - TARGET_OVERHEAD for row in rows),
    }
    table = markdown(results)
    diagnostics = diagnostics_markdown(results)
    atomic_write_json(RESULTS / "train_scaling.json", results)
    atomic_write_text(
        RESULTS / "train_scaling.md",
        "# Train scaling: Ulysses SP=2 against SP=1 (python -m benchmarks.train_scaling)\n\n"
        f"{results['setup']}.\n\nActivation memory per rank: peak RSS of the measured steps (all but the first, "
        "warm-up, step) minus the RSS when they begin; the target (memory ratio <= "
        f'{TARGET_MEMORY_RATIO}) is checked on it. "incl. first-step set-up": the same peak from the first step\'s '
        "start, which also holds the libtorch code pages the first step faults in and Adam's moments (created at the "
        "first optimizer step), neither of which shrinks with SP. Throughput: the measured steps.\n\n"
        f"{table}\n\nLoad average before/after: {results['load_average_before']} / "
        f"{results['load_average_after']}.\n\nWhat the first step adds that the measured steps do not (file-backed "
        "RSS growth, i.e. libtorch code pages; Adam's moment bytes when the measured steps begin and at the end):\n\n"
        f"{diagnostics}\n",
    )
    print(table)
    print(
        f"memory target met: {results['memory_target_met']}, throughput target met: {results['throughput_target_met']}"
    )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    main(tuple(parser.parse_args().lengths))
