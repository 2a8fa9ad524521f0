"""What the search remembers of each candidate: its record (origin, status, fitness, per-sample NLLs) as kept, saved
and reported, the fitness of per-sample scores, and the ranking every selection is made from."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from longrope.evolution.space import Candidate

# Exponent past which exp() overflows a float; a mean NLL this large is as bad as a failed evaluation.
_MAX_LOG_PPL = 700.0


@dataclass(frozen=True)
class Evaluation:
    """One evaluated candidate, as recorded by the search.

    ``status`` is ``"complete"`` (``fitness`` is the perplexity; inf when the evaluation failed or was not finite),
    or in fast mode ``"stopped"`` (``fitness`` is the lower bound that put the candidate out of the top-k; it never
    breeds) or ``"estimated"`` (``fitness`` is predicted from the samples scored; it may breed but is never
    :attr:`EvolutionSearch.best`).
    ``sample_units`` counts the samples the caller scored for it. ``index`` is its place in creation order, which
    breaks fitness ties.
    """

    candidate: Candidate
    generation: int
    origin: str
    status: str
    fitness: float
    sample_nll: tuple[float, ...] | None
    sample_units: int
    index: int


@dataclass
class Record:
    """A candidate as the search keeps it, from creation (``pending``) to its result."""

    candidate: Candidate
    generation: int
    origin: str
    status: str = "pending"
    fitness: float = math.inf
    sample_nll: tuple[float, ...] | None = None
    sample_units: int = 0

    def told(self, status: str, fitness: float, sample_nll: tuple[float, ...] | None, units: int) -> Record:
        """This record with its result."""
        return Record(self.candidate, self.generation, self.origin, status, fitness, sample_nll, units)

    def evaluation(self, index: int) -> Evaluation:
        """The public view of this record, ``index`` being its place in creation order."""
        return Evaluation(
            self.candidate,
            self.generation,
            self.origin,
            self.status,
            self.fitness,
            self.sample_nll,
            self.sample_units,
            index,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types (inf fitness as None), as the search state stores it."""
        return {
            "candidate": self.candidate.to_dict(),
            "generation": self.generation,
            "origin": self.origin,
            "status": self.status,
            "fitness": self.fitness if math.isfinite(self.fitness) else None,
            "sample_nll": None if self.sample_nll is None else list(self.sample_nll),
            "sample_units": self.sample_units,
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Record:
        fitness = payload["fitness"]
        sample_nll = payload["sample_nll"]
        return cls(
            Candidate.from_dict(payload["candidate"]),
            int(payload["generation"]),
            str(payload["origin"]),
            str(payload["status"]),
            math.inf if fitness is None else float(fitness),
            None if sample_nll is None else tuple(float(x) for x in sample_nll),
            int(payload["sample_units"]),
        )


def ranked(
    records: Sequence[Record], keep: Callable[[Record], bool], statuses: tuple[str, ...] = ("complete",)
) -> list[int]:
    """Indices of the records with one of ``statuses`` that ``keep`` accepts, best fitness first; the earlier
    created wins a tie, so a ranking never depends on the order results arrived in."""
    chosen = [i for i, r in enumerate(records) if r.status in statuses and keep(r)]
    return sorted(chosen, key=lambda i: (records[i].fitness, i))


def fitness_from_sample_nll(sample_nll: Sequence[float]) -> float:
    """Perplexity from per-sample mean NLLs (nats per token): ``exp(mean)``; inf if any value is not finite."""
    values = [float(x) for x in sample_nll]
    if not values or not all(math.isfinite(x) for x in values):
        return math.inf
    return exp_fitness(sum(values) / len(values))


def exp_fitness(log_value: float) -> float:
    """A fitness from its logarithm (a mean NLL); inf past float overflow."""
    return math.exp(log_value) if log_value < _MAX_LOG_PPL else math.inf


def log_fitness(value: float) -> float:
    """The logarithm of a fitness, the scale fast mode's bounds and predictions live on."""
    return math.log(value) if value > 0 else -math.inf
