"""SmolLM2-135M fine-tuned at 16k on a CPU, end to end: ZeRO-3 + Ulysses SP=3 over 3 processes, killed after a
checkpoint and resumed, the merged result reloaded in stock transformers with our patched model's logits.

    python -m benchmarks.smollm2_finetune        # about 30 minutes on 2 cores

Needs the converted model (python -m longrope.gguf --output_dir models/smollm2-135m-instruct) and the searched 16k
factors (the search-16k stage of configs/smollm2-135m/pipeline.yaml); prepares the training segments when they are
missing. Runs configs/smollm2-135m/finetune-16k.yaml as committed (3 steps, a checkpoint after each), with torchrun,
3 processes of one thread each, into a fresh output_dir:

1. killed with SIGKILL on every rank right after checkpoint-1 is on disk (behind a barrier, so at a known step);
2. the same command again: it must resume from checkpoint-1 and train the remaining steps;
3. output_dir (train.py's merged LoRA model with a stock ``rope_type: longrope`` config) is loaded with plain
   ``AutoModelForCausalLM.from_pretrained`` and run on one held-out 16380-token document (past the 8k window, so the
   long factors apply), then the same weights with our RoPE module installed from the ``longrope_factors.json``
   beside them: the max abs logit difference is the headline of the export.

Measured per rank of each run: the process peak RSS (VmHWM: model, engine, optimizer and training), the training
peak above the RSS when the first step begins (the counter restarted there), and every step's wall time.
Writes benchmarks/results/smollm2_finetune.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from longrope.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIG = ROOT / "configs/smollm2-135m/finetune-16k.yaml"
DATA_CONFIG = ROOT / "configs/smollm2-135m/data-train-16k.yaml"
TEST_DOCUMENTS = ROOT / "data/smollm2/test-32k"
TEST_PREPARE_CONFIG = ROOT / "configs/smollm2-135m/data-test.yaml"
PROCESSES = 3
KILL_AFTER_STEP = 1
# One thread per rank (3 ranks on 2 cores), and glibc's malloc told to return every block of 64 KiB or more to the
# system when it is freed: by default it raises that threshold as large blocks are freed and keeps the freed layer
# activations in its heap, which tripled the peak of a checkpointed 4k-token forward and ran the three ranks out of
# the machine's 24 GB (README "A real model on a CPU").
CPU_ENV = {"OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "WANDB_MODE": "disabled"}
# Logits are compared this many positions at a time: the whole 16380 x 49152 fp32 tensor is 3.2 GB per model.
LOGIT_CHUNK = 2048

WORKER = r"""
import json, os, signal, sys, time
sys.path.insert(0, os.getcwd())
import torch.distributed as dist
from transformers import Trainer
import train
from longrope import throughput


def status(key):
    return throughput.process_status_bytes(key)


MARKS = {"step_seconds": []}


def report():
    MARKS["process_peak"] = status("VmHWM")  # the training peak when the counter was restarted, else the process's
    path = os.path.join(os.environ["REPORT_DIR"], os.environ["RANK"] + ".json")
    with open(path, "w") as handle:
        json.dump(MARKS, handle)


class Measured(throughput.ThroughputCallback):
    def on_step_begin(self, args, state, control, **kwargs):
        if "training_baseline" not in MARKS:
            MARKS["process_peak_before_training"] = status("VmHWM")
            MARKS["training_baseline"] = status("VmRSS")
            MARKS["first_step"] = state.global_step + 1
        super().on_step_begin(args, state, control, **kwargs)  # restarts the peak counter (reset_peak_memory)
        MARKS["step_start"] = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        MARKS["step_seconds"].append(round(time.perf_counter() - MARKS["step_start"], 1))
        super().on_step_end(args, state, control, **kwargs)

    def on_train_end(self, args, state, control, **kwargs):
        MARKS["last_step"] = state.global_step
        report()


save_checkpoint = Trainer._save_checkpoint


def save_checkpoint_then_die(self, *args, **kwargs):
    save_checkpoint(self, *args, **kwargs)
    kill_after = os.environ.get("KILL_AFTER_STEP")
    if kill_after and self.state.global_step == int(kill_after):
        MARKS["last_step"] = self.state.global_step
        report()
        dist.barrier()  # every rank's share of the checkpoint (and its report) is on disk
        os.kill(os.getpid(), signal.SIGKILL)


