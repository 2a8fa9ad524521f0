"""The LongRoPE factor search wired to a model: stages, seeds, fitness, parallel evaluators, resumable state.

``longrope.evolution`` is the pure algorithm; this module gives it a fitness (perplexity of the model with a
candidate's factors on N samples truncated to the target length, or LongRoPE2's needle perplexity), evaluators
(every torch.distributed rank scores a share of each generation; results are gathered and told in the same order on
every rank, so the outcome does not depend on the number of evaluators) and files:

``search_state.json``   everything needed to resume, written atomically after every generation
``generations.json``    per generation: best and median fitness, evaluated samples and tokens, wall time, population
``factors.json``        the best factors as a factors file with provenance (model, data hash, settings, fitness)
``result_final.csv``    the same factors in the official repository's one-per-line format
``factors.png``         the factor curve of the best candidate against its seeds

Stages (LongRoPE Sec. 3.3): ``first`` searches the base model for ``target_length``; ``second`` searches a fine-tuned
checkpoint for a further extension, seeded with its factors stretched to the new scale; ``short`` searches short
factors at the original window on the extended model (with a lower factor cap) and writes them, next to the
unchanged long factors, into one factors file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from longrope import distributed, factors, rope
from longrope.documents import DocumentsArguments, ensure_prepared, select_documents
from longrope.errors import LongRopeError
from longrope.evolution import (
    Candidate,
    EvolutionConfig,
    EvolutionSearch,
    SearchSpaceConfig,
)
from longrope.io import atomic_save_figure, atomic_write_json

STATE_FILE = "search_state.json"
GENERATIONS_FILE = "generations.json"
FACTORS_FILE = "factors.json"
CSV_FILE = "result_final.csv"
PLOT_FILE = "factors.png"
STAGES = ("first", "second", "short")
FITNESSES = ("perplexity", "needle")
# Search-space keys the script derives from the model and stage; a config may not set them.
_DERIVED_SPACE_KEYS = {
    "rotary_dim",
    "scale",
    "original_max_position_embeddings",
    "max_position_embeddings",
    "rope_theta",
}


class JsonMapping(dict):
    """A mapping-valued key: a mapping in YAML, a JSON object on the command line (``--evolution '{"mode": "fast"}'``)."""

    def __init__(self, value: Any = (), **kwargs: Any) -> None:
        if isinstance(value, str):
            import argparse

            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}") from None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
        super().__init__(value, **kwargs)


@dataclass
class SearchArguments(DocumentsArguments):
    """Keys only search.py reads (the model keys are ModelArguments'; documents_path is DocumentsArguments')."""

    stage: Literal["first", "second", "short"] = field(
        default="first",
        metadata={
            "help": "first: base model, target_length. second: fine-tuned checkpoint, a further extension seeded "
            "with its factors stretched to the new scale. short: short factors at the original window (4k/8k)."
        },
    )
    target_length: int | None = field(
        default=None,
        metadata={"help": "Length the factors are searched for (short stage: the short length, <= the original)."},
    )
    original_max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Pre-training window (default: the model config's)."}
    )
    factors_path: str | None = field(
        default=None,
        metadata={
            "help": "Input factors file (JSON or official CSV). second/short stage: the fine-tuned model's factors "
            "(default: its config's longrope factors). first stage: an extra seed (optional)."
        },
    )
    num_samples: int = field(default=5, metadata={"help": "N samples of at least target_length (the paper: 5)."})
    sample_seed: int = field(default=0, metadata={"help": "Seed of the random choice of samples."})
    fitness: Literal["perplexity", "needle"] = field(
        default="perplexity",
        metadata={"help": "perplexity: truncated-sample PPL (LongRoPE). needle: answer-token PPL (LongRoPE2)."},
    )
    tokenizer_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer for the needle fitness (default: model_name_or_path)."}
    )
    mscale: str = field(
        default="su",
        metadata={"help": "Attention factor of the candidates: su, yarn, none or a number (unless searched)."},
    )
    yarn_beta_fast: float = field(
        default=32.0, metadata={"help": "YaRN seed beta_fast (official: 32 Llama, 128 Mistral)."}
    )
    yarn_beta_slow: float = field(
        default=1.0, metadata={"help": "YaRN seed beta_slow (official: 1 Llama, 2 Mistral)."}
    )
    evolution: JsonMapping = field(
        default_factory=dict,
        metadata={
            "help": "Algorithm settings (longrope.evolution.EvolutionConfig and SearchSpaceConfig keys): "
            "population_size, num_generations, mode (fast, the default, or paper), variant, factor_max, ..."
        },
    )
    output_dir: str = field(default="outputs/search", metadata={"help": "Where the search writes its files."})
    resume: bool = field(default=False, metadata={"help": "Continue from output_dir/search_state.json."})
    chunk_size: int = field(default=4096, metadata={"help": "Tokens per lm_head + loss chunk (memory-linear PPL)."})
    gpus_per_process: int = field(
        default=1, metadata={"help": "GPUs one evaluator spreads the model over (large models); 1 per GPU otherwise."}
    )
    report_to: str = field(default="none", metadata={"help": "none or wandb (offline when no credentials exist)."})
    run_name: str | None = field(default=None, metadata={"help": "W&B run name (default: output_dir's name)."})

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise LongRopeError(f"stage: {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.fitness not in FITNESSES:
            raise LongRopeError(f"fitness: {self.fitness!r} is not one of {', '.join(FITNESSES)}")
        if not isinstance(self.target_length, int) or self.target_length < 2:
            raise LongRopeError("target_length: required, the length to search factors for (e.g. 2048)")
        if self.documents_path is None:
            raise LongRopeError(
                "documents_path: required; prepare documents with data/prepare.py (output_format documents)"
            )
        for key in ("num_samples", "chunk_size", "gpus_per_process"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise LongRopeError(f"{key}: {getattr(self, key)!r} must be a positive integer")
        if self.report_to not in ("none", "wandb"):
            raise LongRopeError(f"report_to: {self.report_to!r} is not one of none, wandb")
        if not isinstance(self.evolution, dict):
            raise LongRopeError("evolution: must be a mapping of algorithm settings (e.g. {num_generations: 40})")
        derived = sorted(_DERIVED_SPACE_KEYS & set(self.evolution))
        if derived:
            raise LongRopeError(f"evolution.{derived[0]}: derived from the model and stage; remove it")
        rope.resolve_mscale(self.mscale, 2.0, 2)  # validates the policy name


# ----------------------------------------------------------------------------------------------------------------
# Stages: geometry, seeds and how a candidate becomes a RopeScaling


def stretch_factors(long_factors: tuple[float, ...], old_scale: float, new_scale: float) -> tuple[float, ...]:
    """Move factors searched for ``old_scale`` to ``new_scale`` linearly, as the official search's ``rescale``.

    λ' = 1 + (λ - 1)(s' - 1)/(s - 1): extrapolated pairs (λ = 1) stay, interpolated ones grow with the scale.
    """
    if old_scale <= 1:
        return tuple(float(new_scale) for _ in long_factors)
    ratio = (new_scale - 1) / (old_scale - 1)
    return tuple(1.0 + (value - 1.0) * ratio for value in long_factors)


def monotone(values: tuple[float, ...]) -> tuple[float, ...]:
    """Running maximum: the search space is non-decreasing, and derived seeds may carry float noise."""
    result, running = [], -math.inf
    for value in values:
        running = max(running, value)
        result.append(running)
    return tuple(result)


@dataclass
class StagePlan:
    geometry: rope.RopeGeometry
    scale: float
    seeds: dict[str, Candidate]
    base: rope.RopeScaling | None  # the input factors (second/short stage)
    factor_max: float | None


def plan_stage(args: SearchArguments, model_config: Any) -> StagePlan:
    geometry = rope.RopeGeometry.from_config(model_config, args.original_max_position_embeddings)
    original = geometry.original_max_position_embeddings
    base = _input_factors(args, model_config, geometry)
    if args.stage == "short":
        if args.target_length > original:
            raise LongRopeError(
                f"target_length: {args.target_length} is beyond the original window {original}; the short stage "
                "searches at or below it (e.g. 4096/8192 for LLaMA2)"
            )
        if base is None:
            raise LongRopeError("factors_path: the short stage needs the extended model's long factors")
        long_scale = base.scale
        cap = max(1.25, 0.25 * long_scale)
        capped = tuple(min(value, cap) for value in base.long_factors)
        seeds = {
            "original": Candidate(tuple(1.0 for _ in base.long_factors)),
            "long_capped": Candidate(capped),
            # Long factors may exceed their scale (the space reaches 1.25 s), so the compressed ones may exceed cap.
            "long_compressed": Candidate(
                tuple(min(v, cap) for v in stretch_factors(base.long_factors, long_scale, cap))
            ),
        }
        if base.short_factors is not None:
            seeds["short"] = Candidate(tuple(min(v, cap) for v in base.short_factors))
        # The factors the checkpoint was fine-tuned with served every length up to its training length, so they are
        # the natural starting point below it.
        parameters = getattr(model_config, "rope_parameters", None) or {}
        trained = parameters.get("long_factor") if parameters.get("rope_type") == "longrope" else None
        if trained is not None and len(trained) == len(base.long_factors):
            seeds["trained"] = Candidate(tuple(min(float(v), cap) for v in trained))
        return StagePlan(geometry, cap, seeds, base, cap)
    if args.target_length <= original:
        raise LongRopeError(
            f"target_length: {args.target_length} must be larger than the original length {original} "
            f"(stage {args.stage}); the short stage searches at the original window"
        )
    scale = args.target_length / original
    method_options = {"mscale": args.mscale}
    seeds = {
        "pi": Candidate(rope.pi_scaling(geometry, args.target_length, **method_options).long_factors),
        "ntk": Candidate(rope.ntk_scaling(geometry, args.target_length, **method_options).long_factors),
        "yarn": Candidate(
            rope.yarn_scaling(
                geometry,
                args.target_length,
                mscale=args.mscale,
                beta_fast=args.yarn_beta_fast,
                beta_slow=args.yarn_beta_slow,
            ).long_factors
        ),
    }
    if base is not None:
        name = "finetuned_stretched" if args.stage == "second" else "given"
        seeds[name] = Candidate(stretch_factors(base.long_factors, base.scale, scale), base.start_tokens)
    elif args.stage == "second":
        raise LongRopeError(
            "factors_path: the second stage starts from the fine-tuned model's factors; give its factors file "
            "(or a checkpoint whose config has rope_type longrope)"
        )
    seeds = {name: dataclasses.replace(seed, factors=monotone(seed.factors)) for name, seed in seeds.items()}
    return StagePlan(geometry, scale, seeds, base, None)


def seeds_within_space(seeds: dict[str, Candidate], config: EvolutionConfig) -> dict[str, Candidate]:
    """Derived seeds clipped into the search space: searched factors may exceed their scale (up to 1.25 s), so
    stretched or compressed to another scale they can cross the new bounds (clipping keeps them monotone)."""
    low, high = config.space.factor_min, config.space.factor_max
    return {
        name: dataclasses.replace(seed, factors=tuple(min(max(v, low), high) for v in seed.factors))
        for name, seed in seeds.items()
    }


def _input_factors(args: SearchArguments, model_config: Any, geometry: rope.RopeGeometry) -> rope.RopeScaling | None:
    if args.factors_path is not None:
        loaded = factors.load_for_model(args.factors_path, model_config, target_length=args.target_length)
        return loaded.scaling
    parameters = getattr(model_config, "rope_parameters", None) or {}
    if args.stage != "first" and parameters.get("rope_type") == "longrope":
        target = model_config.max_position_embeddings
        short = parameters.get("short_factor")
        long_factors = parameters["long_factor"]
        return rope.longrope_scaling(
            geometry,
            target,
            long_factors,
            None if short == long_factors else short,
            mscale=parameters.get("attention_factor") or "su",
        )
    return None


def scaling_for(args: SearchArguments, plan: StagePlan, candidate: Candidate) -> rope.RopeScaling:
    mscale: Any = candidate.mscale if candidate.mscale is not None else args.mscale
    if args.stage == "short":
        base = plan.base
        return rope.longrope_scaling(
            plan.geometry,
            base.max_position_embeddings,
            base.long_factors,
            candidate.factors,
            start_tokens=base.start_tokens,
            mscale=base.mscale,
        )
    return rope.longrope_scaling(
        plan.geometry, args.target_length, candidate.factors, start_tokens=candidate.start_tokens, mscale=mscale
    )


# ----------------------------------------------------------------------------------------------------------------
# Fitness


class Fitness:
    """Per-sample mean NLL (nats/token) of the model with a candidate's factors installed."""

    def __init__(self, model: Any, args: SearchArguments, samples: list[list[int]], tokenizer: Any = None) -> None:
        self.model = model
        self.args = args
        self.samples = samples
        self.tokenizer = tokenizer
        self.tokens_evaluated = 0
        self._needles: list[Any] | None = None

    def install(self, scaling: rope.RopeScaling) -> None:
        selection = "short" if self.args.stage == "short" else "long"
        rope.install(self.model, scaling, selection=selection)

    def sample_nll(self, index: int) -> float:
        from longrope import metrics

        if self.args.fitness == "needle":
            sample = self._needle_samples()[index]
            result = metrics.needle_sample_nll(self.model, sample, chunk_size=self.args.chunk_size)
        else:
            result = metrics.document_nll(
                self.model, self.samples[index], self.args.target_length, chunk_size=self.args.chunk_size
            )
        self.tokens_evaluated += self.args.target_length
        if result.scored_tokens == 0 or not math.isfinite(result.nll_sum):
            return math.inf
        return result.nll_sum / result.scored_tokens

    def _needle_samples(self) -> list[Any]:
        from longrope import metrics

        if self._needles is None:
            if self.tokenizer is None:
                raise LongRopeError("tokenizer_name_or_path: the needle fitness needs the model's tokenizer")
            self._needles = []
            for index, sample in enumerate(self.samples):
                key, value = metrics.needle_key_value(self.args.sample_seed, index)
                self._needles.append(
                    metrics.build_needle_sample(self.tokenizer, sample, self.args.target_length, key=key, value=value)
                )
        return self._needles


