"""Method comparisons for evaluate.py: RoPE methods x lengths on one model, with perplexity, passkey, needle
perplexity and lm-evaluation-harness tasks, written as results.json, results.md and plot.png.

A method is a registered method name (:func:`longrope.rope.method_names`), a factors file path (JSON or official
CSV), or a mapping of ``name`` plus the RoPE keys every script shares (``rope_method``, ``rope_factors_path``,
``rope_mscale``, ``target_length``, ``yarn_beta_fast``, ``yarn_beta_slow``); the top-level RoPE keys are every
entry's defaults. Computed methods are set up for ``target_length`` (default: the longest evaluated length); a length
beyond what a method was set up for is evaluated with a warning, never refused.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longrope import distributed, rope, sequence_parallel
from longrope.args import (
    DocumentsArguments,
    LossArguments,
    OutputArguments,
    RetrievalArguments,
    RopeArguments,
    SequenceParallelArguments,
    TrackingArguments,
    require_positive_int,
)
from longrope.documents import ensure_prepared, select_documents
from longrope.errors import LongRopeError
from longrope.io import atomic_save_figure, atomic_write_json, atomic_write_text
from longrope.rope_config import ResolvedRope, resolve_rope

logger = logging.getLogger(__name__)


@dataclass
class EvalArguments(
    DocumentsArguments,
    SequenceParallelArguments,
    LossArguments,
    OutputArguments,
    TrackingArguments,
    RetrievalArguments,
):
    """Keys only evaluate.py reads; the model, tokenizer, RoPE (defaults of every method entry), documents,
    sp_size, loss_chunk_size, output, tracking and retrieval-task keys are the shared ones of :mod:`longrope.args`."""

    methods: list[Any] = field(
        default_factory=lambda: ["none", "pi", "ntk", "yarn"],
        metadata={
            "help": "RoPE methods to compare: a method name (longrope.rope.METHODS), a factors file path, or (YAML) a "
            "mapping of name plus the RoPE keys {name, rope_method, rope_factors_path, rope_mscale, target_length, "
            "yarn_beta_fast, yarn_beta_slow}. Top-level RoPE keys are the defaults of every entry."
        },
    )
    lengths: list[int] = field(default_factory=list, metadata={"help": "Evaluation lengths for perplexity."})
    ppl_mode: Literal["truncate", "sliding"] = field(
        default="truncate", metadata={"help": "truncate: first L tokens. sliding: windows of L, stride ppl_stride."}
    )
    ppl_stride: int | None = field(default=None, metadata={"help": "Sliding-window stride (the paper: 256)."})
    add_bos: bool = field(default=False, metadata={"help": "Prepend BOS to every window (the official code does)."})
    retrieval_lengths: list[int] = field(
        default_factory=list, metadata={"help": "Prompt lengths (tokens) of every retrieval_tasks task."}
    )
    retrieval_depths: list[float] = field(
        default_factory=lambda: [0.1, 0.5, 0.9],
        metadata={"help": "Where the (first) needle sits: the fraction of the haystack before it."},
    )
    retrieval_trials: int = field(default=10, metadata={"help": "Seeded samples per (task, length, depth) cell."})
    retrieval_haystack: str = field(
        default="filler",
        metadata={
            "help": "filler: the passkey's filler sentences (the paper). documents: windows of documents_path "
            "(held-out text; the code template needs it)."
        },
    )
    needle_lengths: list[int] = field(default_factory=list, metadata={"help": "Needle-perplexity lengths."})
    lm_eval_tasks: list[str] = field(
        default_factory=list,
        metadata={"help": "lm-evaluation-harness tasks on the patched model (e.g. arc_challenge)."},
    )
    lm_eval_num_fewshot: list[int] = field(
        default_factory=list, metadata={"help": "Few-shot count per task, in lm_eval_tasks order (empty: defaults)."}
    )
    lm_eval_limit: int | None = field(default=None, metadata={"help": "Examples per task (for smoke runs)."})
    lm_eval_include_path: str | None = field(default=None, metadata={"help": "Folder of custom lm-eval task YAMLs."})
    lm_eval_batch_size: int = field(default=1, metadata={"help": "lm-eval batch size."})
    ruler_tasks: list[str] = field(
        default_factory=list,
        metadata={
            "help": "lm-eval RULER subtasks (longrope.ruler.TASKS; offline: longrope.ruler.OFFLINE_TASKS), each run at "
            "every ruler_lengths length; reuses lm_eval_limit and lm_eval_batch_size."
        },
    )
    ruler_lengths: list[int] = field(default_factory=list, metadata={"help": "RULER prompt lengths (tokens)."})
    ruler_allow_downloads: bool = field(
        default=False,
        metadata={"help": "Let RULER tasks fetch their data at run time (essays, nltk punkt_tab, QA JSON)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.methods:
            raise LongRopeError("methods: give at least one method (a method name, a factors file or a mapping)")
        for key in ("lengths", "retrieval_lengths", "needle_lengths", "ruler_lengths"):
            values = getattr(self, key)
            if any(isinstance(v, bool) or not isinstance(v, int) or v < 2 for v in values):
                raise LongRopeError(f"{key}: {values!r} must be token counts >= 2")
        if self.ruler_tasks or self.ruler_lengths:
            from longrope import ruler

            ruler.check_task_names(self.ruler_tasks)
            if not self.ruler_tasks:
                raise LongRopeError(f"ruler_tasks: required with ruler_lengths; pick from {', '.join(ruler.TASKS)}")
            if not self.ruler_lengths:
                raise LongRopeError("ruler_lengths: required with ruler_tasks; give prompt lengths, e.g. [4096, 8192]")
        evaluated = (self.lengths, self.retrieval_lengths, self.needle_lengths, self.lm_eval_tasks, self.ruler_tasks)
        if not any(evaluated):
            raise LongRopeError(
                "lengths: nothing to evaluate; set lengths, retrieval_lengths, needle_lengths, lm_eval_tasks or "
                "ruler_tasks"
            )
        if (self.lengths or self.needle_lengths) and self.documents_path is None:
            raise LongRopeError("documents_path: required for perplexity; prepare documents with data/prepare.py")
        if self.retrieval_lengths:
            from longrope import retrieval

            retrieval.check_haystack(self.retrieval_template, self.retrieval_haystack)
            if self.retrieval_haystack == "documents" and self.documents_path is None:
                raise LongRopeError("documents_path: required with retrieval_haystack documents (the haystack text)")
        if self.ppl_mode == "sliding" and self.ppl_stride is None:
            raise LongRopeError("ppl_stride: required with ppl_mode sliding (the paper uses 256)")
        if self.lm_eval_num_fewshot and len(self.lm_eval_num_fewshot) != len(self.lm_eval_tasks):
            raise LongRopeError(
                f"lm_eval_num_fewshot: {len(self.lm_eval_num_fewshot)} values for {len(self.lm_eval_tasks)} tasks; "
                "give one per task or none"
            )
        if self.sp_size > 1 and (self.retrieval_lengths or self.lm_eval_tasks or self.ruler_tasks):
            raise LongRopeError(
                "sp_size: retrieval decoding and lm-eval tasks run unsharded (RULER too); evaluate them in a separate run with "
                "sp_size 1"
            )
        if any(not 0.0 <= d <= 1.0 for d in self.retrieval_depths):
            raise LongRopeError(f"retrieval_depths: {self.retrieval_depths!r} must be fractions in [0, 1]")
        for key in ("retrieval_trials", "lm_eval_batch_size"):
            require_positive_int(key, getattr(self, key))

    @property
    def all_lengths(self) -> list[int]:
        return self.lengths + self.retrieval_lengths + self.needle_lengths + self.ruler_lengths


# ----------------------------------------------------------------------------------------------------------------
# Methods


@dataclass
class MethodSpec:
    name: str
    resolved: ResolvedRope

    @property
    def scaling(self) -> rope.RopeScaling:
        return self.resolved.scaling


def _method_entry(entry: Any, where: str) -> dict[str, Any]:
    """A ``methods`` item as a mapping of ``name`` plus RoPE keys."""
    if isinstance(entry, dict):
        return dict(entry)
    if not isinstance(entry, str):
        raise LongRopeError(f"{where}: {entry!r} must be a method name, a factors file path or a mapping")
    if entry.endswith((".json", ".csv")) or os.path.sep in entry:
        return {"rope_factors_path": entry}
    return {"rope_method": entry}


def resolve_methods(args: EvalArguments, rope_args: RopeArguments, model_config: Any) -> list[MethodSpec]:
    """Every method as a checked RopeScaling, before any evaluation starts (so a bad method fails fast)."""
    geometry = rope.RopeGeometry.from_config(model_config, rope_args.original_max_position_embeddings)
    default_target = max(args.all_lengths or [geometry.original_max_position_embeddings])
    specs: list[MethodSpec] = []
    for index, item in enumerate(args.methods):
        where = f"methods[{index}]"
        entry = _method_entry(item, where)
        name = entry.pop("name", None)
        method_args = RopeArguments.from_mapping(entry, where, defaults=rope_args)
        resolved = resolve_rope(method_args, model_config, default_target=default_target, where=f"{where}.")
        if name is None:
            path = method_args.rope_factors_path
            name = (Path(path).parent.name or Path(path).stem) if path else method_args.method
        specs.append(MethodSpec(str(name), resolved))
    names = [spec.name for spec in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise LongRopeError(f"methods: the name {duplicates[0]!r} is used twice; give each method a distinct name")
    return specs


def length_warnings(spec: MethodSpec, lengths: list[int]) -> list[str]:
    if spec.scaling.method == "none":
        return []
    limit = spec.scaling.max_position_embeddings
    beyond = [length for length in lengths if length > limit]
    if not beyond:
        return []
    return [f"{spec.name}: lengths {beyond} are beyond the {limit} tokens it was set up for (evaluated anyway)"]


# ----------------------------------------------------------------------------------------------------------------
# Running


def check_prompt_lengths(tokenizer: Any, args: EvalArguments) -> None:
    """Retrieval and needle grids that cannot hold their prompts fail before any evaluation starts."""
    from longrope import needle, retrieval

    words = retrieval.template(args.retrieval_template)
    if args.retrieval_lengths:
        retrieval.check_grid(tokenizer, args.retrieval_tasks, args.retrieval_lengths, words)
    if args.needle_lengths:
        minimum = retrieval.minimum_length(tokenizer, needle.TASK, words, with_answer=True)
        short = [length for length in args.needle_lengths if length < minimum]
        if short:
            raise LongRopeError(
                f"needle_lengths: {short} cannot hold the {words.name} needle template (about {minimum} tokens with "
                "this tokenizer); drop those lengths"
            )


# Each finished method's entry is kept in output_dir/methods/ so that an interrupted run (a passkey grid is an hour on
# a CPU) resumes at its first unfinished method, and a method added to the list later costs only itself. An entry is
# reused only when everything behind its numbers matches: every setting but the method list, the method's resolved
# scaling and its factors file's sha256.
METHOD_CHECKPOINTS = "methods"


def method_fingerprint(settings: dict[str, Any], spec: MethodSpec) -> str:
    shared = {key: value for key, value in settings.items() if key != "methods"}
    payload = {"settings": shared, "scaling": repr(spec.scaling), "rope_factors_sha256": spec.resolved.sha256}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def method_checkpoint_path(checkpoint_dir: str | Path, name: str) -> Path:
    return Path(checkpoint_dir) / METHOD_CHECKPOINTS / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".json")


def load_method_checkpoint(checkpoint_dir: str | Path, spec: MethodSpec, fingerprint: str) -> dict[str, Any] | None:
    path = method_checkpoint_path(checkpoint_dir, spec.name)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint or saved.get("name") != spec.name:
        return None
    return saved.get("entry")


def evaluate_methods(
    model: Any,
    tokenizer: Any,
    args: EvalArguments,
    specs: list[MethodSpec],
    model_name: str | None = None,
    progress: bool = True,
    checkpoint_dir: str | Path | None = None,
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every method of ``specs`` (from :func:`resolve_methods`) installed in turn into ``model`` and evaluated.

    With ``checkpoint_dir``, a method whose entry was saved there under the same ``settings`` (the run's resolved
    config) is reused instead of evaluated, and every newly evaluated one is saved.
    """
    from longrope import needle, perplexity, retrieval

    documents, data_info, haystack = [], None, None
    longest = max(args.lengths + args.needle_lengths, default=0)
    if longest or (args.retrieval_lengths and args.retrieval_haystack == "documents"):
        ensure_prepared(args.documents_path, args.documents_prepare_config)
    if longest:
        documents, data_info = select_documents(args.documents_path, longest, args.num_documents, args.document_seed)
    if args.retrieval_lengths and args.retrieval_haystack == "documents":
        # Every document long enough for the longest prompt serves as haystack (seeded windows of them).
        haystack, _ = select_documents(args.documents_path, max(args.retrieval_lengths), None, args.document_seed)
    check_prompt_lengths(tokenizer, args)
    words = retrieval.template(args.retrieval_template)
    if args.lm_eval_tasks:
        lm_eval_task_manager(args)
    if args.ruler_tasks:
        from longrope import ruler

        ruler.check_resources(args.ruler_tasks, args.ruler_allow_downloads)
    group = sequence_parallel.register_for_evaluation(model, args.sp_size, distributed.world_size())
    results: dict[str, Any] = {
        "model": model_name,
        "data": data_info,
        "protocol": {
            "ppl_mode": args.ppl_mode,
            "ppl_stride": args.ppl_stride,
            "add_bos": args.add_bos,
            "sp_size": args.sp_size,
            "loss_chunk_size": args.loss_chunk_size,
        },
        "lengths": args.lengths,
        "methods": [],
    }
    if args.retrieval_lengths:
        results["retrieval"] = {
            "tasks": args.retrieval_tasks,
            "lengths": args.retrieval_lengths,
            "depths": args.retrieval_depths,
            "trials": args.retrieval_trials,
            "template": args.retrieval_template,
            "haystack": args.retrieval_haystack,
        }
    for spec in specs:
        fingerprint = method_fingerprint(settings or {}, spec)
        if checkpoint_dir is not None:
            saved = load_method_checkpoint(checkpoint_dir, spec, fingerprint)
            if saved is not None:
                if distributed.is_main():
                    path = method_checkpoint_path(checkpoint_dir, spec.name)
                    logger.warning(f"method {spec.name}: reused from {path} (same settings); delete it to re-evaluate")
                results["methods"].append(saved)
                continue
        rope.install(model, spec.scaling, sequence_parallel_group=group)
        entry: dict[str, Any] = {
            "name": spec.name,
            "rope_method": spec.scaling.method,
            "rope_factors_path": spec.resolved.factors_path,
            "rope_factors_sha256": spec.resolved.sha256,
            "max_position_embeddings": spec.scaling.max_position_embeddings,
            "mscale": spec.scaling.mscale,
            "short_mscale": spec.scaling.short_mscale,
            "start_tokens": spec.scaling.start_tokens,
            "warnings": spec.resolved.notes + length_warnings(spec, args.all_lengths),
        }
        for warning in entry["warnings"]:
            if distributed.is_main():
                logger.warning(warning)
        if args.lengths:
            report = perplexity.perplexity(
                model,
                documents,
                args.lengths,
                mode=args.ppl_mode,
                stride=args.ppl_stride,
                add_bos=args.add_bos,
                loss_chunk_size=args.loss_chunk_size,
                progress=progress,
                sequence_parallel_group=group,
            )
            entry["perplexity"] = {str(k): v for k, v in report.ppl_by_length().items()}
            entry["perplexity_detail"] = report.to_dict()
        if args.needle_lengths:
            needles = needle.needle_perplexity(
                model,
                tokenizer,
                documents,
                args.needle_lengths,
                words=words,
                loss_chunk_size=args.loss_chunk_size,
                sequence_parallel_group=group,
            )
            entry["needle_perplexity"] = {str(k): v for k, v in needles.ppl_by_length().items()}
        if args.retrieval_lengths:
            reports = retrieval.retrieval_suite(
                model,
                tokenizer,
                args.retrieval_tasks,
                args.retrieval_lengths,
                args.retrieval_depths,
                trials=args.retrieval_trials,
                seed=args.document_seed,
                words=words,
                documents=haystack,
                progress=progress,
            )
            entry["retrieval"] = {task: report.to_dict() for task, report in reports.items()}
            entry["retrieval_accuracy"] = {
                task: {str(k): v for k, v in report.accuracy_by_length().items()} for task, report in reports.items()
            }
        if args.lm_eval_tasks:
            entry["lm_eval"] = run_lm_eval(model, tokenizer, args)
        if args.ruler_tasks:
            from longrope import ruler

            entry["ruler"] = ruler.run_ruler(
                model,
                tokenizer,
                args.ruler_tasks,
                args.ruler_lengths,
                limit=args.lm_eval_limit,
                batch_size=args.lm_eval_batch_size,
                allow_downloads=args.ruler_allow_downloads,
            )
        results["methods"].append(entry)
        if checkpoint_dir is not None and distributed.is_main():
            atomic_write_json(
                method_checkpoint_path(checkpoint_dir, spec.name),
                {"name": spec.name, "fingerprint": fingerprint, "entry": entry},
            )
    return results


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str | None) -> Any:
    # Indexing every lm-eval task takes seconds; one index serves all methods.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def lm_eval_task_manager(args: EvalArguments) -> Any:
    """lm-eval's task index (with the custom task folder), after checking every requested task exists."""
    manager = _task_manager(args.lm_eval_include_path)
    known = set(manager.all_tasks)
    for task in args.lm_eval_tasks:
        if task not in known:
            close = sorted(t for t in known if task.split("_")[0] in t)[:3]
            hint = f" (similar: {', '.join(close)})" if close else ""
            raise LongRopeError(f"lm_eval_tasks: {task!r} is not an lm-eval task{hint}; check lm_eval --tasks list")
    return manager


