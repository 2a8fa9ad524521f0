"""The ask/tell loop: :class:`EvolutionSearch` creates generations (fast mode: in waves) of candidates from the seeds
and the elite, records the results the caller tells, and saves and restores its whole state.

The variant's operators (:mod:`longrope.evolution.variants`) make the candidates and fast mode's racing
(:mod:`longrope.evolution.racing`) judges them; this module decides when and from which parents.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from longrope.errors import LongRopeError
from longrope.evolution.checks import fail, is_number
from longrope.evolution.config import EvolutionConfig
from longrope.evolution.racing import (
    StopState,
    adapted_step,
    elite_size,
    freeze_stop_state,
    gene_step,
    stop_decision,
)
from longrope.evolution.records import Evaluation, Record, exp_fitness, fitness_from_sample_nll, ranked
from longrope.evolution.space import Candidate, mscale_units, mscale_value
from longrope.evolution.variants import critical_individual, ntk_fill_values, variant_for

STATE_FORMAT = "longrope.evolution/1"


class EvolutionSearch:
    """LongRoPE's evolutionary search, ask/tell style.

    ``seeds`` maps a name to an initial individual (PI, NTK, YaRN... computed by the caller); each is snapped onto
    the search grid and must fit the space. Typical loop::

        search = EvolutionSearch(config, {"pi": pi, "ntk": ntk, "yarn": yarn})
        while not search.done:
            search.tell({c.key: perplexity(c) for c in search.ask()})
            atomic_write_json(state_path, search.state_dict())
        best = search.best.candidate

    In fast mode the caller scores one sample at a time (``mean_nll`` = mean NLL per token of one sample)::

        for candidate in search.ask():
            scores = []
            while search.should_continue(candidate, scores):
                scores.append(mean_nll(candidate, samples[len(scores)]))
            search.tell({candidate.key: scores})

    Any evaluator may take any candidate: results never depend on who scores what, or in which order.
    """

    def __init__(self, config: EvolutionConfig, seeds: Mapping[str, Candidate]) -> None:
        if not isinstance(config, EvolutionConfig):
            fail(f"config = {config!r}: must be an EvolutionConfig")
        self.config = config
        self.space = config.space
        self._variant = variant_for(config)
        self._rng = np.random.Generator(np.random.PCG64(config.seed))
        self._records: list[Record] = []
        self._by_key: dict[str, int] = {}
        self._pending: list[int] = []
        self._generation = -1
        self._wave = 0
        self._wave_start = 0
        self._sigma = float(config.mutation_sigma)
        self._stop = StopState()
        if not isinstance(seeds, Mapping):
            fail("seeds: must be a mapping of name -> Candidate")
        self._seeds: dict[str, Candidate] = {}
        for name, seed in seeds.items():
            if not isinstance(name, str) or not name:
                fail(f"seeds: the name {name!r} must be a non-empty string")
            if not isinstance(seed, Candidate):
                fail(f"seeds[{name!r}]: must be a Candidate, got {type(seed).__name__}")
            self._seeds[name] = self.project(seed, label=f"seeds[{name!r}]")
        missing = [name for name in config.init_seeds if name not in self._seeds]
        if missing:
            fail(f"init_seeds: {', '.join(missing)} not among the seeds given ({', '.join(self._seeds) or 'none'})")
        if not self._seed_names() and self._variant.needs_seeds:
            fail("seeds: give at least one initial individual (e.g. the PI, NTK and YaRN factors)")

    # ------------------------------------------------------------------ public state

    @property
    def generation(self) -> int:
        """Index of the current generation: -1 before the first ask, 0 for the initial population."""
        return self._generation

    @property
    def wave(self) -> int:
        """Index of the current wave within the generation (fast mode's ``wave_size``; always 0 otherwise)."""
        return self._wave

    @property
    def waves_per_generation(self) -> int:
        """How many waves a generation's children are bred in: ceil(children / ``wave_size``) in fast mode, else 1.

        Each wave is bred from the elite as the waves before it left it, so a good child becomes a parent within
        the generation rather than after it (on the tiny model, with a fixed step of 0.2, waves of 8 instead of one
        of 16 took the median cost from 0.25x to 0.11x of the paper mode's). The outcome depends on ``wave_size``,
        never on how many evaluators share a wave.
        """
        children = self.config.num_mutations + self.config.num_crossovers
        size = self.config.wave_size
        if self.config.mode != "fast" or size == 0 or size >= children:
            return 1
        return -(-children // size)

    @property
    def generation_complete(self) -> bool:
        """True when every wave of the current generation has been told (also before the first ask)."""
        return not self._pending and self._wave >= self._last_wave(self._generation)

    @property
    def done(self) -> bool:
        """True once the last generation (``num_generations``) has been fully told."""
        return self._generation >= self.config.num_generations and self.generation_complete

    @property
    def pending(self) -> list[Candidate]:
        """Candidates of the current generation still waiting for a result, in creation order."""
        return [self._records[i].candidate for i in self._pending]

    @property
    def history(self) -> list[Evaluation]:
        """Every evaluated candidate, in creation order (not the order results arrived)."""
        return [r.evaluation(i) for i, r in enumerate(self._records) if r.status != "pending"]

    @property
    def best(self) -> Evaluation | None:
        """The complete evaluation with the lowest fitness (ties: the earliest created), or None."""
        complete = ranked(self._records, lambda record: True)
        return self._records[complete[0]].evaluation(complete[0]) if complete else None

    @property
    def sample_units(self) -> int:
        """Samples scored so far over all candidates (multiply by tokens per sample for evaluated tokens)."""
        return sum(record.sample_units for record in self._records)

    def parents(self) -> list[Evaluation]:
        """The current top-k (``num_parents``; fast mode: ``elite_size``) evaluations that may breed, best first:
        complete ones and, in fast mode, estimated ones (never stopped ones)."""
        return [self._records[i].evaluation(i) for i in self._parent_indices()]

    def stop_threshold(self) -> float:
        """Fast mode: the k-th best fitness (complete or estimated) when this wave was created, or the worst
        finite one while fewer than k are known; inf in paper mode and before anything is scored."""
        return self._stop.threshold

    @property
    def mutation_step(self) -> float:
        """Fast mode's current mutation step (log-normal sigma): ``mutation_sigma`` adapted by the 1/5 success rule
        after every wave when ``adapt_sigma``."""
        return self._sigma

    # ------------------------------------------------------------------ ask / tell

    def ask(self) -> list[Candidate]:
        """Candidates of the current wave (a whole generation unless fast mode breeds in waves) still needing a
        result; creates the next wave or generation when needed.

        Never returns a candidate already evaluated. Returns [] only when :attr:`done`.
        """
        while not self._pending and not self.done:
            self._advance()
        return self.pending

    def tell(self, results: Mapping[str, float | Sequence[float]]) -> None:
        """Record results for pending candidates, keyed by :attr:`Candidate.key`; any subset, any order.

        A value is either the fitness (perplexity; NaN/inf become inf) or the list of per-sample mean NLLs in
        sample order. In fast mode the list may stop early where :meth:`should_continue` said so; a longer list
        is cut at the first point where it would have stopped, so the outcome never depends on the caller.
        """
        if not isinstance(results, Mapping):
            fail("tell: results must be a mapping of candidate key -> fitness or per-sample NLL list")
        updates: list[tuple[int, Record]] = []
        for key, value in results.items():
            index = self._by_key.get(key)
            if index is None or self._records[index].status != "pending":
                state = "was already told" if index is not None else "was never asked"
                fail(f"tell: candidate {str(key)[:80]}... {state}; tell only keys returned by the current ask()")
            updates.append((index, self._scored(self._records[index], value)))
        for index, record in updates:
            self._records[index] = record
        told = {index for index, _ in updates}
        self._pending = [i for i in self._pending if i not in told]

    def should_continue(self, candidate: Candidate | str, sample_nll: Sequence[float]) -> bool:
        """Whether to score the next sample of a pending candidate, given its per-sample mean NLLs so far.

        Paper mode: True until all N = ``num_samples`` samples are scored. Fast mode compares against what was
        known when the wave was created (so evaluation order cannot matter): T, the k-th best fitness
        (:meth:`stop_threshold`; while fewer than k are known, the worst known one: a child worse than every
        candidate known is of no use as a parent), and B, the best complete one. With m < N samples x_1..x_m scored it returns False
        (and :meth:`tell` records the candidate accordingly) when

        * ``bound`` rule, always on: ``(sum x + sum_{j>m} floor_j) / N > log T``. The top-k only improves, so such
          a candidate could never breed nor be the best. With ``nll_floor="zero"`` (floor 0; an NLL is >= 0) this
          is a proof and fast mode makes exactly the paper's decisions. With ``"observed"`` (default) floor_j is
          ``floor_margin`` times the lowest NLL any candidate had on sample j: exact unless a later candidate beats
          that by more than the margin. Status ``"stopped"``, fitness ``exp`` of the bound.
        * ``race`` rule (default), in addition: the full mean NLL is predicted from x_1..x_m by least squares
          fitted on the last ``race_window`` fully scored candidates, whose residual RMS sigma_m calibrates the
          error bar ``race_z * sigma_m`` (sample difficulty and sensitivity are learned; a noisy problem simply
          gets wide bars and more samples). Predicted mean P:

          - ``P - bar > log T - race_tolerance``: surely not better than T by more than the tolerance; stopped.
          - ``P + bar < log T + race_tolerance`` and ``P - bar > log B - race_tolerance``: surely in the top-k and
            surely no new best; accepted as ``"estimated"`` with fitness ``exp(P)``; it may breed.

          Everything else (a possible new best, or too close to T to tell) is scored in full, so the reported best
          is exact and at most about ``race_tolerance`` (0.1% perplexity) behind a candidate that was cut short,
          with a per-decision risk of about Phi(-race_z) if the prediction errors are Gaussian. The default
          ``race_z=1`` (16% per decision) is deliberately bold: near the top one sample predicts the 5-sample mean
          to about the gaps between candidates, so a safe bar (3) scores nearly every good child in full, and a
          wrong stop only costs the search one child, never the exactness of the reported best.

        Also False once a sample NLL is not finite (the fitness is inf whatever follows).
        """
        key = candidate.key if isinstance(candidate, Candidate) else candidate
        index = self._by_key.get(key)
        if index is None or self._records[index].status != "pending":
            fail("should_continue: the candidate is not pending; ask() for the current generation first")
        values = [float(x) for x in sample_nll]
        if len(values) >= self.config.num_samples or not all(math.isfinite(x) for x in values):
            return False
        if self.config.mode == "paper" or not values:
            return True
        return stop_decision(self.config, self._stop, values) is None

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, as plain JSON types (write it with ``atomic_write_json``)."""
        return {
            "format": STATE_FORMAT,
            "config": self.config.to_dict(),
            "seeds": {name: seed.key for name, seed in self._seeds.items()},
            "rng": self._rng.bit_generator.state,
            "generation": self._generation,
            "wave": self._wave,
            "wave_start": self._wave_start,
            "sigma": self._sigma,
            "stop": self._stop.to_dict(),
            "records": [record.to_dict() for record in self._records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the configuration (except ``num_generations``, which may be raised to
        extend a run) and the seeds must be the ones that produced it."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            fail(f"state: not a search state of format {STATE_FORMAT!r}; pass the JSON written by state_dict()")
        # num_generations may grow: the random stream does not depend on it, so a 40-generation run extended to
        # 60 equals a 60-generation run.
        saved_config = state.get("config")
        if not isinstance(saved_config, Mapping):
            fail("state: the search state has no config; pass the JSON written by state_dict()")
        current = {**self.config.to_dict(), "num_generations": None}
        differing = _dict_differences(current, {**saved_config, "num_generations": None})
        if differing:
            fail(
                f"state: saved with a different config (differs in: {', '.join(differing)}); resume with the config"
                " that produced it or start a new run"
            )
        seed_keys = {name: seed.key for name, seed in self._seeds.items()}
        saved_seeds = state.get("seeds", {})
        if seed_keys != saved_seeds:
            names = sorted(n for n in set(seed_keys) | set(saved_seeds) if seed_keys.get(n) != saved_seeds.get(n))
            fail(f"state: saved with different seeds ({', '.join(names)}); resume with the seeds of that run")
        try:
            records = [Record.from_dict(payload) for payload in state["records"]]
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = state["rng"]
            generation = int(state["generation"])
            wave = int(state.get("wave", 0))
            wave_start = int(state.get("wave_start", 0))
            sigma = float(state.get("sigma", self.config.mutation_sigma))
            stop = StopState.from_dict(state["stop"])
        except (KeyError, TypeError, ValueError) as error:
            raise LongRopeError(f"state: corrupt search state ({error}); restore it from an intact copy") from None
        self._records = records
        self._by_key = {record.candidate.key: i for i, record in enumerate(records)}
        self._pending = [i for i, record in enumerate(records) if record.status == "pending"]
        self._rng = rng
        self._generation = generation
        self._wave = wave
        self._wave_start = wave_start
        self._sigma = sigma
        self._stop = stop

    # ------------------------------------------------------------------ operators (all but project draw from the RNG)

    def project(self, candidate: Candidate, label: str = "candidate") -> Candidate:
        """Snap an outside candidate (a seed) onto the search space: the factor grid, bounds and variant structure.

        Raises LongRopeError when it does not fit (wrong length, outside the bounds by more than half a step, a
        start-token count outside the allowed set when it is searched, no mscale when mscale is searched).
        """
        return self._variant.project(candidate, label)

    def mutate(self, parent: Candidate) -> Candidate:
        """One mutation of ``parent`` under the monotone constraint (may equal the parent; no de-duplication).

        Each searched factor is redrawn with probability ``mutation_prob``, uniformly on the grid between its
        (already updated) left neighbour and its right neighbour, as the released code does (fast mode with a
        ``mutation_sigma``: moved by a log-normal step instead); the structure genes of the variant, the start
        tokens and the mscale mutate with the same probability.
        """
        return self._variant.mutate(parent, self._rng, gene_step(self.config, self._sigma))

    def mutate_start_tokens(self, start_tokens: int) -> int:
        """A new start-token count drawn uniformly from the allowed set, other than the current one."""
        return self._variant.mutate_start_tokens(start_tokens, self._rng)

    def mutate_mscale(self, mscale: float | None) -> float:
        """A new mscale drawn uniformly on its grid within ``mscale_radius`` of the current one, inside the bounds."""
        return self._variant.mutate_mscale(mscale, self._rng)

    def crossover(
        self, parent1: Candidate, parent2: Candidate, exclude: frozenset[str] | set[str] = frozenset()
    ) -> Candidate | None:
        """A child of two parents under the monotone constraint, or None after ``max_crossover_tries`` failures.

        Each gene comes from ``parent2`` with probability ``mutation_prob / 2`` (as the released code), the rest
        from ``parent1``. A try fails when the child breaks the constraint or the bounds, equals a parent, or its
        key is in ``exclude``.
        """
        return self._variant.crossover(parent1, parent2, self._rng, exclude)

    def ntk_fill(self, critical_dim: int, value: float) -> tuple[float, ...]:
        """LongRoPE2's fill below the critical dimension: ``value ** (i / critical_dim)`` on the grid, i < d_rcd.

        That is NTK-aware scaling with the base chosen so that its factor at ``critical_dim`` equals ``value``, the
        first searched factor, so the curve is continuous there.
        """
        return ntk_fill_values(self.space, critical_dim, value)

    def critical_init(self, critical_dim: int) -> Candidate:
        """LongRoPE2's initial individual for one critical dimension: dims >= d_rcd all equal a value drawn
        uniformly on the grid in [scale, 2 * scale] (clipped to factor_max), dims below NTK-filled."""
        return critical_individual(self.space, self._rng, critical_dim, self._default_mscale())

    # ------------------------------------------------------------------ generations

    def _seed_names(self) -> list[str]:
        return list(self.config.init_seeds) or list(self._seeds)

    def _last_wave(self, generation: int) -> int:
        return self.waves_per_generation - 1 if generation >= 1 else 0

    def _advance(self) -> None:
        wave = self._records[self._wave_start :]
        self._sigma = adapted_step(self.config, self._sigma, self._generation, wave, self._stop)
        if self._wave < self._last_wave(self._generation):
            self._wave += 1
        else:
            self._generation += 1
            self._wave = 0
        self._stop = freeze_stop_state(self.config, self._records)
        self._wave_start = len(self._records)
        taken = set(self._by_key)
        offspring = self._initial_population(taken) if self._generation == 0 else self._offspring(taken)
        for candidate, origin in offspring:
            self._by_key[candidate.key] = len(self._records)
            self._pending.append(len(self._records))
            self._records.append(Record(candidate, self._generation, origin))

    def _wave_plan(self) -> tuple[int, int]:
        """(mutations, crossovers) of the current wave: the generation's mutations and crossovers interleaved in
        proportion, then cut into consecutive waves of ``wave_size``."""
        mutations, crossovers = self.config.num_mutations, self.config.num_crossovers
        if self.waves_per_generation == 1:
            return mutations, crossovers
        order = sorted([((i + 0.5) / mutations, 0) for i in range(mutations)])
        order = sorted(order + [((j + 0.5) / crossovers, 1) for j in range(crossovers)])
        size = self.config.wave_size
        kinds = [kind for _, kind in order[self._wave * size : (self._wave + 1) * size]]
        return kinds.count(0), kinds.count(1)

    def _initial_population(self, taken: set[str]) -> list[tuple[Candidate, str]]:
        members: list[tuple[Candidate, str]] = []

        def add(candidate: Candidate, origin: str) -> None:
            if candidate.key not in taken:
                taken.add(candidate.key)
                members.append((candidate, origin))

        for name in self._seed_names():
            add(self._seeds[name], f"seed:{name}")
        for candidate, origin in self._variant.initial_individuals(self._rng, self._default_mscale()):
            add(candidate, origin)
        bases = [candidate for candidate, _ in members if self._variant.may_breed(candidate)]
        if self.config.mode == "fast" and self.config.seeds_only_start:
            return members
        budget = self.config.max_mutation_tries * self.config.population_size
        while bases and len(members) < self.config.population_size and budget > 0:
            budget -= 1
            add(self.mutate(bases[int(self._rng.integers(len(bases)))]), "init-mutation")
        return members

    def _offspring(self, taken: set[str]) -> list[tuple[Candidate, str]]:
        parents = [self._records[i].candidate for i in self._parent_indices()]
        children: list[tuple[Candidate, str]] = []
        if not parents:
            return children
        mutations, crossovers = self._wave_plan()
        for _ in range(mutations):
            child = self._fresh_mutation(parents[int(self._rng.integers(len(parents)))], taken)
            if child is not None:
                children.append((child, "mutation"))
        for _ in range(crossovers):
            child, origin = self.offspring_by_crossover(parents, taken)
            if child is not None:
                children.append((child, origin))
        return children

    def offspring_by_crossover(self, parents: Sequence[Candidate], taken: set[str]) -> tuple[Candidate | None, str]:
        """One crossover child of two distinct random parents (the better one first), falling back to a mutation
        of the better parent when crossover fails ``max_crossover_tries`` times. Adds the child's key to ``taken``.
        Returns the child (None if even the mutation found nothing new) and its origin."""
        if len(parents) < 2:
            return self._fresh_mutation(parents[0], taken), "crossover-fallback"
        first, second = sorted(int(i) for i in self._rng.choice(len(parents), size=2, replace=False))
        child = self.crossover(parents[first], parents[second], exclude=taken)
        if child is not None:
            taken.add(child.key)
            return child, "crossover"
        return self._fresh_mutation(parents[first], taken), "crossover-fallback"

    def _fresh_mutation(self, parent: Candidate, taken: set[str]) -> Candidate | None:
        for _ in range(self.config.max_mutation_tries):
            child = self.mutate(parent)
            if child.key not in taken:
                taken.add(child.key)
                return child
        return None

    def _parent_indices(self) -> list[int]:
        breeders = ranked(
            self._records, lambda record: self._variant.may_breed(record.candidate), ("complete", "estimated")
        )
        return breeders[: elite_size(self.config)]

    # ------------------------------------------------------------------ results

    def _scored(self, record: Record, value: Any) -> Record:
        n = self.config.num_samples
        if is_number(value):
            fitness = float(value)
            return record.told("complete", fitness if math.isfinite(fitness) else math.inf, None, n)
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            fail(f"tell: value {value!r} must be a fitness number or a list of per-sample NLLs")
        if not all(is_number(x) for x in value) or not 1 <= len(value) <= n:
            fail(f"tell: a per-sample NLL list must hold 1..{n} numbers (num_samples), got {list(value)!r}")
        values = tuple(float(x) for x in value)
        first_bad = next((i for i, x in enumerate(values) if not math.isfinite(x)), len(values))
        if self.config.mode == "fast":
            # Cut at the first point where should_continue() said stop, so scoring more changes nothing.
            for m in range(1, min(first_bad, n - 1) + 1):
                decision = stop_decision(self.config, self._stop, values[:m])
                if decision is not None:
                    return record.told(decision[0], exp_fitness(decision[1]), values[:m], len(values))
        if first_bad < len(values):
            return record.told("complete", math.inf, values[:first_bad], len(values))
        if len(values) < n:
            fail(f"tell: {len(values)} of {n} samples scored but should_continue() says continue; score all samples")
        return record.told("complete", fitness_from_sample_nll(values), values, len(values))

    def _default_mscale(self) -> float | None:
        # A longrope2 initial individual inherits the mscale of the first seed (None: the caller's policy).
        names = self._seed_names()
        if names:
            return self._seeds[names[0]].mscale
        if not self.space.search_mscale:
            return None
        return mscale_value(self.space, mscale_units(self.space, self.space.mscale_min))


def _dict_differences(current: Mapping[str, Any], saved: Mapping[str, Any], prefix: str = "") -> list[str]:
    differing = []
    for key in sorted(set(current) | set(saved)):
        here, there = current.get(key), saved.get(key)
        if isinstance(here, Mapping) and isinstance(there, Mapping):
            differing.extend(_dict_differences(here, there, f"{prefix}{key}."))
        elif here != there:
            differing.append(f"{prefix}{key}")
    return differing