# ----------------------------------------------------------------------------------------------------------------
# The run


def evolution_config(args: SearchArguments, plan: StagePlan, model_config: Any) -> EvolutionConfig:
    settings = dict(args.evolution)
    space_keys = {f.name for f in dataclasses.fields(SearchSpaceConfig)}
    space = {key: settings.pop(key) for key in list(settings) if key in space_keys}
    if plan.factor_max is not None:
        space.setdefault("factor_max", plan.factor_max)
    if "start_token_choices" in space:
        space["start_token_choices"] = tuple(space["start_token_choices"])
    too_far = [n for n in space.get("start_token_choices", ()) if n >= args.target_length]
    if too_far and space.get("variant") == "lambda_start":
        raise LongRopeError(
            f"evolution.start_token_choices: {too_far[0]} start tokens is not below the sample length "
            f"{args.target_length}; drop the choices >= target_length"
        )
    space.update(
        rotary_dim=plan.geometry.rotary_dim,
        scale=plan.scale,
        original_max_position_embeddings=plan.geometry.original_max_position_embeddings,
        rope_theta=plan.geometry.rope_theta,
    )
    if space.get("variant") == "lambda_start" and "start_token_choices" not in space:
        space["start_token_choices"] = tuple(
            n for n in SearchSpaceConfig.__dataclass_fields__["start_token_choices"].default if n < args.target_length
        )
    settings.setdefault("num_samples", args.num_samples)
    if settings["num_samples"] != args.num_samples:
        raise LongRopeError("evolution.num_samples: set num_samples at the top level only")
    try:
        return EvolutionConfig(space=SearchSpaceConfig(**space), **settings)
    except TypeError as error:
        raise LongRopeError(f"evolution: {str(error).split('(')[-1].rstrip(')')}; see longrope/evolution.py") from None


