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

What each stage searches (its space, seeds and how a candidate becomes a scaling) is :mod:`longrope.search_stages`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import yaml

from longrope import distributed, factors, rope
from longrope.args import RopeArguments
from longrope.config_parser import resolved_config
from longrope.documents import ensure_prepared, select_documents
from longrope.errors import LongRopeError
from longrope.evolution import EvolutionConfig, EvolutionSearch
from longrope.io import atomic_save_figure, atomic_write_json, atomic_write_text
from longrope.search_stages import (
    SearchArguments,
    StagePlan,
    evolution_config,
    plan_stage,
    scaling_for,
    seeds_within_space,
)

STATE_FILE = "search_state.json"
GENERATIONS_FILE = "generations.json"
FACTORS_FILE = "factors.json"
CSV_FILE = "result_final.csv"
PLOT_FILE = "factors.png"


# ----------------------------------------------------------------------------------------------------------------
# Fitness


class Fitness:
    """Per-sample mean NLL (nats/token) of the model with a candidate's factors installed."""

    def __init__(
        self, model: Any, args: SearchArguments, plan: StagePlan, samples: list[list[int]], tokenizer: Any = None
    ) -> None:
        self.model = model
        self.args = args
        self.length = plan.target_length
        self.samples = samples
        self.tokenizer = tokenizer
        self._needles: list[Any] | None = None

    def install(self, scaling: rope.RopeScaling) -> None:
        selection = "short" if self.args.stage == "short" else "long"
        rope.install(self.model, scaling, selection=selection)

    def sample_nll(self, index: int) -> float:
        from longrope import needle, perplexity

        if self.args.fitness == "needle":
            sample = self._needle_samples()[index]
            result = needle.needle_sample_nll(self.model, sample, loss_chunk_size=self.args.loss_chunk_size)
        else:
            result = perplexity.document_nll(
                self.model, self.samples[index], self.length, loss_chunk_size=self.args.loss_chunk_size
            )
        if result.scored_tokens == 0 or not math.isfinite(result.nll_sum):
            return math.inf
        return result.nll_sum / result.scored_tokens

    def _needle_samples(self) -> list[Any]:
        from longrope import needle, retrieval

        if self._needles is None:
            if self.tokenizer is None:
                raise LongRopeError("tokenizer_name_or_path: the needle fitness needs the model's tokenizer")
            words = retrieval.template(self.args.retrieval_template)
            self._needles = [
                needle.build_needle_sample(
                    self.tokenizer, sample, self.length, needle.needle_rng(self.args.document_seed, index), words=words
                )
                for index, sample in enumerate(self.samples)
            ]
        return self._needles


# ----------------------------------------------------------------------------------------------------------------
# The run


def _resume_settings(
    args: SearchArguments, rope_args: RopeArguments, model_args: Any, samples_sha: str
) -> dict[str, Any]:
    """What must not change between a run and its resumption (the evolution config is checked by the algorithm)."""
    return {
        "stage": args.stage,
        "target_length": rope_args.target_length,
        "model": getattr(model_args, "model_name_or_path", None),
        "rope_factors_path": rope_args.rope_factors_path,
        "samples_sha256": samples_sha,
        "fitness": args.fitness,
        "rope_mscale": rope_args.rope_mscale,
        "yarn_beta_fast": rope_args.yarn_beta_fast,
        "yarn_beta_slow": rope_args.yarn_beta_slow,
    }


def run_search(
    model: Any,
    args: SearchArguments,
    rope_args: RopeArguments,
    model_args: Any = None,
    tokenizer: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search on ``model`` (already loaded on this rank's device); returns the summary (also written to files).

    Nothing is written to output_dir before the run is known to be allowed there (a refused resume leaves a finished
    search's files as they were).
    """
    output_dir = Path(args.output_dir)
    plan = plan_stage(args, rope_args, model.config)
    config = evolution_config(args, plan)
    ensure_prepared(args.documents_path, args.documents_prepare_config)
    samples, info = select_documents(args.documents_path, plan.target_length, args.num_documents, args.document_seed)
    samples_sha = info["sha256"]
    search = EvolutionSearch(config, seeds_within_space(plan.seeds, config, plan.seed_mscale))
    settings = _resume_settings(args, rope_args, model_args, samples_sha)
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
    if distributed.is_main():
        config_text = yaml.safe_dump(resolved_config(model_args, rope_args, args), sort_keys=False)
        atomic_write_text(output_dir / "config.yaml", config_text)

    fitness = Fitness(model, args, plan, samples, tokenizer)
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
        entry = _log_wave(run_log, search, generation, wave, search.sample_units - units_before, seconds, plan)
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
    summary = _finish(search, args, rope_args, plan, settings, run_log, output_dir)
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
    plan: StagePlan,
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
    tokens = search.sample_units * plan.target_length
    generation_units = units + (previous["sample_units"] if previous else 0)
    entry = {
        "generation": generation,
        "best_fitness": best_fitness,
        "median_fitness": statistics.median(scored) if scored else math.inf,
        "evaluated": len(members),
        "sample_units": generation_units,
        "tokens": generation_units * plan.target_length,
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


def _finish(
    search: EvolutionSearch,
    args: SearchArguments,
    rope_args: RopeArguments,
    plan: StagePlan,
    settings: dict[str, Any],
    run_log: list[dict[str, Any]],
    output_dir: Path,
) -> dict[str, Any]:
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
        "num_documents": args.num_documents,
        "fitness_metric": args.fitness,
        "fitness": best.fitness,
        "seed_fitness": seeds,
        "settings": search.config.to_dict(),
        "evaluated_candidates": len(search.history),
        "evaluated_tokens": search.sample_units * plan.target_length,
        "input_factors": rope_args.rope_factors_path,
    }
    if args.stage == "short":
        searched = f" {plan.seed_mscale:.4g}, searched from there" if search.config.space.search_mscale else ""
        provenance["short_mscale_source"] = f"{plan.mscale_source}{searched}"
    summary = {
        "best_fitness": best.fitness,
        "seed_fitness": seeds,
        "best_generation": best.generation,
        "generations": len(run_log),
        "evaluated_candidates": len(search.history),
        "evaluated_tokens": search.sample_units * plan.target_length,
        "seconds": round(sum(entry["seconds"] for entry in run_log), 3),
        "factors_path": str(output_dir / FACTORS_FILE),
        "start_tokens": scaling.start_tokens,
        "mscale": scaling.mscale,
        "short_mscale": scaling.short_mscale,
    }
    if distributed.is_main():
        factors.save(output_dir / FACTORS_FILE, scaling, provenance)
        factors.write_official_csv(
            output_dir / CSV_FILE, scaling if args.stage != "short" else _short_as_long(scaling)
        )
        atomic_write_json(output_dir / "search_summary.json", summary)
        _plot_factors(output_dir / PLOT_FILE, best.candidate.factors, plan, args)
    return summary


def _short_as_long(scaling: rope.RopeScaling) -> rope.RopeScaling:
    return dataclasses.replace(scaling, long_factors=scaling.short_factors, short_factors=None)


def _plot_factors(path: Path, best: tuple[float, ...], plan: StagePlan, args: SearchArguments) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4), dpi=110)
    for name, seed in plan.seeds.items():
        axis.plot(seed.factors, linestyle="--", linewidth=1, label=name)
    axis.plot(best, color="black", linewidth=2, label="searched")
    axis.set_xlabel("RoPE frequency pair i (low index = high frequency)")
    axis.set_ylabel("rescale factor λ_i")
    axis.set_title(f"LongRoPE factors, stage {args.stage}, target {plan.target_length}")
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
