"""How the search runs (:class:`EvolutionConfig`): population sizes, operator rates, the mode and fast mode's knobs,
checked on construction and recorded in the search state so that a resume with another config is refused."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from longrope.evolution.checks import fail, require_choice, require_int, require_number
from longrope.evolution.space import SearchSpaceConfig

MODES: tuple[str, ...] = ("paper", "fast")
STOP_RULES: tuple[str, ...] = ("bound", "race")
NLL_FLOORS: tuple[str, ...] = ("zero", "observed")


@dataclass
class EvolutionConfig:
    """How the search runs. Defaults are the paper's (LongRoPE Sec. 4, targets up to 256k), except ``mode``.

    ``mode`` defaults to ``fast``, the project's default (the paper mode's final fitness for a fraction of its
    samples, see :mod:`longrope.evolution`); ``paper`` is Algorithm 1 as published. ``init_seeds`` names the seeds the
    initial population is built from; empty means all of them (the paper: PI, NTK and YaRN), ``("yarn",)``
    reproduces the released code. ``max_mutation_tries`` bounds the redraws of a child that is already known (the
    released code loops forever). ``num_samples`` is N, the samples per full fitness.
    The ``stop_rule`` / ``nll_floor`` / ``floor_margin`` / ``race_*`` knobs matter only in ``fast`` mode (see
    :meth:`EvolutionSearch.should_continue`), and so do these five, which make the fast search greedier:
    ``elite_size`` (k of fast mode: the parents and the stop threshold; 0 uses ``num_parents``), ``mutation_sigma``
    (the initial log-normal step of a mutated factor, sorted afterwards to stay monotone; 0 keeps the paper's redraw
    between neighbours), ``adapt_sigma`` (the step follows the 1/5 success rule after every wave), ``wave_size``
    (children bred per wave; the result depends on it, never on the number of evaluators, so make it a multiple of
    that number; 0 breeds a whole generation at once) and ``seeds_only_start`` (generation 0 is the seeds alone;
    False builds the paper's initial population). With ``elite_size=0, mutation_sigma=0, wave_size=0,
    seeds_only_start=False, stop_rule="bound", nll_floor="zero"`` fast mode makes exactly the paper mode's decisions
    with fewer samples.
    """

    space: SearchSpaceConfig
    population_size: int = 64
    num_mutations: int = 16
    num_crossovers: int = 16
    mutation_prob: float = 0.3
    num_generations: int = 40
    num_parents: int = 32
    max_crossover_tries: int = 20
    max_mutation_tries: int = 100
    seed: int = 0
    mode: str = "fast"
    init_seeds: tuple[str, ...] = ()
    num_samples: int = 5
    stop_rule: str = "race"
    nll_floor: str = "observed"
    floor_margin: float = 0.9
    race_z: float = 1.0
    race_tolerance: float = 0.001
    race_window: int = 64
    elite_size: int = 4
    mutation_sigma: float = 0.2
    adapt_sigma: bool = True
    seeds_only_start: bool = True
    wave_size: int = 8

    def __post_init__(self) -> None:
        if isinstance(self.space, Mapping):
            self.space = SearchSpaceConfig(**self.space)
        if not isinstance(self.space, SearchSpaceConfig):
            fail(f"space = {self.space!r}: must be a SearchSpaceConfig")
        require_int("population_size", self.population_size, 1, " (the paper uses 64)")
        require_int("num_mutations", self.num_mutations, 0, " (the paper uses 16)")
        require_int("num_crossovers", self.num_crossovers, 0, " (the paper uses 16)")
        if self.num_mutations + self.num_crossovers == 0:
            fail("num_mutations: num_mutations + num_crossovers must be >= 1, or no generation makes children")
        require_number("mutation_prob", self.mutation_prob, 1e-9, 1.0, " (the paper uses 0.3)")
        require_int("num_generations", self.num_generations, 0, " (the paper uses 40)")
        require_int("num_parents", self.num_parents, 1, " (the paper uses 32)")
        if self.num_parents > self.population_size:
            fail(f"num_parents = {self.num_parents}: must be <= population_size ({self.population_size})")
        require_int("max_crossover_tries", self.max_crossover_tries, 1, " (the released code uses 20)")
        require_int("max_mutation_tries", self.max_mutation_tries, 1)
        require_int("seed", self.seed, 0)
        require_choice("mode", self.mode, MODES)
        if isinstance(self.init_seeds, str):
            self.init_seeds = (self.init_seeds,)
        self.init_seeds = tuple(self.init_seeds)
        if not all(isinstance(name, str) and name for name in self.init_seeds):
            fail(f"init_seeds = {list(self.init_seeds)!r}: must be seed names (e.g. ['yarn']) or empty for all")
        require_int("num_samples", self.num_samples, 1, " (the paper uses 5)")
        require_choice("stop_rule", self.stop_rule, STOP_RULES)
        require_choice("nll_floor", self.nll_floor, NLL_FLOORS)
        require_number("floor_margin", self.floor_margin, 0.0, 1.0, " (1 trusts the best NLL seen per sample)")
        require_number("race_z", self.race_z, 0.0, hint=" (3 means a 0.13% one-sided risk per stop)")
        require_number("race_tolerance", self.race_tolerance, 0.0, hint=" (log-perplexity; 0.001 is 0.1%)")
        require_int("race_window", self.race_window, 8)
        require_int("elite_size", self.elite_size, 0, " (0 = num_parents)")
        require_number("mutation_sigma", self.mutation_sigma, 0.0, hint=" (0 = the paper's mutation)")
        if not isinstance(self.adapt_sigma, bool):
            fail(f"adapt_sigma = {self.adapt_sigma!r}: must be true or false")
        if not isinstance(self.seeds_only_start, bool):
            fail(f"seeds_only_start = {self.seeds_only_start!r}: must be true or false")
        require_int("wave_size", self.wave_size, 0, " (0 = a whole generation at once, as the paper)")

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON types (what :meth:`EvolutionSearch.state_dict` records)."""
        return json.loads(json.dumps(asdict(self)))