def _resume_settings(args: SearchArguments, model_args: Any, samples_sha: str) -> dict[str, Any]:
    """What must not change between a run and its resumption (the evolution config is checked by the algorithm)."""
    return {
        "stage": args.stage,
        "target_length": args.target_length,
        "model": getattr(model_args, "model_name_or_path", None),
        "factors_path": args.factors_path,
        "samples_sha256": samples_sha,
        "fitness": args.fitness,
        "mscale": args.mscale,
        "yarn_beta_fast": args.yarn_beta_fast,
        "yarn_beta_slow": args.yarn_beta_slow,
    }


def run_search(
    model: Any,
    args: SearchArguments,
    model_args: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search on ``model`` (already loaded on this rank's device); returns the summary (also written to files)."""
    output_dir = Path(args.output_dir)
    plan = plan_stage(args, model.config)
    config = evolution_config(args, plan, model.config)
    ensure_prepared(args.documents_path, args.documents_prepare_config)
    samples, info = select_documents(args.documents_path, args.target_length, args.num_samples, args.sample_seed)
    samples_sha = info["sha256"]
    search = EvolutionSearch(config, seeds_within_space(plan.seeds, config))
    settings = _resume_settings(args, model_args, samples_sha)
    run_log: list[dict[str, Any]] = []
    state_path = output_dir / STATE_FILE
    # The main rank reads the state and every rank gets it, so all ranks resume (or fail) together.
    saved, problem = None, None
    if distributed.is_main() and state_path.exists():
        if args.resume:
            saved = json.loads(state_path.read_text())
        else:
            problem = f"output_dir: {output_dir} already holds a search; pass --resume true or a new output_dir"
    saved, problem = distributed.broadcast_object((saved, problem))
    if problem:
        raise LongRopeError(problem)
    if saved is not None:
        differing = sorted(k for k in settings if saved.get("settings", {}).get(k) != settings[k])
        if differing:
            raise LongRopeError(
                f"resume: {state_path} was written with different {', '.join(differing)}; use the same config or a "
                "new output_dir"
            )
        search.load_state_dict(saved["evolution"])
        run_log = saved.get("run_log", [])

    fitness = Fitness(model, args, samples, tokenizer)
    tracker = _Tracker(args, config) if distributed.is_main() else None
    bar = _progress_bar(config.num_generations + 1, search.generation + int(search.generation_complete), progress)
    my_rank, world = distributed.rank(), distributed.world_size()
    while not search.done:
        started = time.perf_counter()
        candidates = search.ask()
        if not candidates:
            break
        generation, wave = search.generation, search.wave
        mine: dict[str, list[float]] = {}
        for candidate in candidates[my_rank::world]:
            fitness.install(scaling_for(args, plan, candidate))
            scores: list[float] = []
            while search.should_continue(candidate, scores):
                scores.append(fitness.sample_nll(len(scores)))
            mine[candidate.key] = scores
        merged: dict[str, list[float]] = {}
        for part in distributed.all_gather_objects(mine):
            merged.update(part)
        units_before = search.sample_units
        search.tell(merged)
        seconds = time.perf_counter() - started
        entry = _log_wave(run_log, search, generation, wave, search.sample_units - units_before, seconds, args)
        finished = search.generation_complete
        if distributed.is_main():
            atomic_write_json(state_path, {"settings": settings, "evolution": search.state_dict(), "run_log": run_log})
            atomic_write_json(output_dir / GENERATIONS_FILE, _generations_report(search, run_log))
            if tracker is not None and finished:
                tracker.log_generation(entry)
        if bar is not None and finished:
            bar.update(1)
            bar.set_postfix(best=f"{entry['best_fitness']:.4f}")
    if bar is not None:
        bar.close()
    distributed.barrier()
    summary = _finish(search, args, plan, model, model_args, settings, run_log, output_dir)
    if tracker is not None:
        tracker.finish(summary, output_dir)
    return summary


def _log_wave(
    run_log: list[dict[str, Any]],
    search: EvolutionSearch,
    generation: int,
    wave: int,
    units: int,
    seconds: float,
    args: SearchArguments,
) -> dict[str, Any]:
    """Fold a told wave into its generation's entry of ``run_log`` (one entry per generation; fast mode breeds a
    generation in waves, each listed under ``waves`` with the best fitness and token count when it ended)."""
    members = [e for e in search.history if e.generation == generation]
    scored = [e.fitness for e in search.history if e.status != "stopped"]
    best = search.best
    previous = run_log[-1] if run_log and run_log[-1]["generation"] == generation else None
    if previous is not None:
        run_log.pop()
    best_fitness = best.fitness if best else math.inf
    tokens = search.sample_units * args.target_length
    generation_units = units + (previous["sample_units"] if previous else 0)
    entry = {
        "generation": generation,
        "best_fitness": best_fitness,
        "median_fitness": statistics.median(scored) if scored else math.inf,
        "evaluated": len(members),
        "sample_units": generation_units,
        "tokens": generation_units * args.target_length,
        "total_sample_units": search.sample_units,
        "total_tokens": tokens,
        "seconds": round(seconds + (previous["seconds"] if previous else 0.0), 3),
        "waves": (previous["waves"] if previous else [])
        + [{"wave": wave, "best_fitness": best_fitness, "total_tokens": tokens, "seconds": round(seconds, 3)}],
    }
    run_log.append(entry)
    return entry


def _generations_report(search: EvolutionSearch, run_log: list[dict[str, Any]]) -> dict[str, Any]:
    by_generation: dict[int, list[dict[str, Any]]] = {}
    for evaluation in search.history:
        by_generation.setdefault(evaluation.generation, []).append(
            {
                "factors": list(evaluation.candidate.factors),
                "start_tokens": evaluation.candidate.start_tokens,
                "mscale": evaluation.candidate.mscale,
                "origin": evaluation.origin,
                "status": evaluation.status,
                "fitness": evaluation.fitness,
                "sample_nll": list(evaluation.sample_nll) if evaluation.sample_nll else None,
            }
        )
    return {
        "generations": [{**entry, "population": by_generation.get(entry["generation"], [])} for entry in run_log],
    }


def _finish(search, args, plan, model, model_args, settings, run_log, output_dir: Path) -> dict[str, Any]:
    best = search.best
    if best is None or not math.isfinite(best.fitness):
        raise LongRopeError("search: no candidate had a finite fitness; check the model, samples and target_length")
    scaling = scaling_for(args, plan, best.candidate)
    seeds = {e.origin.removeprefix("seed:"): e.fitness for e in search.history if e.origin.startswith("seed:")}
    provenance = {
        "model": settings["model"],
        "stage": args.stage,
        "documents_path": args.documents_path,
        "samples_sha256": settings["samples_sha256"],
        "num_samples": args.num_samples,
        "fitness_metric": args.fitness,
        "fitness": best.fitness,
        "seed_fitness": seeds,
        "settings": search.config.to_dict(),
        "evaluated_candidates": len(search.history),
        "evaluated_tokens": search.sample_units * args.target_length,
        "input_factors": args.factors_path,
    }
    summary = {
        "best_fitness": best.fitness,
        "seed_fitness": seeds,
        "best_generation": best.generation,
        "generations": len(run_log),
        "evaluated_candidates": len(search.history),
        "evaluated_tokens": search.sample_units * args.target_length,
        "seconds": round(sum(entry["seconds"] for entry in run_log), 3),
        "factors_path": str(output_dir / FACTORS_FILE),
        "start_tokens": scaling.start_tokens,
        "mscale": scaling.mscale,
    }
    if distributed.is_main():
        factors.save(output_dir / FACTORS_FILE, scaling, provenance)
        factors.write_official_csv(
            output_dir / CSV_FILE, scaling if args.stage != "short" else _short_as_long(scaling)
        )
        atomic_write_json(output_dir / "search_summary.json", summary)
        _plot_factors(output_dir / PLOT_FILE, best.candidate.factors, plan.seeds, args)
    return summary


def _short_as_long(scaling: rope.RopeScaling) -> rope.RopeScaling:
    return dataclasses.replace(scaling, long_factors=scaling.short_factors, short_factors=None)


def _plot_factors(path: Path, best: tuple[float, ...], seeds: dict[str, Candidate], args: SearchArguments) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for name, seed in seeds.items():
        axis.plot(seed.factors, linestyle="--", linewidth=1, label=name)
    axis.plot(best, color="black", linewidth=2, label="searched")
    axis.set_xlabel("RoPE frequency pair i (low index = high frequency)")
    axis.set_ylabel("rescale factor λ_i")
    axis.set_title(f"LongRoPE factors, stage {args.stage}, target {args.target_length}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    atomic_save_figure(figure, path)


def _progress_bar(total: int, done: int, enabled: bool):
    if not enabled or not distributed.is_main():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=max(done, 0), desc="search generations", unit="gen")


class _Tracker:
    """W&B logging of the search (offline when no credentials exist); a no-op unless report_to is wandb."""

    def __init__(self, args: SearchArguments, config: EvolutionConfig) -> None:
        self.run = None
        if args.report_to != "wandb":
            return
        from longrope.tracking import start_wandb

        self.run = start_wandb(
            project="longrope-search",
            name=args.run_name or Path(args.output_dir).name,
            config={**dataclasses.asdict(args), "evolution_resolved": config.to_dict()},
            output_dir=args.output_dir,
        )

    def log_generation(self, entry: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log({k: v for k, v in entry.items() if isinstance(v, (int, float))}, step=entry["generation"])

    def finish(self, summary: dict[str, Any], output_dir: Path) -> None:
        if self.run is None:
            return
        import wandb

        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        if (output_dir / PLOT_FILE).exists():
            self.run.log({"factors_curve": wandb.Image(str(output_dir / PLOT_FILE))})
        artifact = wandb.Artifact("factors", type="longrope-factors")
        artifact.add_file(str(output_dir / FACTORS_FILE))
        self.run.log_artifact(artifact)
        self.run.finish()
