"""Search cost: the paper's Algorithm 1 (`mode: paper`) vs the default (`mode: fast`), same model, data and seeds.

For each seed, the paper mode runs to the end; the fast mode runs until its best fitness reaches the paper mode's
final fitness (it may use up to --extra_generations more generations; it is run a few generations at a time through
search.py's resume, which gives exactly the uninterrupted run, and stops once it has reached the target). Reported:
evaluated tokens and wall time until then, their ratios, and the median over seeds. Target: fast <= 1/3 of the paper
mode's evaluated tokens.

Paper-mode results are reused from the previous results file when its setup (model, samples, population,
generations) matches and the seed is there: `mode: paper` is fixed, and its token counts do not depend on the
machine (``--rerun_paper`` runs it again, e.g. for fresh wall times).

    python -m data.prepare --config configs/tiny/data_search.yaml
    python -m benchmarks.search_efficiency                       # tiny model, 256 -> 2048, 3 seeds
    python -m benchmarks.search_efficiency --seeds 0 --generations 6 --population 16   # a quick look
    python -m benchmarks.search_efficiency --seeds 0 1 2 3 4 5 --fast_overrides '{"wave_size": 0}' \
        --output /tmp/no-waves                                  # an ablation (a new output file runs paper mode too)

Writes benchmarks/results/search_efficiency.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longrope.args import ModelArguments, RopeArguments  # noqa: E402
from longrope.io import atomic_write_json, atomic_write_text  # noqa: E402
from longrope.modeling import load_for_evaluation  # noqa: E402
from longrope.search_stages import SearchArguments  # noqa: E402
from longrope.searcher import run_search  # noqa: E402


def run(
    model, mode: str, seed: int, args: argparse.Namespace, generations: int, output_dir: str, resume: bool = False
) -> dict:
    evolution = {
        "mode": mode,
        "seed": seed,
        "population_size": args.population,
        "num_mutations": args.population // 4,
        "num_crossovers": args.population // 4,
        "num_parents": args.population // 2,
        "num_generations": generations,
        **(args.fast_overrides if mode == "fast" else {}),
    }
    search_args = SearchArguments(
        documents_path=args.documents_path,
        num_documents=args.samples,
        evolution=evolution,
        output_dir=output_dir,
        resume=resume,
    )
    started = time.perf_counter()
    summary = run_search(model, search_args, RopeArguments(target_length=args.target_length), progress=False)
    seconds = time.perf_counter() - started
    log = json.loads((Path(output_dir) / "generations.json").read_text())["generations"]
    return {"summary": summary, "seconds": seconds, "log": log}


def crossing(log: list[dict], target: float, tolerance: float) -> dict | None:
    """The first generation (and wave, in fast mode) after which the best fitness is within ``tolerance``
    (relative) of ``target``: tokens and seconds spent until then."""
    elapsed = 0.0
    for entry in log:
        for wave in entry.get("waves") or [entry]:
            elapsed += wave["seconds"]
            if wave["best_fitness"] <= target * (1 + tolerance):
                return {"generation": entry["generation"], "tokens": wave["total_tokens"], "seconds": elapsed}
    return None


def run_until(model, seed: int, args: argparse.Namespace, target: float, output_dir: str) -> dict:
    """Fast mode, ``args.chunk`` generations at a time (resumed), until it reaches ``target`` or the last generation."""
    limit = args.generations + args.extra_generations
    generations, started = 0, time.perf_counter()
    while True:
        generations = min(limit, generations + args.chunk)
        result = run(model, "fast", seed, args, generations, output_dir, resume=generations > args.chunk)
        if crossing(result["log"], target, args.tolerance) is not None or generations >= limit:
            return {**result, "seconds": time.perf_counter() - started}


_PAPER_SETUP_KEYS = ("model", "documents_path", "target_length", "samples", "population", "generations")


def recorded_paper_rows(args: argparse.Namespace) -> dict[int, dict]:
    """Paper-mode rows of the previous results file, by seed, if it was made with the same setup."""
    path = Path(f"{args.output}.json")
    if args.rerun_paper or not path.exists():
        return {}
    previous = json.loads(path.read_text())
    setup = previous.get("setup", {})

    def same(key: str) -> bool:
        here, there = getattr(args, key), setup.get(key)
        if key in ("model", "documents_path"):  # recorded relative to the repository or absolute
            return there is not None and (ROOT / there).resolve() == (ROOT / here).resolve()
        return here == there

    if not all(same(key) for key in _PAPER_SETUP_KEYS):
        return {}
    return {row["seed"]: row for row in previous.get("rows", [])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ROOT / "models" / "tiny"))
    parser.add_argument("--documents_path", default=str(ROOT / "data" / "tiny" / "corpus" / "search-long"))
    parser.add_argument("--target_length", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--population", type=int, default=32)
    parser.add_argument("--generations", type=int, default=15)
    parser.add_argument("--extra_generations", type=int, default=15)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tolerance", type=float, default=0.0, help="relative slack on the paper's final fitness")
    parser.add_argument("--chunk", type=int, default=2, help="fast-mode generations run between target checks")
    parser.add_argument("--rerun_paper", action="store_true", help="run paper mode even if its results are recorded")
    parser.add_argument(
        "--fast_overrides",
        type=json.loads,
        default={},
        help='fast-mode evolution keys for an ablation, e.g. \'{"wave_size": 0, "adapt_sigma": false}\'',
    )
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "search_efficiency"))
    args = parser.parse_args(argv)

    model = load_for_evaluation(ModelArguments(model_name_or_path=args.model))
    recorded = recorded_paper_rows(args)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            if seed in recorded:
                paper_row = recorded[seed]
                target, paper_tokens = paper_row["paper_fitness"], paper_row["paper_tokens"]
                paper_seconds, paper_source = paper_row["paper_seconds"], paper_row.get("paper_source", "recorded")
            else:
                paper = run(model, "paper", seed, args, args.generations, f"{scratch}/paper-{seed}")
                target, paper_tokens = paper["summary"]["best_fitness"], paper["summary"]["evaluated_tokens"]
                paper_seconds, paper_source = round(paper["seconds"], 1), time.strftime("run %Y-%m-%d")
            fast = run_until(model, seed, args, target, f"{scratch}/fast-{seed}")
            reached = crossing(fast["log"], target, args.tolerance)
            row = {
                "seed": seed,
                "paper_fitness": target,
                "paper_tokens": paper_tokens,
                "paper_seconds": paper_seconds,
                "paper_source": paper_source,
                "fast_generations_to_reach": reached["generation"] if reached else None,
                "fast_best_when_stopped": fast["summary"]["best_fitness"],
                "fast_reached": reached is not None,
                "fast_tokens_to_reach": reached["tokens"] if reached else None,
                "fast_seconds_to_reach": round(reached["seconds"], 1) if reached else None,
                "token_ratio": reached["tokens"] / paper_tokens if reached else None,
                "time_ratio": reached["seconds"] / paper_seconds if reached else None,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratios = [r["token_ratio"] for r in rows if r["token_ratio"] is not None]
    times = [r["time_ratio"] for r in rows if r["time_ratio"] is not None]
    result = {
        "setup": vars(args),
        "rows": rows,
        "median_token_ratio": statistics.median(ratios) if len(ratios) == len(rows) else None,
        "median_time_ratio": statistics.median(times) if len(times) == len(rows) else None,
        "target": "fast reaches the paper mode's final fitness with <= 1/3 of its evaluated tokens (median)",
    }
    met = result["median_token_ratio"] is not None and result["median_token_ratio"] <= 1 / 3
    result["target_met"] = met
    lines = [
        "# Search cost: paper mode vs fast mode (default)",
        "",
        f"Model `{args.model}`, target {args.target_length}, {args.samples} samples, population {args.population}, "
        f"{args.generations} generations (fast may run {args.extra_generations} more).",
        "",
        "| seed | paper final PPL | paper tokens | paper s | fast generations | fast tokens to reach | fast s to reach "
        "| token ratio | time ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        fmt = lambda v, spec: "not reached" if v is None else format(v, spec)  # noqa: E731
        lines.append(
            f"| {r['seed']} | {r['paper_fitness']:.4f} | {r['paper_tokens']:,} | {r['paper_seconds']} | "
            f"{fmt(r['fast_generations_to_reach'], '')} | "
            f"{fmt(r['fast_tokens_to_reach'], ',')} | {fmt(r['fast_seconds_to_reach'], '')} | "
            f"{fmt(r['token_ratio'], '.3f')} | {fmt(r['time_ratio'], '.3f')} |"
        )
    lines += [
        "",
        f"Median token ratio: {result['median_token_ratio']}; median time ratio: {result['median_time_ratio']}. "
        f"Target (<= 0.333 tokens): {'MET' if met else 'NOT MET'}.",
    ]
    atomic_write_json(f"{args.output}.json", result)
    atomic_write_text(f"{args.output}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