Trainer._save_checkpoint = save_checkpoint_then_die
throughput.ThroughputCallback = Measured
train.main(sys.argv[1:])
"""


def fail(message: str) -> None:
    raise SystemExit(f"smollm2_finetune: {message}")


def check_inputs(config: dict) -> None:
    """The model and factors exist (each named with the command that makes it); the training segments are prepared
    here when missing or cut to another length than the data config's."""
    model = ROOT / config["model_name_or_path"]
    if not (model / "config.json").is_file():
        fail(
            f"{model} is missing; convert it first: python -m longrope.gguf --output_dir {config['model_name_or_path']}"
        )
    factors = ROOT / config["rope_factors_path"]
    if not factors.is_file():
        fail(
            f"{factors} is missing; run the search first: python -m scripts.demo --config "
            "configs/smollm2-135m/pipeline.yaml --output_dir outputs/smollm2"
        )
    from longrope.data import read_summary

    wanted = yaml.safe_load(DATA_CONFIG.read_text())["max_seq_len"]
    if read_summary(ROOT / config["dataset_path"]).get("config", {}).get("max_seq_len") != wanted:
        run_checked([sys.executable, "-m", "data.prepare", "--config", str(DATA_CONFIG)], "data.prepare")


def segment_length(config: dict) -> int:
    """The training segments' length (tokens per optimizer step: one segment, split over the SP ranks)."""
    from longrope.data import read_summary

    return read_summary(ROOT / config["dataset_path"])["config"]["max_seq_len"]


def run_checked(command: list[str], name: str, **env: str) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    if completed.returncode != 0:
        fail(f"{name} failed:\n{completed.stderr[-3000:]}")
    return completed


def launch(reports: Path, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """torchrun of the worker (train.py measured, optionally killed) with the committed config; its wall seconds."""
    reports.mkdir(parents=True)
    worker = reports / "worker.py"
    worker.write_text(WORKER)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(PROCESSES), "--master_port"]
    command += [str(free_port()), str(worker), "--config", str(CONFIG)]
    env = {**os.environ, **CPU_ENV, "REPORT_DIR": str(reports), **env}
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    (reports / "stderr.log").write_text(completed.stderr)
    return completed, time.perf_counter() - started


def rank_reports(reports: Path) -> dict:
    marks = [json.loads((reports / f"{rank}.json").read_text()) for rank in range(PROCESSES)]

    def mib(key: str) -> list[float]:
        return [round(mark[key] / 2**20) for mark in marks]

    return {
        "steps": [marks[0]["first_step"], marks[0]["last_step"]],
        "step_seconds_per_rank": [mark["step_seconds"] for mark in marks],
        "process_peak_mib_per_rank": [
            max(a, b) for a, b in zip(mib("process_peak_before_training"), mib("process_peak"))
        ],
        "training_peak_above_start_mib_per_rank": [
            peak - start for peak, start in zip(mib("process_peak"), mib("training_baseline"))
        ],
        "rss_at_training_start_mib_per_rank": mib("training_baseline"),
    }


def compare_logits(config: dict, output_dir: Path) -> dict:
    """Stock transformers on the exported folder against the same weights with our RoPE installed from its factors
    file, on one held-out document past the original window."""
    import torch
    from transformers import AutoModelForCausalLM

    from longrope import factors, rope
    from longrope.documents import ensure_prepared, select_documents

    length = segment_length(config)
    ensure_prepared(str(TEST_DOCUMENTS), str(TEST_PREPARE_CONFIG))
    documents, description = select_documents(str(TEST_DOCUMENTS), length, 1, seed=0)
    input_ids = torch.tensor(documents)

    def hidden_and_head(model):
        with torch.no_grad():
            return model.model(input_ids=input_ids).last_hidden_state[0], model.lm_head

    stock = AutoModelForCausalLM.from_pretrained(output_dir, attn_implementation="sdpa").eval()
    stock_type = type(stock).__name__
    installed_in_stock = len(rope.installed_modules(stock))
    rope_parameters = dict(stock.config.rope_parameters)
    started = time.perf_counter()
    stock_hidden, _ = hidden_and_head(stock)
    forward_seconds = time.perf_counter() - started
    del stock

    patched = AutoModelForCausalLM.from_pretrained(output_dir, attn_implementation="sdpa").eval()
    scaling = factors.load(output_dir / factors.FACTORS_FILE_NAME).scaling
    rope.install(patched, scaling)
    patched_hidden, head = hidden_and_head(patched)
    max_diff, nll = 0.0, 0.0
    targets = input_ids[0, 1:]
    with torch.no_grad():
        for start in range(0, length, LOGIT_CHUNK):
            ours = head(patched_hidden[start : start + LOGIT_CHUNK])
            theirs = head(stock_hidden[start : start + LOGIT_CHUNK])
            max_diff = max(max_diff, (ours - theirs).abs().max().item())
            scored = ours[: len(targets[start : start + LOGIT_CHUNK])]
            nll += torch.nn.functional.cross_entropy(
                scored, targets[start : start + LOGIT_CHUNK], reduction="sum"
            ).item()
    return {
        "document": description,
        "stock_class": stock_type,
        "our_modules_in_stock_model": installed_in_stock,
        "stock_rope_type": rope_parameters.get("rope_type"),
        "original_max_position_embeddings": rope_parameters.get("original_max_position_embeddings"),
        "max_abs_logit_diff": max_diff,
        "perplexity_of_document": round(float(torch.tensor(nll / (length - 1)).exp()), 3),
        "stock_forward_seconds": round(forward_seconds, 1),
    }


