"""The tiny model's held-out code loss in bits per byte, against another checkpoint of it (the check that teaching
it retrieval kept its code modelling: within 5% of the code-only model), and whether each copies from its context.

    python -m benchmarks.tiny_model                                         # models/tiny alone
    python -m benchmarks.tiny_model --model outputs/tiny/pretrain-retrieval --reference outputs/tiny/pretrain

Every window of the corpus's ``test`` split at the training length (``<s>`` + 255 bytes each, the windows
tests/test_tiny_model.py samples 64 of), scored with each model's own mean cross-entropy. The byte-level tokenizer
makes one token per byte, so bits per byte is the loss in nats over ln 2 (comparable with any tokenizer's loss per
byte).

Copying: a random alphanumeric string is written twice into a held-out window, once in each half; the loss on its
second occurrence can only fall below the first through attention to the first (an induction head), which is what
answering a passkey takes. A model that cannot copy scores the same on both. Writes
benchmarks/results/tiny_model.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import string
import sys
import time
from pathlib import Path

import torch

from longrope import data
from longrope.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAINING_LENGTH = 256
BATCH = 64
MAX_INCREASE = 0.05  # issue 13: the retrieval-trained model stays within 5% of the code-only one
COPY_WINDOWS = 128
COPY_CHARS = 12


def bits_per_byte(model: torch.nn.Module, windows: torch.Tensor) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), BATCH):
            batch = windows[start : start + BATCH]
            predicted = batch[:, 1:].numel()
            total += model(input_ids=batch, labels=batch).loss.item() * predicted
            count += predicted
    return total / count / math.log(2)


def copy_windows(windows: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Held-out windows with one random string written twice (at a seeded place in each half), and where each
    occurrence starts."""
    rng = random.Random(f"tiny-model-copy/{seed}")
    alphabet = (string.ascii_letters + string.digits).encode()
    rows, starts = [], []
    for index in range(COPY_WINDOWS):
        row = windows[index * len(windows) // COPY_WINDOWS].clone()
        needle = torch.tensor([rng.choice(alphabet) for _ in range(COPY_CHARS)])
        first = rng.randrange(8, TRAINING_LENGTH // 2 - COPY_CHARS)
        second = rng.randrange(TRAINING_LENGTH // 2, TRAINING_LENGTH - COPY_CHARS)
        row[first : first + COPY_CHARS] = needle
        row[second : second + COPY_CHARS] = needle
        rows.append(row)
        starts.append((first, second))
    return torch.stack(rows), starts


def copy_losses(model: torch.nn.Module, rows: torch.Tensor, starts: list[tuple[int, int]]) -> dict[str, float]:
    """Mean loss in nats per byte on the string's first and second occurrence (its first byte excluded: nothing
    announces where a string starts)."""
    with torch.no_grad():
        logprobs = model(input_ids=rows).logits.log_softmax(-1)
    totals = {"first": 0.0, "second": 0.0}
    for row, occurrences in enumerate(starts):
        for name, start in zip(totals, occurrences):
            targets = rows[row, start + 1 : start + COPY_CHARS]
            totals[name] -= logprobs[row, start : start + COPY_CHARS - 1].gather(-1, targets[:, None]).sum().item()
    return {name: total / (len(starts) * (COPY_CHARS - 1)) for name, total in totals.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="models/tiny")
    parser.add_argument("--reference", help="a checkpoint to compare with (the code-only model); none: measure one")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(ROOT / "models" / "tiny")
    windows = torch.from_numpy(data.heldout_windows(tokenizer, TRAINING_LENGTH, num_windows=None)).long()
    copy_rows, copy_starts = copy_windows(windows)
    checkpoints = {"model": args.model, **({"reference": args.reference} if args.reference else {})}
    started = time.perf_counter()
    models = {name: AutoModelForCausalLM.from_pretrained(Path(path)).eval() for name, path in checkpoints.items()}
    measured = {name: bits_per_byte(model, windows) for name, model in models.items()}
    copying = {name: copy_losses(model, copy_rows, copy_starts) for name, model in models.items()}
    result = {
        "model": args.model,
        "reference": args.reference,
        "windows": len(windows),
        "bytes_scored": int(windows[:, 1:].numel()),
        "bits_per_byte": measured,
        "perplexity_per_byte": {name: 2**value for name, value in measured.items()},
        "copy_nats_per_byte": copying,
        "copy_strings": {"windows": COPY_WINDOWS, "characters": COPY_CHARS},
    }
    lines = [
        f"Held-out code, {len(windows)} windows of {TRAINING_LENGTH} bytes (the test split), and a random "
        f"{COPY_CHARS}-character string written twice into {COPY_WINDOWS} of them (loss in nats per byte on each "
        "occurrence; equal: the model does not copy from its context):",
        "",
        "| checkpoint | bits per byte | perplexity per byte | string, first occurrence | string, second occurrence |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {path} | {measured[name]:.4f} | {2 ** measured[name]:.3f} | {copying[name]['first']:.3f} | "
            f"{copying[name]['second']:.3f} |"
            for name, path in checkpoints.items()
        ),
    ]
    if args.reference:
        ratio = measured["model"] / measured["reference"]
        result.update(ratio=ratio, within_5_percent=ratio <= 1 + MAX_INCREASE)
        lines += [
            "",
            f"bits per byte, ratio {ratio:.4f} ({(ratio - 1) * 100:+.2f}%; bound +{MAX_INCREASE:.0%}): "
            + ("within" if result["within_5_percent"] else "NOT within"),
        ]
    result["seconds"] = round(time.perf_counter() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_text(RESULTS / "tiny_model.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(RESULTS / "tiny_model.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
