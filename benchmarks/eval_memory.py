"""Peak memory of the project's chunked perplexity against a plain ``model(input_ids, labels=input_ids)`` forward.

Launch from the repository root:

    python -m benchmarks.eval_memory                                  # 2k..64k, byte (259) and 32k vocabularies
    python -m benchmarks.eval_memory --lengths 2048 4096 8192 16384   # a quicker subset
    python -m benchmarks.eval_memory --vocab-sizes 32000 --chunk-size 4096

Every measurement runs in a fresh Python subprocess (so one measurement's peak cannot leak into another) that builds
a tiny random Llama (sdpa attention, fp32, seeded), scores one random sequence of the given length, and reports the
process's peak resident set size (VmHWM) together with its resident size just before the measured call. Plain
forwards whose estimated peak (process baseline + logits + their log-softmax copy, 2 x length x vocab x 4 bytes)
would exceed --max-plain-gib are skipped and marked so in the output.

Writes benchmarks/results/eval_memory.json and .md (atomically) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LENGTHS = [2048, 4096, 8192, 16384, 32768, 65536]
DEFAULT_VOCAB_SIZES = [259, 32000]
METHODS = ["chunked", "plain"]
GIB = 1024**3
# Target from the task: at 32k tokens with the 32k vocabulary the chunked peak is at most this fraction of plain.
TARGET_LENGTH, TARGET_VOCAB, TARGET_RATIO = 32768, 32000, 0.25


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def run_child(method: str, length: int, vocab_size: int, chunk_size: int) -> dict[str, Any]:
    """One measurement inside a fresh process; returns peak and baseline RSS in MiB, the loss and the time."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from longrope.perplexity import sequence_nll

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(length, 4096),
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, vocab_size, (1, length), generator=torch.Generator().manual_seed(1))
    baseline_kib = _status_kib("VmRSS")
    started = time.perf_counter()
    if method == "chunked":
        result = sequence_nll(model, input_ids[0], loss_chunk_size=chunk_size)
        loss = result.nll_sum / result.scored_tokens
    else:
        with torch.inference_mode():
            loss = model(input_ids=input_ids, labels=input_ids).loss.item()
    seconds = time.perf_counter() - started
    return {
        "peak_mib": _status_kib("VmHWM") / 1024,
        "baseline_mib": baseline_kib / 1024,
        "loss": loss,
        "seconds": seconds,
    }


# Resident size of a child before the measured call (Python, torch, transformers and the tiny model), measured.
PROCESS_BASELINE_GIB = 0.4


def plain_peak_gib(length: int, vocab_size: int) -> float:
    """Estimated peak of the plain forward: the process baseline plus two fp32 length x vocab tensors (the logits and
    cross-entropy's log-softmax output are alive at once; measured deltas at 2k-32k match this within a few %)."""
    return PROCESS_BASELINE_GIB + 2 * length * vocab_size * 4 / GIB


