"""Fast mode's racing and step control: the stop state frozen when a wave is created, the calibration of the
predictor of a candidate's full fitness from its first samples, the decision to stop or accept a candidate early
(see :meth:`EvolutionSearch.should_continue` for the rules) and the 1/5 success rule that adapts the mutation step.

Everything here is a pure function of the configuration and the records, so the search's results never depend on
who scores which candidate, or when.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from longrope.evolution.config import EvolutionConfig
from longrope.evolution.records import Record, log_fitness, ranked

# Rechenberg's 1/5 success rule: the mutation step grows while more than a fifth of a wave's children enter the
# elite and shrinks while fewer do, by exp(rate - 1/5) per wave, within these bounds (a 2% step is already about one
# grid point of a factor near 1; beyond e^1 a step is no longer local).
_TARGET_SUCCESS = 0.2
_SIGMA_BOUNDS = (0.02, 1.0)


@dataclass
class StopState:
    """What fast-mode stopping compares against, frozen when a wave is created (so order cannot matter)."""

    threshold: float = math.inf
    floors: list[float] = field(default_factory=list)
    weights: list[list[float]] | None = None
    sigma: list[float] | None = None
    best: float = math.inf

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": None if math.isinf(self.threshold) else self.threshold,
            "floors": list(self.floors),
            "weights": self.weights,
            "sigma": self.sigma,
            "best": None if math.isinf(self.best) else self.best,
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> StopState:
        threshold = payload.get("threshold")
        return cls(
            threshold=math.inf if threshold is None else float(threshold),
            floors=[float(x) for x in payload.get("floors", [])],
            weights=None if payload.get("weights") is None else [[float(x) for x in w] for w in payload["weights"]],
            sigma=None if payload.get("sigma") is None else [float(x) for x in payload["sigma"]],
            best=math.inf if payload.get("best") is None else float(payload["best"]),
        )


def elite_size(config: EvolutionConfig) -> int:
    """k: how many candidates breed, and the rank whose fitness is fast mode's stop threshold."""
    if config.mode == "fast" and config.elite_size:
        return config.elite_size
    return config.num_parents


def freeze_stop_state(config: EvolutionConfig, records: Sequence[Record]) -> StopState:
    """The stop state for the wave about to be created (paper mode: one that never stops anything)."""
    if config.mode != "fast":
        return StopState()
    n = config.num_samples
    known = ranked(records, lambda record: True, ("complete", "estimated"))
    k = elite_size(config)
    threshold = records[known[k - 1]].fitness if len(known) >= k else math.inf
    if not math.isfinite(threshold) and known:
        # Fewer than k known: nothing can be stopped for missing the top-k, but a child worse than every known
        # candidate is no use as a parent either.
        threshold = max((records[i].fitness for i in known if math.isfinite(records[i].fitness)), default=math.inf)
    complete = ranked(records, lambda record: True)
    best = records[complete[0]].fitness if complete else math.inf
    floors = [0.0] * n
    if config.nll_floor == "observed":
        for j in range(n):
            seen = [r.sample_nll[j] for r in records if r.sample_nll is not None and len(r.sample_nll) > j]
            floors[j] = max(0.0, min(seen) * config.floor_margin) if seen else 0.0
    weights, sigma = None, None
    if config.stop_rule == "race" and n >= 2 and math.isfinite(threshold):
        weights, sigma = calibrate_prediction(config, records)
    return StopState(threshold, floors, weights, sigma, best)


def calibrate_prediction(config: EvolutionConfig, records: Sequence[Record]) -> tuple[list[list[float]], list[float]]:
    """Least-squares predictors of the full mean NLL from the first m samples, m = 1..N-1, and their RMS error,
    fitted on the most recent fully scored candidates (those resemble the children being scored now)."""
    n = config.num_samples
    recent = [
        r.sample_nll for r in records if r.status == "complete" and r.sample_nll is not None and len(r.sample_nll) == n
    ][-config.race_window :]
    scores = np.asarray(recent, dtype=np.float64).reshape(len(recent), n)
    target = scores.mean(axis=1)
    weights, sigma = [], []
    for m in range(1, n):
        # Too few candidates for an honest residual: no race at this depth (nor deeper).
        if len(recent) < max(8, m + 3):
            break
        design = np.hstack([np.ones((len(recent), 1)), scores[:, :m]])
        fitted, *_ = np.linalg.lstsq(design, target, rcond=None)
        residual = target - design @ fitted
        weights.append([float(w) for w in fitted])
        sigma.append(float(np.sqrt((residual**2).sum() / (len(recent) - m - 1))))
    return weights, sigma


def stop_decision(config: EvolutionConfig, stop: StopState, values: Sequence[float]) -> tuple[str, float] | None:
    """(status, log-fitness) that ends a candidate after these samples, or None to score the next one."""
    if not math.isfinite(stop.threshold):
        return None
    n, m = config.num_samples, len(values)
    limit = log_fitness(stop.threshold)
    bound = (sum(values) + sum(stop.floors[m:])) / n
    if bound > limit:
        return "stopped", bound
    if stop.weights is not None and stop.sigma is not None and m <= len(stop.weights):
        weights = stop.weights[m - 1]
        predicted = weights[0] + sum(w * x for w, x in zip(weights[1:], values))
        bar = config.race_z * stop.sigma[m - 1]
        tolerance = config.race_tolerance
        if predicted - bar > limit - tolerance:
            return "stopped", predicted - bar
        if predicted + bar < limit + tolerance and predicted - bar > log_fitness(stop.best) - tolerance:
            return "estimated", predicted
    return None


def gene_step(config: EvolutionConfig, sigma: float) -> float | None:
    """The log-normal step a mutation moves factors by, or None for the paper's redraw between neighbours."""
    return sigma if config.mode == "fast" and config.mutation_sigma > 0 else None


def adapted_step(
    config: EvolutionConfig, sigma: float, generation: int, wave: Sequence[Record], stop: StopState
) -> float:
    """The mutation step after a wave of children (not the seeds): the 1/5 success rule on the share that entered
    the elite, i.e. beat the threshold the wave was raced against (a stopped child never did)."""
    if config.mode != "fast" or config.mutation_sigma <= 0 or not config.adapt_sigma or generation < 1:
        return sigma
    if not wave or not math.isfinite(stop.threshold):
        return sigma
    entered = sum(r.status != "stopped" and r.fitness < stop.threshold for r in wave) / len(wave)
    return min(_SIGMA_BOUNDS[1], max(_SIGMA_BOUNDS[0], sigma * math.exp(entered - _TARGET_SUCCESS)))