def markdown(results: dict) -> str:
    killed, resumed, export = results["killed"], results["resumed"], results["export"]

    def per_rank(values: list) -> str:
        return " / ".join(str(value) for value in values)

    lines = [
        "# SmolLM2-135M fine-tune at 16k on CPU (ZeRO-3 + Ulysses SP=3, 3 processes)",
        "",
        f"Measured {results['date']} with `python -m benchmarks.smollm2_finetune` ({results['host']}); config "
        f"`{results['config']}`: LoRA r{results['lora_r']}, {results['tokens_per_step']} tokens per step "
        f"(each rank {results['tokens_per_step'] // PROCESSES}), activation checkpointing, loss_chunk_size "
        f"{results['loss_chunk_size']}.",
        "",
        "| run | steps | wall (s) | step time (s, per step) | process peak RSS per rank (MiB) | "
        "training peak above its start per rank (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in (("killed after checkpoint-1", killed), ("resumed", resumed)):
        steps = f"{run['steps'][0]}-{run['steps'][1]}"
        lines.append(
            f"| {name} | {steps} | {run['wall_seconds']} | {per_rank(run['step_seconds_per_rank'][0])} | "
            f"{per_rank(run['process_peak_mib_per_rank'])} | {per_rank(run['training_peak_above_start_mib_per_rank'])} |"
        )
    lines += [
        "",
        f"Losses per step (trainer_state.json of the resumed run): {per_rank(results['losses'])}. The resumed run "
        f"printed `resuming from {results['resumed_from']}`.",
        "",
        f"Export: `{results['output_dir']}` loads with plain `AutoModelForCausalLM.from_pretrained` as "
        f"{export['stock_class']} (rope_type {export['stock_rope_type']}, original window "
        f"{export['original_max_position_embeddings']}, none of our modules). On one held-out document of "
        f"{export['document']['tokens_each']} tokens its logits and our patched model's differ by at most "
        f"**{export['max_abs_logit_diff']:.2e}** (perplexity of that document {export['perplexity_of_document']}).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", default=str(ROOT / "outputs/smollm2/finetune-16k-benchmark"))
    args = parser.parse_args(argv)
    config = yaml.safe_load(CONFIG.read_text())
    check_inputs(config)
    output_dir = ROOT / config["output_dir"]
    work_dir = Path(args.work_dir)
    for stale in (output_dir, work_dir):  # both are this benchmark's own: every run starts fresh
        shutil.rmtree(stale, ignore_errors=True)

    killed, killed_wall = launch(work_dir / "killed", KILL_AFTER_STEP=str(KILL_AFTER_STEP))
    if killed.returncode == 0 or "Signal 9 (SIGKILL)" not in killed.stderr:
        fail(f"the first run was not killed after checkpoint-{KILL_AFTER_STEP}:\n{killed.stderr[-3000:]}")
    if (output_dir / "model.safetensors").exists() or not (output_dir / f"checkpoint-{KILL_AFTER_STEP}").is_dir():
        fail(f"the killed run should leave checkpoint-{KILL_AFTER_STEP} and no final model in {output_dir}")
    resumed, resumed_wall = launch(work_dir / "resumed")
    if resumed.returncode != 0:
        fail(f"the resumed run failed:\n{resumed.stderr[-3000:]}")
    if not re.search(rf"resuming from \S*checkpoint-{KILL_AFTER_STEP}\b", resumed.stderr):
        fail(f"the second run did not resume from checkpoint-{KILL_AFTER_STEP}:\n{resumed.stderr[-3000:]}")

    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    if len(losses) != config["max_steps"]:
        fail(f"trainer_state.json logs {len(losses)} losses, not {config['max_steps']}")
    results = {
        "date": time.strftime("%Y-%m-%d"),
        "host": f"{os.cpu_count()} CPU cores, {PROCESSES} processes x 1 thread",
        "config": str(CONFIG.relative_to(ROOT)),
        "output_dir": config["output_dir"],
        "lora_r": config["lora_r"],
        "loss_chunk_size": config.get("loss_chunk_size", 4096),
        "tokens_per_step": segment_length(config),
        "killed": {**rank_reports(work_dir / "killed"), "wall_seconds": round(killed_wall)},
        "resumed": {**rank_reports(work_dir / "resumed"), "wall_seconds": round(resumed_wall)},
        "resumed_from": f"checkpoint-{KILL_AFTER_STEP}",
        "losses": losses,
        "export": compare_logits(config, output_dir),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smollm2_finetune.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "smollm2_finetune.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
