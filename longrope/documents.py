"""Long documents for search samples and evaluation: building them on first use, and the one selection rule."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from longrope import REPOSITORY, distributed
from longrope.errors import LongRopeError


def ensure_prepared(path: str, prepare_config: str | None) -> None:
    """Build ``path`` with ``data/prepare.py`` when it is missing and a prepare config is given (main rank only).

    Only a missing, empty or earlier-prepared folder is (re)built: a folder of the user's is refused, never replaced.
    """
    from longrope.data import check_dataset_path

    if (Path(path) / "dataset_dict.json").is_file() or prepare_config is None:
        return
    check_dataset_path(path, "documents_path")
    if distributed.is_main():
        if not Path(prepare_config).is_file():
            raise LongRopeError(f"documents_prepare_config: {prepare_config} does not exist")
        command = [sys.executable, "-m", "data.prepare", "--config", prepare_config, "--dataset_path", path]
        completed = subprocess.run(command, cwd=REPOSITORY, env={**os.environ, "PYTHONPATH": str(REPOSITORY)})
        if completed.returncode != 0:
            raise LongRopeError(f"documents_prepare_config: `{' '.join(command[1:])}` failed; run it to see why")
    distributed.barrier()


def select_documents(
    path: str, min_tokens: int, count: int | None, seed: int, key: str = "documents_path"
) -> tuple[list[list[int]], dict[str, Any]]:
    """A seeded random choice of ``count`` documents with at least ``min_tokens`` tokens (all when ``count`` is
    None), each cut to ``min_tokens``; plus a description with the sha256 of exactly those tokens (provenance)."""
    import torch

    from longrope.data import load_prepared_dataset

    dataset = load_prepared_dataset(
        path, prepare_hint="prepare it (python -m data.prepare) or set documents_prepare_config", key=key
    )
    split = dataset["train"] if "train" in dataset else dataset[next(iter(dataset))]
    lengths = [len(ids) for ids in split["input_ids"]]
    eligible = [i for i, n in enumerate(lengths) if n >= min_tokens]
    needed = count or 1
    if len(eligible) < needed:
        raise LongRopeError(
            f"{key} {path}: {len(eligible)} documents have >= {min_tokens} tokens, {needed} needed "
            f"(longest: {max(lengths, default=0)}); prepare longer documents or lower the length / count"
        )
    if count is not None:
        order = torch.randperm(len(eligible), generator=torch.Generator().manual_seed(seed))[:count].tolist()
        eligible = sorted(eligible[i] for i in order)
    documents = [list(split[i]["input_ids"][:min_tokens]) for i in eligible]
    digest = hashlib.sha256(json.dumps(documents).encode()).hexdigest()
    description = {"path": path, "documents": len(documents), "tokens_each": min_tokens, "sha256": digest}
    return documents, {**description, "seed": seed if count is not None else None}
