"""The evolutionary search on a synthetic objective: operators, determinism, resume, fast mode, variants.

The objective mimics perplexity-driven factor search: a smooth penalty around a known monotone optimum that no seed
matches, seen through N per-sample NLLs that differ in difficulty (offset) and sensitivity (gain), plus a little
candidate-by-sample noise. Everything is numpy; each test runs in well under a few seconds on one core.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import zlib

import numpy as np
import pytest

from longrope.errors import LongRopeError
from longrope.evolution import (
    PAPER_START_TOKENS,
    VARIANTS,
    Candidate,
    EvolutionConfig,
    EvolutionSearch,
    SearchSpaceConfig,
    critical_dimension_range,
    fitness_from_sample_nll,
)
from longrope.evolution.variants import VARIANT_TYPES

NUM_FACTORS = 16
SCALE = 4.0
_INDEX = np.arange(NUM_FACTORS)
# Two steps, unlike any of PI / NTK / YaRN, on the 0.01 grid and inside [1, 1.25 * SCALE].
OPTIMUM = np.round(1 + 1.2 / (1 + np.exp(-(_INDEX - 4) / 0.8)) + 2.6 / (1 + np.exp(-(_INDEX - 12) / 0.8)), 2)
BEST_START_TOKENS = 8
SAMPLE_OFFSET = (0.2, -0.3, 0.1, 0.25, -0.25)
SAMPLE_GAIN = (1.3, 0.8, 1.1, 0.75, 1.05)
SAMPLE_NOISE = 0.0005


def factor_penalty(candidate: Candidate) -> float:
    log_gap = np.log(np.asarray(candidate.factors)) - np.log(OPTIMUM)
    return 0.3 * float((log_gap**2).sum())


def penalty(candidate: Candidate) -> float:
    """Excess NLL over the optimum (0 at the optimum), the quantity every sample sees scaled by its gain."""
    start_term = 0.002 * (math.log2(1 + candidate.start_tokens) - math.log2(1 + BEST_START_TOKENS)) ** 2
    return factor_penalty(candidate) + start_term


def sample_nll(candidate: Candidate, sample: int) -> float:
    noise = np.random.default_rng(zlib.crc32(f"{candidate.key}|{sample}".encode())).standard_normal()
    return 2.5 + SAMPLE_OFFSET[sample] + SAMPLE_GAIN[sample] * penalty(candidate) + SAMPLE_NOISE * noise


def paper_seeds() -> dict[str, Candidate]:
    return {
        "pi": Candidate(tuple([SCALE] * NUM_FACTORS)),
        "ntk": Candidate(tuple(SCALE ** (_INDEX / (NUM_FACTORS - 1)))),
        "yarn": Candidate(tuple(1 + (SCALE - 1) * np.clip((_INDEX - 4) / 8, 0, 1))),
    }


def make_config(**overrides) -> EvolutionConfig:
    space = overrides.pop("space", None) or SearchSpaceConfig(rotary_dim=2 * NUM_FACTORS, scale=SCALE)
    # The tests exercise Algorithm 1 unless they ask for fast mode (the default of EvolutionConfig itself).
    overrides.setdefault("mode", "paper")
    return EvolutionConfig(space=space, **overrides)


def steep_sample_nll(candidate: Candidate, sample: int) -> float:
    """The same objective 100 times steeper: bad children are far above the top-k, so even a proof can stop them."""
    return sample_nll(candidate, sample) + 99 * SAMPLE_GAIN[sample] * factor_penalty(candidate)


def score_generation(search: EvolutionSearch, candidates: list[Candidate], scorer=sample_nll) -> dict[str, list]:
    """Score candidates sample by sample as a fast-mode caller would (paper mode: all samples)."""
    results = {}
    for candidate in candidates:
        scores: list[float] = []
        while search.should_continue(candidate, scores):
            scores.append(scorer(candidate, len(scores)))
        results[candidate.key] = scores
    return results


def run(search: EvolutionSearch, scorer=sample_nll) -> EvolutionSearch:
    while not search.done:
        search.tell(score_generation(search, search.ask(), scorer))
    return search


def outcome(search: EvolutionSearch) -> list[tuple]:
    """Everything observable about a finished run, for exact comparisons."""
    return [(e.candidate.key, e.generation, e.origin, e.status, e.fitness, e.sample_units) for e in search.history]


def assert_valid(candidate: Candidate, space: SearchSpaceConfig) -> None:
    factors = np.asarray(candidate.factors)
    assert len(factors) == space.num_factors
    assert np.all(np.diff(factors) >= 0), candidate.factors
    assert factors.min() >= space.factor_min - 1e-9 and factors.max() <= space.factor_max + 1e-9
    units = factors / space.factor_step
    np.testing.assert_allclose(units, np.rint(units), atol=1e-6)


@pytest.fixture(scope="module")
def paper_runs() -> dict[int, EvolutionSearch]:
    return {seed: run(EvolutionSearch(make_config(seed=seed), paper_seeds())) for seed in range(3)}


# ---------------------------------------------------------------------------------------------- configuration


def test_defaults_are_the_papers_except_the_fast_mode() -> None:
    config = EvolutionConfig(space=SearchSpaceConfig(rotary_dim=2 * NUM_FACTORS, scale=SCALE))
    assert (config.population_size, config.num_mutations, config.num_crossovers) == (64, 16, 16)
    assert (config.mutation_prob, config.num_generations, config.num_parents) == (0.3, 40, 32)
    assert (config.max_crossover_tries, config.num_samples, config.mode) == (20, 5, "fast")
    space = config.space
    assert (space.factor_step, space.factor_min, space.factor_max) == (0.01, 1.0, 1.25 * SCALE)
    assert space.start_token_choices == PAPER_START_TOKENS == (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
    assert (
        SearchSpaceConfig(rotary_dim=8, original_max_position_embeddings=4096, max_position_embeddings=32768).scale
        == 8
    )


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"population_size": 0}, "population_size"),
        ({"num_parents": 65}, "num_parents"),
        ({"mutation_prob": 1.5}, "mutation_prob"),
        ({"mode": "turbo"}, "mode"),
        ({"num_mutations": 0, "num_crossovers": 0}, "num_mutations"),
        ({"num_generations": -1}, "num_generations"),
        ({"seed": 1.5}, "seed"),
        ({"num_samples": 0}, "num_samples"),
        ({"race_z": -1.0}, "race_z"),
        ({"stop_rule": "guess"}, "stop_rule"),
        ({"floor_margin": 2.0}, "floor_margin"),
        ({"init_seeds": [""]}, "init_seeds"),
        ({"elite_size": -1}, "elite_size"),
        ({"mutation_sigma": -0.1}, "mutation_sigma"),
        ({"seeds_only_start": "yes"}, "seeds_only_start"),
    ],
)
def test_bad_evolution_config_names_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(LongRopeError) as error:
        make_config(**overrides)
    assert field in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"rotary_dim": 7}, "rotary_dim"),
        ({"rotary_dim": 0}, "rotary_dim"),
        ({"scale": None}, "scale"),
        ({"scale": -2.0}, "scale"),
        ({"variant": "spline"}, "variant"),
        ({"factor_step": 0.0}, "factor_step"),
        ({"factor_min": 3.0, "factor_max": 2.0}, "factor_max"),
        ({"start_token_choices": (0, 0, 4)}, "start_token_choices"),
        ({"start_token_choices": ()}, "start_token_choices"),
        ({"mscale_min": 2.0, "mscale_max": 1.0}, "mscale_max"),
        ({"variant": "longrope2"}, "rope_theta"),
        ({"variant": "longrope2", "rope_theta": 1e4}, "original_max_position_embeddings"),
        ({"scale": 8.0, "original_max_position_embeddings": 128, "max_position_embeddings": 512}, "scale"),
        (
            {
                "variant": "longrope2",
                "rope_theta": 1e4,
                "original_max_position_embeddings": 64,
                "critical_dim_max": 99,
            },
            "critical_dim_max",
        ),
    ],
)
def test_bad_space_config_names_the_field(overrides: dict, field: str) -> None:
    arguments = {"rotary_dim": 2 * NUM_FACTORS, "scale": SCALE, **overrides}
    with pytest.raises(LongRopeError) as error:
        SearchSpaceConfig(**arguments)
    assert field in str(error.value) and "\n" not in str(error.value)


def test_candidate_rejects_decreasing_factors_and_keys_round_noise_away() -> None:
    with pytest.raises(LongRopeError, match=r"factors\[2\]"):
        Candidate((1.0, 2.0, 1.5))
    assert Candidate((1.0, 2.0 + 1e-9)).key == Candidate((1.0, 2.0)).key
    assert Candidate((1.0, 2.0)).key != Candidate((1.0, 2.01)).key
    assert Candidate((1.0, 2.0), start_tokens=4).key != Candidate((1.0, 2.0)).key
    restored = Candidate.from_dict(json.loads(json.dumps(Candidate((1.0, 2.5), 4, 1.1, 1, None).to_dict())))
    assert restored == Candidate((1.0, 2.5), 4, 1.1, 1, None)


def test_seeds_are_snapped_to_the_grid_and_bad_seeds_rejected() -> None:
    search = EvolutionSearch(make_config(), paper_seeds())
    ntk = search.project(paper_seeds()["ntk"])
    assert_valid(ntk, search.space)
    assert np.max(np.abs(np.asarray(ntk.factors) - np.asarray(paper_seeds()["ntk"].factors))) <= 0.005 + 1e-9
    with pytest.raises(LongRopeError, match="has 3 factors"):
        EvolutionSearch(make_config(), {"short": Candidate((1.0, 2.0, 3.0))})
    with pytest.raises(LongRopeError, match="outside"):
        EvolutionSearch(make_config(), {"wide": Candidate(tuple([1.0] * 15 + [9.0]))})
    with pytest.raises(LongRopeError, match="init_seeds: yarn"):
        EvolutionSearch(make_config(init_seeds=("yarn",)), {"pi": paper_seeds()["pi"]})
    with pytest.raises(LongRopeError, match="seeds"):
        EvolutionSearch(make_config(), {})


# ---------------------------------------------------------------------------------------------- operators


def test_mutation_keeps_monotone_bounds_and_grid_and_moves_genes() -> None:
    search = EvolutionSearch(make_config(seed=3), paper_seeds())
    parent = search.project(paper_seeds()["yarn"])
    changed = 0
    for _ in range(300):
        child = search.mutate(parent)
        assert_valid(child, search.space)
        changed += child.key != parent.key
        parent = child if random.Random(len(child.key)).random() < 0.5 else parent
    assert changed > 200


def test_mutation_redraws_between_neighbours() -> None:
    search = EvolutionSearch(make_config(mutation_prob=1.0), paper_seeds())
    parent = Candidate(tuple([1.0] * 4 + [2.0] * 4 + [3.0] * 8))
    for _ in range(100):
        child = np.asarray(search.mutate(parent).factors)
        # Genes inside a flat run have equal neighbours, so they cannot move; the run edges can.
        assert np.all(child[1:3] <= 2.0) and np.all(child[5:7] >= 1.0) and child[-1] <= 1.25 * SCALE
        assert child[0] >= 1.0


def test_fast_mode_mutation_takes_small_monotone_steps_around_the_parent() -> None:
    search = EvolutionSearch(make_config(mode="fast", mutation_sigma=0.05, mutation_prob=1.0), paper_seeds())
    paper = EvolutionSearch(make_config(mutation_prob=1.0), paper_seeds())
    parent = search.project(paper_seeds()["yarn"])
    steps, paper_steps = [], []
    for _ in range(200):
        child = search.mutate(parent)
        assert_valid(child, search.space)
        assert child.key != parent.key
        steps.append(np.abs(np.log(np.asarray(child.factors) / np.asarray(parent.factors))).mean())
        paper_steps.append(np.abs(np.log(np.asarray(paper.mutate(parent).factors) / parent.factors)).mean())
    # Sorting may move a gene past a neighbour, but the curve stays about sigma from the parent's; the paper's
    # redraw between neighbours moves it several times further.
    assert statistics.mean(steps) < 0.04 and 1.5 * statistics.mean(steps) < statistics.mean(paper_steps)


def test_fast_mode_starts_from_the_seeds_and_stops_children_worse_than_all_of_them() -> None:
    search = EvolutionSearch(make_config(mode="fast", num_generations=3), paper_seeds())
    seeds = search.ask()
    assert {c.key for c in seeds} == {search.project(s).key for s in paper_seeds().values()}
    search.tell(score_generation(search, seeds))
    children = search.ask()
    assert len(children) == search.config.wave_size and not {c.key for c in children} & {c.key for c in seeds}
    # Fewer than elite_size candidates are known: a child worse than every one of them is stopped.
    assert search.stop_threshold() == max(e.fitness for e in search.history)
    assert search.parents()[0].fitness == min(e.fitness for e in search.history)


def test_fast_mode_breeds_each_generation_in_waves_from_the_elite_the_previous_waves_left() -> None:
    config = make_config(mode="fast", num_generations=2, num_mutations=8, num_crossovers=8, wave_size=4)
    search = EvolutionSearch(config, paper_seeds())
    assert search.waves_per_generation == 4
    search.tell(score_generation(search, search.ask()))
    assert search.generation_complete and search.generation == 0
    for wave in range(4):
        children = search.ask()
        assert (search.generation, search.wave) == (1, wave) and len(children) == 4
        assert not search.generation_complete
        # The first child of each wave is told a fitness better than anything known: the next wave breeds from it.
        search.tell({c.key: (0.5 - 0.1 * wave if i == 0 else 1e9) for i, c in enumerate(children)})
        assert search.parents()[0].candidate.key == children[0].key
        assert search.generation_complete == (wave == 3)
    origins = [e.origin for e in search.history if e.generation == 1]
    assert sum(o == "mutation" for o in origins) == 8 and sum(o.startswith("crossover") for o in origins) == 8
    search.ask()
    assert (search.generation, search.wave) == (2, 0)
    while not search.done:
        search.tell(score_generation(search, search.ask()))
    assert len([e for e in search.history if e.generation == 2]) == 16
    # Paper mode, and fast mode with wave_size 0, make a generation in one go.
    assert EvolutionSearch(make_config(mode="fast", wave_size=0), paper_seeds()).waves_per_generation == 1
    assert EvolutionSearch(make_config(wave_size=4), paper_seeds()).waves_per_generation == 1


@pytest.mark.parametrize("adapt", [True, False])
def test_fast_mode_mutation_step_follows_the_one_fifth_success_rule(adapt: bool) -> None:
    config = make_config(mode="fast", num_mutations=2, num_crossovers=2, wave_size=4, adapt_sigma=adapt)
    search = EvolutionSearch(config, paper_seeds())
    search.tell(score_generation(search, search.ask()))
    assert search.mutation_step == config.mutation_sigma == 0.2
    # Every child of this wave beats everything known (all enter the elite): the step grows by exp(1 - 1/5).
    search.tell({c.key: 0.5 for c in search.ask()})
    search.ask()
    grown = 0.2 * math.exp(0.8) if adapt else 0.2
    assert search.mutation_step == pytest.approx(grown)
    # None does: it shrinks by exp(-1/5) per wave, never below 0.02; a resumed search keeps the adapted step.
    for _ in range(40):
        search.tell({c.key: 1e9 for c in search.ask()})
    assert search.mutation_step == pytest.approx(0.02 if adapt else 0.2)
    assert _reloaded(search, config).mutation_step == search.mutation_step
    parent = search.parents()[0].candidate
    steps = [np.abs(np.log(np.asarray(search.mutate(parent).factors) / parent.factors)).max() for _ in range(50)]
    assert max(steps) < (0.15 if adapt else 1.5)


def test_crossover_keeps_constraints_and_takes_genes_from_the_parents() -> None:
    search = EvolutionSearch(make_config(seed=5), paper_seeds())
    first, second = search.project(paper_seeds()["ntk"]), search.project(paper_seeds()["yarn"])
    children = [search.crossover(first, second) for _ in range(100)]
    assert sum(child is not None for child in children) > 50
    for child in filter(None, children):
        assert_valid(child, search.space)
        assert child.key not in (first.key, second.key)
        for gene, a, b in zip(child.factors, first.factors, second.factors):
            assert gene in (a, b)


def test_crossover_falls_back_to_mutation() -> None:
    search = EvolutionSearch(make_config(max_crossover_tries=5), paper_seeds())
    parent = search.project(paper_seeds()["yarn"])
    # Identical parents can only give back the parent, which is already known: every try fails.
    assert search.crossover(parent, parent) is None
    taken = {parent.key}
    child, origin = search.offspring_by_crossover([parent, parent], taken)
    assert origin == "crossover-fallback" and child is not None
    assert_valid(child, search.space)
    assert child.key != parent.key and child.key in taken


def test_start_token_and_mscale_mutations_stay_in_their_sets() -> None:
    space = SearchSpaceConfig(
        rotary_dim=2 * NUM_FACTORS, scale=SCALE, variant="lambda_start", search_mscale=True, mscale_max=1.5
    )
    seeds = {name: Candidate(seed.factors, 0, 1.2) for name, seed in paper_seeds().items()}
    search = EvolutionSearch(make_config(space=space), seeds)
    seen_tokens = {search.mutate_start_tokens(0) for _ in range(200)}
    assert seen_tokens <= set(PAPER_START_TOKENS) - {0} and len(seen_tokens) > 5
    scales = [search.mutate_mscale(1.45) for _ in range(200)]
    assert min(scales) >= 1.35 - 1e-9 and max(scales) <= 1.5 + 1e-9
    assert all(abs(m / 0.01 - round(m / 0.01)) < 1e-6 for m in scales)
    with pytest.raises(LongRopeError, match="mscale"):
        EvolutionSearch(make_config(space=space), paper_seeds())


def test_initial_population_holds_the_seeds_and_mutations_of_them() -> None:
    search = EvolutionSearch(make_config(), paper_seeds())
    population = search.ask()
    assert len(population) == 64 and len({c.key for c in population}) == 64
    keys = {c.key for c in population}
    assert all(search.project(seed).key in keys for seed in paper_seeds().values())
    for candidate in population:
        assert_valid(candidate, search.space)
    released = EvolutionSearch(make_config(init_seeds=("yarn",)), paper_seeds())
    origins = [record.origin for record in released._records] if released.ask() else []
    assert origins.count("seed:yarn") == 1 and "seed:pi" not in origins and len(origins) == 64


def test_no_candidate_is_ever_evaluated_twice(paper_runs) -> None:
    search = paper_runs[0]
    keys = [evaluation.candidate.key for evaluation in search.history]
    assert len(keys) == len(set(keys)) == 64 + 40 * 32
    assert search.ask() == [] and search.done


def test_non_finite_fitness_is_inf_and_the_search_goes_on() -> None:
    search = EvolutionSearch(make_config(num_generations=3), paper_seeds())
    while not search.done:
        batch = search.ask()
        results = {c.key: fitness_from_sample_nll([sample_nll(c, j) for j in range(5)]) for c in batch}
        results[batch[0].key] = float("nan")
        results[batch[1].key] = [2.5, float("inf"), 2.5, 2.5, 2.5]
        search.tell(results)
    failed = [e for e in search.history if math.isinf(e.fitness)]
    assert len(failed) == 2 * 4 and all(e.status == "complete" for e in failed)
    assert math.isfinite(search.best.fitness)
    assert json.loads(json.dumps(search.state_dict()))["records"][0]["fitness"] is None


def test_tell_rejects_unknown_keys_and_partial_scores_in_paper_mode() -> None:
    search = EvolutionSearch(make_config(), paper_seeds())
    batch = search.ask()
    with pytest.raises(LongRopeError, match="never asked"):
        search.tell({"n=0;m=-;f=1.0": 3.0})
    with pytest.raises(LongRopeError, match="should_continue"):
        search.tell({batch[0].key: [2.5, 2.6]})
    search.tell({batch[0].key: 12.0})
    with pytest.raises(LongRopeError, match="already told"):
        search.tell({batch[0].key: 12.0})
    assert search.should_continue(batch[1], [2.5] * 4) and not search.should_continue(batch[1], [2.5] * 5)


# ---------------------------------------------------------------------------------------------- behaviour


def test_paper_mode_converges_toward_the_optimum(paper_runs) -> None:
    search = paper_runs[0]
    best_per_generation = []
    for generation in range(41):
        done = [e.fitness for e in search.history if e.generation <= generation]
        best_per_generation.append(min(done))
    assert all(b <= a for a, b in zip(best_per_generation, best_per_generation[1:]))
    best_seed = min(factor_penalty(search.project(seed)) for seed in paper_seeds().values())
    final = factor_penalty(search.best.candidate)
    assert final < 0.1 * best_seed
    assert np.max(np.abs(np.log(search.best.candidate.factors) - np.log(OPTIMUM))) < 0.15
    assert best_per_generation[-1] < best_per_generation[0] * 0.97


def test_same_seed_same_result_other_seed_other_result(paper_runs) -> None:
    again = run(EvolutionSearch(make_config(seed=0), paper_seeds()))
    assert outcome(again) == outcome(paper_runs[0])
    assert outcome(paper_runs[1]) != outcome(paper_runs[0])


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_order_and_grouping_of_evaluation_do_not_matter(mode: str) -> None:
    reference = run(EvolutionSearch(make_config(mode=mode, num_generations=8), paper_seeds()))
    shuffled = EvolutionSearch(make_config(mode=mode, num_generations=8), paper_seeds())
    shuffler = random.Random(7)
    while not shuffled.done:
        batch = list(shuffled.ask())
        shuffler.shuffle(batch)
        half = len(batch) // 2
        # Two "workers" report separately, the second one first.
        first = score_generation(shuffled, batch[:half])
        second = score_generation(shuffled, batch[half:])
        shuffled.tell(second)
        shuffled.tell(first)
    assert outcome(shuffled) == outcome(reference)


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_resume_after_every_generation_and_mid_generation_gives_the_same_result(mode: str) -> None:
    config = make_config(mode=mode, num_generations=10, seed=4)
    reference = run(EvolutionSearch(config, paper_seeds()))
    search = EvolutionSearch(config, paper_seeds())
    while not search.done:
        batch = search.ask()
        results = score_generation(search, batch)
        keys = list(results)
        search.tell({key: results[key] for key in keys[:3]})
        # A crash mid-generation: resume from the JSON state in a new process (a new object).
        search = _reloaded(search, config)
        search.tell({key: results[key] for key in keys[3:]})
        search = _reloaded(search, config)
    assert outcome(search) == outcome(reference)
    assert search.best == reference.best


def _reloaded(search: EvolutionSearch, config: EvolutionConfig) -> EvolutionSearch:
    resumed = EvolutionSearch(config, paper_seeds())
    resumed.load_state_dict(json.loads(json.dumps(search.state_dict(), allow_nan=False)))
    return resumed


@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_a_resumed_run_may_be_extended_to_more_generations(mode: str) -> None:
    longer = run(EvolutionSearch(make_config(num_generations=8, seed=2, mode=mode), paper_seeds()))
    shorter = run(EvolutionSearch(make_config(num_generations=5, seed=2, mode=mode), paper_seeds()))
    extended = _reloaded(shorter, make_config(num_generations=8, seed=2, mode=mode))
    assert not extended.done
    assert outcome(run(extended)) == outcome(longer)


def test_state_from_another_config_is_refused_with_the_keys_that_differ() -> None:
    search = EvolutionSearch(make_config(), paper_seeds())
    search.ask()
    state = search.state_dict()
    other = EvolutionSearch(
        make_config(population_size=48, space=SearchSpaceConfig(rotary_dim=2 * NUM_FACTORS, scale=3.0)),
        {name: Candidate(tuple(min(f, 3.0) for f in seed.factors)) for name, seed in paper_seeds().items()},
    )
    with pytest.raises(LongRopeError) as error:
        other.load_state_dict(state)
    message = str(error.value)
    assert "population_size" in message and "space.scale" in message and "space.factor_max" in message
    assert "seed" not in message.replace("seeds", "").split("differs in:")[1].split(")")[0]
    with pytest.raises(LongRopeError, match="format"):
        search.load_state_dict({"format": "something else"})


# ---------------------------------------------------------------------------------------------- fast mode


def test_fast_mode_matches_paper_quality_with_a_third_of_the_samples(paper_runs) -> None:
    unit_ratios, quality_gaps = [], []
    for seed, paper in paper_runs.items():
        fast = run(EvolutionSearch(make_config(seed=seed, mode="fast"), paper_seeds()))
        unit_ratios.append(fast.sample_units / paper.sample_units)
        quality_gaps.append(math.log(fast.best.fitness / paper.best.fitness))
    assert statistics.median(unit_ratios) <= 1 / 3, unit_ratios
    # "Equal quality": within 0.2% perplexity, the indifference zone (race_tolerance) plus seed-to-seed noise.
    assert statistics.median(quality_gaps) <= 0.002, quality_gaps


def test_fast_mode_with_a_zero_floor_makes_exactly_the_papers_decisions() -> None:
    paper = run(EvolutionSearch(make_config(seed=1, num_generations=10), paper_seeds()), steep_sample_nll)
    config = make_config(
        seed=1,
        num_generations=10,
        mode="fast",
        stop_rule="bound",
        nll_floor="zero",
        elite_size=0,
        mutation_sigma=0.0,
        seeds_only_start=False,
        wave_size=0,
    )
    proved = run(EvolutionSearch(config, paper_seeds()), steep_sample_nll)
    assert proved.best == paper.best
    assert [e.candidate.key for e in proved.history] == [e.candidate.key for e in paper.history]
    stopped = [e for e in proved.history if e.status == "stopped"]
    assert stopped and proved.sample_units < paper.sample_units
    for evaluation in stopped:
        complete = sorted(e.fitness for e in paper.history if e.generation < evaluation.generation)
        assert evaluation.fitness > complete[31]


def test_fast_mode_stopped_candidates_never_breed_and_the_best_is_exact() -> None:
    search = EvolutionSearch(make_config(mode="fast", num_generations=12), paper_seeds())
    while not search.done:
        batch = search.ask()
        threshold = search.stop_threshold()
        search.tell(score_generation(search, batch))
        for evaluation in search.history:
            if evaluation.generation == search.generation and evaluation.status == "stopped":
                assert evaluation.fitness > threshold * math.exp(-search.config.race_tolerance)
        assert all(e.status != "stopped" for e in search.parents())
    statuses = {e.status for e in search.history}
    assert {"complete", "stopped", "estimated"} <= statuses
    best = search.best
    assert best.status == "complete" and best.sample_units == 5
    assert best.fitness == pytest.approx(fitness_from_sample_nll([sample_nll(best.candidate, j) for j in range(5)]))
    units = sum(e.sample_units for e in search.history)
    assert units == search.sample_units < 5 * len(search.history)


def test_fast_mode_cuts_overlong_reports_where_it_would_have_stopped() -> None:
    lazy = EvolutionSearch(make_config(mode="fast", num_generations=4), paper_seeds())
    while not lazy.done:
        # This caller ignores should_continue() and scores everything: the recorded outcome must not change.
        lazy.tell({c.key: [sample_nll(c, j) for j in range(5)] for c in lazy.ask()})
    careful = run(EvolutionSearch(make_config(mode="fast", num_generations=4), paper_seeds()))
    assert [e[:5] for e in outcome(lazy)] == [e[:5] for e in outcome(careful)]
    assert lazy.sample_units > careful.sample_units


# ---------------------------------------------------------------------------------------------- variants


def test_piecewise_variant_keeps_ones_below_alpha_and_scale_above_beta() -> None:
    space = SearchSpaceConfig(rotary_dim=2 * NUM_FACTORS, scale=SCALE, variant="piecewise")
    search = EvolutionSearch(make_config(space=space, num_generations=5), paper_seeds())
    run(search)
    bounds_seen = set()
    for evaluation in search.history:
        candidate = evaluation.candidate
        assert_valid(candidate, space)
        alpha, beta = candidate.piece_bounds
        assert -1 <= alpha < beta <= NUM_FACTORS - 1
        bounds_seen.add((alpha, beta))
        factors = np.asarray(candidate.factors)
        assert np.all(factors[: alpha + 1] == 1.0)
        assert np.all(factors[beta + 1 :] == SCALE)
        # With no dim after beta nothing pins the top, so the searched dims may go up to factor_max.
        ceiling = SCALE if beta < NUM_FACTORS - 1 else space.factor_max
        assert np.all((factors[alpha + 1 : beta + 1] >= 1.0) & (factors[alpha + 1 : beta + 1] <= ceiling + 1e-9))
    assert len(bounds_seen) > 3
    assert search.project(paper_seeds()["yarn"]).piece_bounds == (4, 11)


def test_longrope2_variant_fills_ntk_below_the_critical_dimension() -> None:
    space = SearchSpaceConfig(
        rotary_dim=2 * NUM_FACTORS,
        variant="longrope2",
        rope_theta=10000.0,
        original_max_position_embeddings=256,
        max_position_embeddings=1024,
    )
    low, high = critical_dimension_range(2 * NUM_FACTORS, 10000.0, 256)
    assert (space.critical_dim_min, space.critical_dim_max) == (low, high) and space.factor_max == 2 * SCALE
    search = EvolutionSearch(make_config(space=space, num_generations=4), paper_seeds())
    population = search.ask()
    critical = {c.critical_dim for c in population if c.critical_dim is not None}
    assert critical == set(range(low, high + 1))
    run(search)
    structured = [e.candidate for e in search.history if e.candidate.critical_dim is not None]
    assert len(structured) > 100
    for candidate in structured:
        assert_valid(candidate, space)
        d = candidate.critical_dim
        factors = np.asarray(candidate.factors)
        assert np.all((factors[d:] >= SCALE) & (factors[d:] <= 2 * SCALE + 1e-9))
        ntk = factors[d] ** (np.arange(d) / d)
        np.testing.assert_allclose(factors[:d], ntk, atol=0.005 + 1e-9)
        assert search.ntk_fill(d, factors[d]) == tuple(factors[:d])
    # The plain seeds are scored as baselines but never breed: they have no critical dimension.
    assert all(p.candidate.critical_dim is not None for p in search.parents())


def test_critical_dimension_range_matches_the_paper() -> None:
    assert critical_dimension_range(96, 10000.0, 2048) == (19, 31)
    assert critical_dimension_range(128, 500000.0, 8192) == (24, 35)


def test_lambda_start_variant_searches_the_start_tokens() -> None:
    space = SearchSpaceConfig(rotary_dim=2 * NUM_FACTORS, scale=SCALE, variant="lambda_start")
    search = run(EvolutionSearch(make_config(space=space, num_generations=15), paper_seeds()))
    tokens = {e.candidate.start_tokens for e in search.history}
    assert tokens <= set(PAPER_START_TOKENS) and len(tokens) > 5
    assert search.best.candidate.start_tokens in (4, 8, 12, 16)


def test_every_variant_has_its_operators() -> None:
    assert set(VARIANT_TYPES) == set(VARIANTS)
    assert len(set(VARIANT_TYPES.values())) == len(VARIANTS)