def _measure(method: str, length: int, vocab_size: int, chunk_size: int) -> dict[str, Any]:
    spec = json.dumps({"method": method, "length": length, "vocab_size": vocab_size, "chunk_size": chunk_size})
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.eval_memory", "--child", spec],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"status": f"failed (exit {completed.returncode}): {tail[0]}"}
    return {"status": "ok", **json.loads(completed.stdout.strip().splitlines()[-1])}


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_markdown(payload: dict[str, Any]) -> str:
    lines = [
        "# Peak memory: chunked perplexity vs plain forward",
        "",
        f"Tiny random Llama (hidden 64, 2 layers, sdpa, fp32), chunk size {payload['chunk_size']}, "
        f"torch {payload['torch']}, {payload['cpu_count']} CPUs. Peak = VmHWM of a fresh process per cell; "
        "delta = peak minus the RSS just before the measured call (model already built).",
        "",
        "| vocab | length | chunked peak MiB | chunked delta MiB | plain peak MiB | plain delta MiB | "
        "peak ratio chunked/plain | chunked s | plain s | loss agreement |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in payload["rows"]:
        chunked, plain = row["chunked"], row["plain"]
        ratio = row.get("peak_ratio")
        agreement = row.get("loss_rel_diff")
        plain_cells = (
            [_fmt(plain.get("peak_mib")), _fmt(plain.get("peak_mib", 0) - plain.get("baseline_mib", 0))]
            if plain["status"] == "ok"
            else [plain["status"], "-"]
        )
        lines.append(
            "| "
            + " | ".join(
                [
                    str(row["vocab_size"]),
                    str(row["length"]),
                    _fmt(chunked.get("peak_mib")),
                    _fmt(chunked.get("peak_mib", 0) - chunked.get("baseline_mib", 0)),
                    *plain_cells,
                    "-" if ratio is None else f"{ratio:.3f}",
                    _fmt(chunked.get("seconds"), 1),
                    _fmt(plain.get("seconds"), 1),
                    "-" if agreement is None else f"{agreement:.1e}",
                ]
            )
            + " |"
        )
    lines += ["", payload["verdict"], ""]
    return "\n".join(lines)


def main(
    lengths: list[int] | None = None,
    vocab_sizes: list[int] | None = None,
    chunk_size: int = 1024,
    max_plain_gib: float = 16.0,
    output_dir: str | Path = REPO_ROOT / "benchmarks" / "results",
    child: str | None = None,
) -> dict[str, Any]:
    """Measure every (vocab, length, method) cell, print the table and write the JSON and Markdown results.

    ``child`` (internal) is one cell's JSON spec: measure it in this process and print the result as JSON.
    """
    if child is not None:
        result = run_child(**json.loads(child))
        print(json.dumps(result))
        return result
    import torch

    from longrope.io import atomic_write_json, atomic_write_text

    rows = []
    for vocab_size in vocab_sizes or DEFAULT_VOCAB_SIZES:
        for length in lengths or DEFAULT_LENGTHS:
            row: dict[str, Any] = {"vocab_size": vocab_size, "length": length}
            for method in METHODS:
                if method == "plain" and plain_peak_gib(length, vocab_size) > max_plain_gib:
                    row[method] = {
                        "status": f"skipped: estimated peak {plain_peak_gib(length, vocab_size):.2f} GiB "
                        f"> --max-plain-gib {max_plain_gib:g}"
                    }
                else:
                    row[method] = _measure(method, length, vocab_size, chunk_size)
                print(f"vocab {vocab_size:>6} length {length:>6} {method:>8}: {row[method]}", flush=True)
            if row["chunked"]["status"] == "ok" and row["plain"]["status"] == "ok":
                row["peak_ratio"] = row["chunked"]["peak_mib"] / row["plain"]["peak_mib"]
                row["loss_rel_diff"] = abs(row["chunked"]["loss"] - row["plain"]["loss"]) / abs(row["plain"]["loss"])
            rows.append(row)
    target = next((r for r in rows if (r["length"], r["vocab_size"]) == (TARGET_LENGTH, TARGET_VOCAB)), None)
    if target is None or "peak_ratio" not in target:
        verdict = f"Target ({TARGET_LENGTH} tokens, vocab {TARGET_VOCAB}) not measured in this run."
    else:
        met = "MET" if target["peak_ratio"] <= TARGET_RATIO else "NOT MET"
        verdict = (
            f"Target {met}: at {TARGET_LENGTH} tokens with vocab {TARGET_VOCAB} the chunked peak is "
            f"{target['peak_ratio']:.3f} of the plain forward's (target <= {TARGET_RATIO})."
        )
    payload = {
        "benchmark": "eval_memory",
        "chunk_size": chunk_size,
        "max_plain_gib": max_plain_gib,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "verdict": verdict,
    }
    output_dir = Path(output_dir)
    markdown = render_markdown(payload)
    atomic_write_json(output_dir / "eval_memory.json", payload)
    atomic_write_text(output_dir / "eval_memory.md", markdown)
    print(markdown)
    return payload


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=DEFAULT_LENGTHS)
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=DEFAULT_VOCAB_SIZES)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--max-plain-gib", type=float, default=16.0)
    parser.add_argument("--output-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    main(args.lengths, args.vocab_sizes, args.chunk_size, args.max_plain_gib, args.output_dir, args.child)
