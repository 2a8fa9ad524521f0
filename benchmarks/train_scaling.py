"""Training at length on CPU: per-rank activation memory and throughput of Ulysses SP=2 against SP=1, through train.py.

    python -m benchmarks.train_scaling                      # 4k, 8k, 16k, 32k (about 15 minutes on 2 cores)
    python -m benchmarks.train_scaling --lengths 4096 8192  # a quicker look

Both sides are 2 processes with DeepSpeed ZeRO-3 over gloo, activation checkpointing and loss_chunk_size 1024, on a
tiny random Llama (hidden 256, 4 heads, 2 layers, byte vocabulary) and random tokens. SP=1 is ZeRO-3 data parallel
(each rank a whole sequence per step), SP=2 is ZeRO-3 + Ulysses (each rank half of one sequence): the same cores,
processes and sharded model states, so the only difference is how a sequence is split, and tokens/s compare
directly (global tokens per second).

Memory per rank (glibc's mmap threshold fixed at 64 KiB, see MMAP_THRESHOLD): when the first training step begins (model, engine and optimizer set up) each rank resets its
peak-RSS counter (Linux /proc/self/clear_refs, 5) and records its RSS; the activation memory is the kernel's
VmHWM at the end of training minus that baseline: the exact peak of the training steps, not a sampled one.
Throughput: tokens of the timed steps (all but the first, which warms up; 32k runs one step and times it) over
their wall time.

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
# The first step is not timed (warm-up), except in a 1-step run, where one step's seconds dwarf the warm-up.
STEPS = {4096: 4, 8192: 3, 16384: 2, 32768: 1}
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
import train
from longrope import training


def status(key):
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024


class Measured(training.ThroughputCallback):
    marks = {}

    def on_step_begin(self, args, state, control, **kwargs):
        super().on_step_begin(args, state, control, **kwargs)
        if "baseline" not in self.marks:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # VmHWM restarts from the current RSS
            self.marks["baseline"] = status("VmRSS")
        if state.global_step == min(1, args.max_steps - 1) and "timed_start" not in self.marks:
            self.marks["timed_start"] = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.marks["timed_end"] = time.perf_counter()
        self.marks["timed_steps"] = state.global_step - min(1, args.max_steps - 1)
        self.marks["peak"] = status("VmHWM")


training.ThroughputCallback = Measured
train.main(sys.argv[1:])
with open(os.path.join(os.environ["REPORT_DIR"], os.environ["RANK"] + ".json"), "w") as handle:
    json.dump(Measured.marks, handle)
"""


def build_world(root: Path, lengths: tuple[int, ...]) -> None:
    """The tiny model (saved) and one random-token dataset per length (8 rows)."""
    import torch
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM, LlamaConfig

    from longrope import data

    tokenizer = data.build_byte_tokenizer()
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


def run(root: Path, length: int, sp_size: int) -> dict[str, float]:
    """One 2-process run; per-rank activation memory (MiB) and global tokens/s of its timed steps."""
    import yaml

    name = f"sp{sp_size}-{length}"
    steps = STEPS.get(length, 2)
    config = {
        "model_name_or_path": str(root / "model"),
        "attn_implementation": "sdpa",
        "dataset_path": str(root / f"data-{length}"),
        "output_dir": str(root / name),
        "max_steps": steps,
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
    activation = [(mark["peak"] - mark["baseline"]) / 2**20 for mark in marks]
    timed = max(mark["timed_end"] for mark in marks) - min(mark["timed_start"] for mark in marks)
    data_parallel = 2 // sp_size
    tokens = marks[0]["timed_steps"] * length * data_parallel
    return {
        "activation_mib_per_rank": [round(value, 1) for value in activation],
        "activation_mib_max_rank": round(max(activation), 1),
        "baseline_mib_per_rank": [round(mark["baseline"] / 2**20, 1) for mark in marks],
        "tokens_per_second": round(tokens / timed, 1),
        "timed_steps": marks[0]["timed_steps"],
        "wall_seconds": round(time.perf_counter() - started, 1),
    }


def markdown(results: dict) -> str:
    lines = [
        "| length | SP=1 act. MiB/rank | SP=2 act. MiB/rank | memory ratio | SP=1 tok/s | SP=2 tok/s | throughput "
        "SP=2/SP=1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['length']:,} | {row['sp1']['activation_mib_max_rank']:,.0f} | "
            f"{row['sp2']['activation_mib_max_rank']:,.0f} | {row['memory_ratio']:.3f} | "
            f"{row['sp1']['tokens_per_second']:,.0f} | {row['sp2']['tokens_per_second']:,.0f} | "
            f"{row['throughput_ratio']:.3f} |"
        )
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
    atomic_write_json(RESULTS / "train_scaling.json", results)
    atomic_write_text(
        RESULTS / "train_scaling.md",
        "# Train scaling: Ulysses SP=2 against SP=1 (python -m benchmarks.train_scaling)\n\n"
        f"{results['setup']}.\n\n{table}\n\nLoad average before/after: {results['load_average_before']} / "
        f"{results['load_average_after']}.\n",
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