def run_lm_eval(model: Any, tokenizer: Any, args: EvalArguments) -> dict[str, Any]:
    """lm-evaluation-harness on the patched model object (so the installed RoPE method is what gets scored)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = lm_eval_task_manager(args)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.lm_eval_batch_size, device=device)
    scores: dict[str, Any] = {}
    for index, task in enumerate(args.lm_eval_tasks):
        fewshot = args.lm_eval_num_fewshot[index] if args.lm_eval_num_fewshot else None
        output = simple_evaluate(
            model=lm,
            tasks=[task],
            num_fewshot=fewshot,
            limit=args.lm_eval_limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
        )
        task_results = (output or {}).get("results", {}).get(task, {})
        scores[task] = {k: v for k, v in task_results.items() if isinstance(v, (int, float)) and "stderr" not in k}
        scores[task]["num_fewshot"] = fewshot
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Outputs


def markdown_table(results: dict[str, Any]) -> str:
    lines = []
    lengths = results.get("lengths") or []
    if lengths:
        header = "| method | " + " | ".join(str(length) for length in lengths) + " |"
        lines += ["Perplexity by evaluation length:", "", header, "|" + "---|" * (len(lengths) + 1)]
        for entry in results["methods"]:
            values = [entry.get("perplexity", {}).get(str(length)) for length in lengths]
            best = [_is_best(results, length, value) for length, value in zip(lengths, values)]
            cells = [_format(value, bold) for value, bold in zip(values, best)]
            lines.append(f"| {entry['name']} | " + " | ".join(cells) + " |")
    retrieval_ = results.get("retrieval")
    if retrieval_:
        columns = [str(length) for length in retrieval_["lengths"]]
        lines += [
            "",
            f"Retrieval accuracy ({retrieval_['template']} template, {retrieval_['haystack']} haystack; "
            f"{retrieval_['trials']} trials x {len(retrieval_['depths'])} depths per length; a heat map per method "
            "in retrieval-<method>.png):",
            "",
            "| method | task | " + " | ".join(columns) + " |",
            "|" + "---|" * (len(columns) + 2),
        ]
        for entry in results["methods"]:
            for task, by_length in entry.get("retrieval_accuracy", {}).items():
                cells = [_format(by_length.get(column)) for column in columns]
                lines.append(f"| {entry['name']} | {task} | " + " | ".join(cells) + " |")
    for key, title in (("needle_perplexity", "Needle perplexity"),):
        rows = [e for e in results["methods"] if key in e]
        if rows:
            columns = list(rows[0][key])
            lines += [
                "",
                f"{title}:",
                "",
                "| method | " + " | ".join(columns) + " |",
                "|" + "---|" * (len(columns) + 1),
            ]
            lines += [f"| {e['name']} | " + " | ".join(_format(e[key][c]) for c in columns) + " |" for e in rows]
    rows = [e for e in results["methods"] if "lm_eval" in e]
    if rows:
        lines += ["", "lm-evaluation-harness:", "", "| method | task | metric | value |", "|---|---|---|---|"]
        for entry in rows:
            for task, metrics_ in entry["lm_eval"].items():
                for metric, value in metrics_.items():
                    if metric != "num_fewshot":
                        lines.append(f"| {entry['name']} | {task} | {metric} | {_format(value)} |")
    rows = [e for e in results["methods"] if "ruler" in e]
    if rows:
        columns = rows[0]["ruler"]["lengths"]
        lines += [
            "",
            "RULER (lm-eval tasks; average: the mean over tasks at each length, computed here):",
            "",
            "| method | task | " + " | ".join(str(c) for c in columns) + " |",
            "|" + "---|" * (len(columns) + 2),
        ]
        for entry in rows:
            ruler_ = entry["ruler"]
            table = [("average", ruler_["average"]), *ruler_["scores"].items()]
            for task, by_length in table:
                cells = [_format(by_length.get(str(c))) for c in columns]
                lines.append(f"| {entry['name']} | {task} | " + " | ".join(cells) + " |")
    warnings = [w for e in results["methods"] for w in e.get("warnings", [])]
    if warnings:
        lines += ["", *[f"- warning: {w}" for w in warnings]]
    data = results.get("data")
    if data:
        lines += ["", f"Data: {data['documents']} documents of {data['tokens_each']} tokens from `{data['path']}`."]
    return "\n".join(lines) + "\n"


def _is_best(results: dict[str, Any], length: int, value: float | None) -> bool:
    values = [e.get("perplexity", {}).get(str(length)) for e in results["methods"]]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return value is not None and bool(finite) and value == min(finite) and len(finite) > 1


def _format(value: Any, bold: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        text = "inf" if math.isinf(value) else (f"{value:.3f}" if value < 1000 else f"{value:.3g}")
    else:
        text = str(value)
    return f"**{text}**" if bold else text


def plot_perplexity(results: dict[str, Any], path: Path, title: str = "Perplexity vs evaluation length") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5), dpi=110)
    lengths = results["lengths"]
    for entry in results["methods"]:
        values = [entry.get("perplexity", {}).get(str(length), math.nan) for length in lengths]
        axis.plot(lengths, values, marker="o", label=entry["name"])
    axis.set_xscale("log", base=2)
    axis.set_yscale("log")
    axis.set_xticks(lengths, [str(length) for length in lengths])
    axis.set_xlabel("evaluation length (tokens)")
    axis.set_ylabel("perplexity")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    figure.tight_layout()
    atomic_save_figure(figure, path)


def retrieval_plot_name(method: str) -> str:
    return "retrieval-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", method) + ".png"


def plot_retrieval(entry: dict[str, Any], protocol: dict[str, Any], path: Path) -> None:
    """One method's retrieval accuracy: a depth x length heat map per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = list(entry["retrieval"])
    lengths, depths = protocol["lengths"], protocol["depths"]
    figure, axes = plt.subplots(
        1,
        len(tasks),
        figsize=(1.2 + 0.9 * len(lengths) * len(tasks), 1.4 + 0.45 * len(depths)),
        dpi=110,
        squeeze=False,
    )
    for axis, task in zip(axes[0], tasks):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for cell in entry["retrieval"][task]["cells"]:
            grid[depths.index(cell["depth"]), lengths.index(cell["length"])] = cell["accuracy"]
        axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for row in range(len(depths)):
            for column in range(len(lengths)):
                axis.text(column, row, f"{100 * grid[row, column]:.0f}", ha="center", va="center", fontsize=7)
        axis.set_xticks(range(len(lengths)), [str(length) for length in lengths], rotation=45, fontsize=7)
        axis.set_yticks(range(len(depths)), [f"{depth:g}" for depth in depths], fontsize=7)
        axis.set_title(task, fontsize=8)
        axis.set_xlabel("length (tokens)", fontsize=7)
    axes[0][0].set_ylabel("depth", fontsize=7)
    figure.suptitle(f"{entry['name']}: retrieval accuracy (%)", fontsize=9)
    figure.tight_layout()
    atomic_save_figure(figure, path)


