"""RULER (lm-evaluation-harness's synthetic long-context tasks) on the patched model, offline, scored per length here.

lm-eval's RULER tasks build their samples at run time with the model's tokenizer, sized to ``max_seq_lengths``
(both passed as task metadata). Three things are done here rather than left to lm-eval:

- the per-length average over tasks: the ``ruler`` group aggregates only the 4096 metric, and lengths outside the
  task YAMLs' 4096..131072 metric list get no RULER aggregation, so every (task, length) score is the mean of the
  logged per-sample scores and every length's average the plain mean of its task scores;
- one lm-eval run per length, so ``lm_eval_limit`` samples come from every length (each task's dataset is the
  lengths' samples one after another, and a limit takes the first ones);
- the resources a task fetches at run time (Paul Graham essays from the hub, nltk ``punkt_tab``, QA JSON over
  HTTP) are checked before anything runs: a missing one is a one-line :class:`LongRopeError`, never a network call.
  :data:`OFFLINE_TASKS` need none of them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from longrope import rope
from longrope.errors import LongRopeError

logger = logging.getLogger(__name__)

ESSAYS_DATASET = "baber/paul_graham_essays"
GEN_PREFIX_ROOM = 512  # tokens; the longest gen_prefix (multi-key NIAH with UUIDs) is far shorter


@dataclass(frozen=True)
class Resource:
    what: str  # how the error message names it
    fix: str  # what the user does about it
    network: bool  # fetched over the network at run time (a pip package is not)
    present: Callable[[], bool]


def _has_wonderwords() -> bool:
    return importlib.util.find_spec("wonderwords") is not None


def _has_punkt_tab() -> bool:
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab")
        return True
    except (ImportError, LookupError):
        return False


def _has_essays() -> bool:
    """The essays dataset in the hub cache or in the datasets cache (what ``load_dataset`` reads offline)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(ESSAYS_DATASET, repo_type="dataset", local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        pass
    try:
        import datasets

        cache = datasets.config.HF_DATASETS_CACHE / ESSAYS_DATASET.replace("/", "___")
        return cache.is_dir() and any(cache.iterdir())
    except Exception:  # noqa: BLE001
        return False


def _never_cached() -> bool:
    return False  # lm-eval fetches the QA JSON with requests on every run and keeps no copy


_DOWNLOAD_FIX = "run where the network is reachable with ruler_allow_downloads: true"
RESOURCES: dict[str, Resource] = {
    "wonderwords": Resource(
        "the wonderwords package (every RULER task config imports it)",
        "pip install wonderwords (lm-eval's ruler extra)",
        network=False,
        present=_has_wonderwords,
    ),
    "essays": Resource(
        f"the Paul Graham essays (hub dataset {ESSAYS_DATASET}, downloaded at run time)",
        _DOWNLOAD_FIX,
        network=True,
        present=_has_essays,
    ),
    "punkt_tab": Resource(
        "nltk's punkt_tab sentence splitter (downloaded at run time)",
        _DOWNLOAD_FIX + " (or python -m nltk.downloader punkt_tab)",
        network=True,
        present=_has_punkt_tab,
    ),
    "squad": Resource("the SQuAD v2 dev JSON (fetched over HTTP on every run)", _DOWNLOAD_FIX, True, _never_cached),
    "hotpotqa": Resource("the HotpotQA dev JSON (fetched over HTTP on every run)", _DOWNLOAD_FIX, True, _never_cached),
}

_ESSAY = ("wonderwords", "essays", "punkt_tab")
# Every RULER subtask of lm-eval 0.4.13 (the `ruler` group's members) and what it needs beyond lm-eval itself.
TASKS: dict[str, tuple[str, ...]] = {
    "niah_single_1": ("wonderwords",),  # "repeat" haystack: a fixed sentence
    "niah_single_2": _ESSAY,
    "niah_single_3": _ESSAY,
    "niah_multikey_1": _ESSAY,
    "niah_multikey_2": ("wonderwords",),  # "needle" haystack: generated needles
    "niah_multikey_3": ("wonderwords",),
    "niah_multiquery": _ESSAY,
    "niah_multivalue": _ESSAY,
    "ruler_vt": ("wonderwords",),
    "ruler_cwe": ("wonderwords",),
    "ruler_fwe": ("wonderwords",),
    "ruler_qa_squad": ("wonderwords", "squad"),
    "ruler_qa_hotpot": ("wonderwords", "hotpotqa"),
}
# The offline subset: tasks whose samples come from pip-installed packages only (no download at run time).
OFFLINE_TASKS: tuple[str, ...] = tuple(t for t, needs in TASKS.items() if not any(RESOURCES[r].network for r in needs))


def check_task_names(tasks: list[str]) -> None:
    for task in tasks:
        if task not in TASKS:
            raise LongRopeError(
                f"ruler_tasks: {task!r} is not a RULER task; pick from {', '.join(TASKS)} "
                f"(offline: {', '.join(OFFLINE_TASKS)})"
            )


def check_resources(tasks: list[str], allow_downloads: bool = False) -> None:
    """Every requested task's resources are here (network ones may be fetched when ``allow_downloads``)."""
    check_task_names(tasks)
    for task in tasks:
        for name in TASKS[task]:
            resource = RESOURCES[name]
            if resource.network and allow_downloads:
                continue
            if not resource.present():
                offline = f"; or pick from the offline subset: {', '.join(OFFLINE_TASKS)}" if resource.network else ""
                raise LongRopeError(f"ruler_tasks: {task} needs {resource.what}; {resource.fix}{offline}")


@contextlib.contextmanager
def _no_nltk_download(allow_downloads: bool) -> Iterator[None]:
    """lm-eval's NIAH module calls ``nltk.download("punkt_tab")`` when imported; offline that is a network call
    that can only fail, and the offline NIAH tasks never split sentences."""
    if allow_downloads or _has_punkt_tab():
        yield
        return
    from unittest import mock

    import nltk

    with mock.patch.object(nltk, "download", lambda *args, **kwargs: False):
        yield


def _task_manager(metadata: dict[str, Any]) -> Any:
    """A task index of the RULER folder only (fast to build), with ``metadata`` handed to every task."""
    from pathlib import Path

    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    folder = Path(lm_eval.tasks.__file__).parent / "ruler"
    return TaskManager(include_path=str(folder), include_defaults=False, metadata=metadata)


def sample_scores(samples: list[dict[str, Any]]) -> dict[int, list[float]]:
    """Per-sample RULER scores by the sample's target length (lm-eval logs the score under that length's key)."""
    by_length: dict[int, list[float]] = {}
    for sample in samples:
        length = int(sample["doc"]["max_length"])
        by_length.setdefault(length, []).append(float(sample[str(length)]))
    return by_length


def run_ruler(
    model: Any,
    tokenizer: Any,
    tasks: list[str],
    lengths: list[int],
    limit: int | None = None,
    batch_size: int = 1,
    allow_downloads: bool = False,
) -> dict[str, Any]:
    """RULER ``tasks`` at every length on the patched ``model``: ``{"scores": {task: {length: score}}, "average":
    {length: mean over tasks}, "samples": {task: {length: count}}}`` (length keys are strings, as in results.json)."""
    check_resources(tasks, allow_downloads)
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    with _no_nltk_download(allow_downloads):
        import lm_eval.tasks.ruler.prepare_niah  # noqa: F401  (imported here, under the guard, once)

    device = str(next(model.parameters()).device)
    # max_length only bounds HFLM's left truncation: without it every prompt is cut to the model config's window,
    # whatever the installed RoPE; lm-eval sizes a prompt to its length before appending the task's gen_prefix
    # (tens of tokens), so the bound leaves room for that prefix.
    window = max(lengths) + GEN_PREFIX_ROOM
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device, max_length=window)
    scores: dict[str, dict[str, float]] = {task: {} for task in tasks}
    counts: dict[str, dict[str, int]] = {task: {} for task in tasks}
    with tempfile.TemporaryDirectory(prefix="ruler-tokenizer-") as tokenizer_dir:
        # The tasks load the tokenizer by name; this directory is the very tokenizer object given here.
        tokenizer.save_pretrained(tokenizer_dir)
        for length in lengths:
            manager = _task_manager({"max_seq_lengths": [length], "tokenizer": tokenizer_dir})
            try:
                # One factor set per length, for prompt and answer alike: a prompt sized to the window whose answer
                # crosses it would otherwise be rotated with the short set and answered with the long one.
                with rope.factors_for_generation(model, length):
                    output = simple_evaluate(
                        model=lm,
                        tasks=list(tasks),
                        limit=limit,
                        task_manager=manager,
                        log_samples=True,
                        bootstrap_iters=0,
                    )
            except ValueError as error:
                if "max_seq_length" not in str(error):
                    raise
                first = str(error).splitlines()[0]
                raise LongRopeError(
                    f"ruler_lengths: {length} cannot hold the prompts of {', '.join(tasks)} with this tokenizer "
                    f"({first}); raise it"
                ) from None
            for task in tasks:
                values = sample_scores(output["samples"][task]).get(length, [])
                if values:
                    scores[task][str(length)] = statistics.fmean(values)
                    counts[task][str(length)] = len(values)
    average = {}
    for length in lengths:
        values = [scores[task][str(length)] for task in tasks if str(length) in scores[task]]
        if values:
            average[str(length)] = statistics.fmean(values)
    return {"tasks": list(tasks), "lengths": list(lengths), "scores": scores, "average": average, "samples": counts}