def write_outputs(results: dict[str, Any], output_dir: str | Path) -> dict[str, Path]:
    output_dir = Path(output_dir)
    paths = {"json": output_dir / "results.json", "markdown": output_dir / "results.md"}
    atomic_write_json(paths["json"], results)
    atomic_write_text(paths["markdown"], markdown_table(results))
    if results.get("lengths"):
        paths["plot"] = output_dir / "plot.png"
        plot_perplexity(results, paths["plot"])
    for entry in results["methods"]:
        if "retrieval" in entry:
            paths[f"retrieval:{entry['name']}"] = output_dir / retrieval_plot_name(entry["name"])
            plot_retrieval(entry, results["retrieval"], paths[f"retrieval:{entry['name']}"])
    return paths


def log_to_wandb(results: dict[str, Any], paths: dict[str, Path], args: EvalArguments) -> None:
    import wandb

    from longrope.tracking import start_wandb

    run = start_wandb(
        "longrope-eval", args.run_name or Path(args.output_dir).name, {"model": results["model"]}, args.output_dir
    )
    lengths = results.get("lengths") or []
    if lengths:
        table = wandb.Table(columns=["method", *[str(length) for length in lengths]])
        for entry in results["methods"]:
            table.add_data(entry["name"], *[entry.get("perplexity", {}).get(str(length)) for length in lengths])
        run.log({"perplexity": table})
    if "plot" in paths:
        run.log({"perplexity_plot": wandb.Image(str(paths["plot"]))})
    run.finish()
