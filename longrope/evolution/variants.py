"""The search-space variants as objects: each knows how a seed is projected onto its space, which genes a mutation or
crossover changes, how its structure genes (start tokens, piece bounds, critical dimension) move, and which initial
individuals it adds to the seeds. :func:`variant_for` picks the class once from ``space.variant``.

:class:`Variant` is the plain space every variant builds on: each factor is a gene, moved between its neighbours
(Algorithm 1) or by a log-normal step (fast mode), and the mscale is a gene when ``search_mscale`` is on. Every
operator draws from the generator it is given, in a fixed order, so that a seed reproduces a search exactly.
"""

from __future__ import annotations

import math

import numpy as np

from longrope.evolution.checks import fail
from longrope.evolution.config import EvolutionConfig
from longrope.evolution.space import (
    Candidate,
    SearchSpaceConfig,
    factor_units,
    factor_values,
    grid_candidate,
    mscale_units,
    mscale_value,
)

# What a variant's hooks give back: the factor grid and the structure genes of the child.
Structured = tuple[np.ndarray, int | None, tuple[int, int] | None]


class Variant:
    """Operators of the plain space; the hooks (``_check_start_tokens`` ... ``_crossed_start_tokens``) are where
    the variants differ."""

    #: False when the variant builds its own initial individuals and the search may start without seeds.
    needs_seeds = True

    def __init__(self, config: EvolutionConfig) -> None:
        self.space: SearchSpaceConfig = config.space
        self.mutation_prob = config.mutation_prob
        self.max_crossover_tries = config.max_crossover_tries

    # ------------------------------------------------------------------ operators

    def project(self, candidate: Candidate, label: str) -> Candidate:
        """See :meth:`EvolutionSearch.project`; draws nothing."""
        space = self.space
        n = space.num_factors
        if len(candidate.factors) != n:
            fail(f"{label}: has {len(candidate.factors)} factors, expected {n} (rotary_dim / 2)")
        raw = np.asarray(candidate.factors) / space.factor_step
        grid = np.rint(raw).astype(np.int64)
        outside = np.flatnonzero((raw < space.grid_min - 0.5) | (raw > space.grid_max + 0.5))
        if outside.size:
            i = int(outside[0])
            fail(
                f"{label}: factor {i} = {candidate.factors[i]} is outside [factor_min, factor_max] = "
                f"[{space.factor_min}, {space.factor_max}]; widen the bounds or fix the seed"
            )
        grid = np.clip(grid, space.grid_min, space.grid_max)
        self._check_start_tokens(candidate.start_tokens, label)
        mscale = candidate.mscale
        if space.search_mscale:
            if mscale is None:
                fail(f"{label}: mscale is None but search_mscale is on; give each seed its mscale (e.g. su value)")
            if not space.mscale_min - space.mscale_step / 2 <= mscale <= space.mscale_max + space.mscale_step / 2:
                fail(f"{label}: mscale = {mscale} is outside [mscale_min, mscale_max]; widen them or fix the seed")
            mscale = mscale_value(space, mscale_units(space, mscale))
        grid, critical_dim, piece_bounds = self._project_structure(grid, candidate, label)
        return grid_candidate(space, grid, candidate.start_tokens, mscale, critical_dim, piece_bounds)

    def mutate(self, parent: Candidate, rng: np.random.Generator, step: float | None) -> Candidate:
        """See :meth:`EvolutionSearch.mutate`; ``step`` is fast mode's log-normal step, None for the paper's
        redraw between neighbours."""
        grid, critical_dim, piece_bounds = self._mutate_factors(factor_units(self.space, parent), parent, rng, step)
        start_tokens = self._mutated_start_tokens(parent.start_tokens, rng)
        mscale = parent.mscale
        if self.space.search_mscale and rng.random() < self.mutation_prob:
            mscale = self.mutate_mscale(mscale, rng)
        return grid_candidate(self.space, grid, start_tokens, mscale, critical_dim, piece_bounds)

    def crossover(
        self, parent1: Candidate, parent2: Candidate, rng: np.random.Generator, exclude: frozenset[str] | set[str]
    ) -> Candidate | None:
        """See :meth:`EvolutionSearch.crossover`."""
        space, half_p = self.space, self.mutation_prob / 2
        first, second = factor_units(space, parent1), factor_units(space, parent2)
        for _ in range(self.max_crossover_tries):
            take = rng.random(space.num_factors) < half_p
            structured = self._cross_factors(np.where(take, second, first), first, second, parent1, parent2, rng)
            if structured is None:
                continue
            grid, critical_dim, piece_bounds = structured
            start_tokens = self._crossed_start_tokens(parent1, parent2, rng)
            mscale = parent1.mscale
            if space.search_mscale and rng.random() < half_p:
                mscale = parent2.mscale
            if np.any(np.diff(grid) < 0) or grid.min() < space.grid_min or grid.max() > space.grid_max:
                continue
            child = grid_candidate(space, grid, start_tokens, mscale, critical_dim, piece_bounds)
            if child.key in exclude or child.key in (parent1.key, parent2.key):
                continue
            return child
        return None

    def mutate_start_tokens(self, start_tokens: int, rng: np.random.Generator) -> int:
        """A new start-token count drawn uniformly from the allowed set, other than the current one."""
        choices = [n for n in self.space.start_token_choices if n != start_tokens] or [start_tokens]
        return int(choices[rng.integers(len(choices))])

    def mutate_mscale(self, mscale: float | None, rng: np.random.Generator) -> float:
        """A new mscale drawn uniformly on its grid within ``mscale_radius`` of the current one, inside the bounds."""
        space = self.space
        low_units, high_units = mscale_units(space, space.mscale_min), mscale_units(space, space.mscale_max)
        centre = mscale_units(space, mscale if mscale is not None else space.mscale_min)
        radius = max(1, round(space.mscale_radius / space.mscale_step))
        low, high = max(low_units, centre - radius), min(high_units, centre + radius)
        return mscale_value(space, int(rng.integers(low, high + 1)))

    def initial_individuals(self, rng: np.random.Generator, mscale: float | None) -> list[tuple[Candidate, str]]:
        """Individuals of generation 0 besides the seeds, with their origins; ``mscale`` is the one they carry."""
        return []

    def may_breed(self, candidate: Candidate) -> bool:
        """Whether the candidate may be a parent (every candidate but a longrope2 baseline)."""
        return True

    # ------------------------------------------------------------------ hooks

    def _check_start_tokens(self, start_tokens: int, label: str) -> None:
        """Refuse a seed whose start tokens the space cannot hold (only where they are searched)."""

    def _project_structure(self, grid: np.ndarray, candidate: Candidate, label: str) -> Structured:
        """Fit a snapped seed's grid to the variant's structure."""
        return grid, candidate.critical_dim, candidate.piece_bounds

    def _mutate_factors(
        self, grid: np.ndarray, parent: Candidate, rng: np.random.Generator, step: float | None
    ) -> Structured:
        """Mutate the parent's grid (a copy, changed in place) and structure genes."""
        self._change_genes(grid, 0, self.space.num_factors - 1, self.space.grid_min, self.space.grid_max, rng, step)
        return grid, parent.critical_dim, parent.piece_bounds

    def _cross_factors(
        self,
        grid: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        parent1: Candidate,
        parent2: Candidate,
        rng: np.random.Generator,
    ) -> Structured | None:
        """Fit a crossed grid (genes of ``first`` and ``second``) to the structure; None fails this try."""
        return grid, parent1.critical_dim, parent1.piece_bounds

    def _mutated_start_tokens(self, start_tokens: int, rng: np.random.Generator) -> int:
        return start_tokens

    def _crossed_start_tokens(self, parent1: Candidate, parent2: Candidate, rng: np.random.Generator) -> int:
        return parent1.start_tokens

    def _change_genes(
        self,
        grid: np.ndarray,
        first: int,
        last: int,
        low: int,
        high: int,
        rng: np.random.Generator,
        step: float | None,
    ) -> None:
        if step is None:
            redraw_genes(grid, first, last, low, high, rng, self.mutation_prob)
        else:
            perturb_genes(grid, first, last, low, high, rng, self.mutation_prob, step)


class LambdaVariant(Variant):
    """``lambda`` (the released ``dim_mono``): the factors alone, every one of them a gene."""


class LambdaStartVariant(Variant):
    """``lambda_start`` (the internal ``dim_mono_n``): the factors and the start tokens n, drawn from a fixed set."""

    def _check_start_tokens(self, start_tokens: int, label: str) -> None:
        if start_tokens not in self.space.start_token_choices:
            fail(f"{label}: start_tokens = {start_tokens} is not in start_token_choices; add it or change the seed")

    def _mutated_start_tokens(self, start_tokens: int, rng: np.random.Generator) -> int:
        if rng.random() < self.mutation_prob:
            return self.mutate_start_tokens(start_tokens, rng)
        return start_tokens

    def _crossed_start_tokens(self, parent1: Candidate, parent2: Candidate, rng: np.random.Generator) -> int:
        return parent2.start_tokens if rng.random() < self.mutation_prob / 2 else parent1.start_tokens


class PiecewiseVariant(Variant):
    """``piecewise`` (``dim_piece_mono``): dims <= alpha keep 1, dims > beta get the scale, the dims in between are
    searched; the piece bounds (alpha, beta) are genes too, moving at most ``piece_radius`` per mutation."""

    def _project_structure(self, grid: np.ndarray, candidate: Candidate, label: str) -> Structured:
        bounds = candidate.piece_bounds or self._infer_bounds(grid)
        if grid[bounds[0] + 1 :].min() < self._one:
            fail(f"{label}: the piecewise variant needs factors >= 1 after alpha; fix the seed")
        return self._layout(grid, bounds), candidate.critical_dim, bounds

    def _mutate_factors(
        self, grid: np.ndarray, parent: Candidate, rng: np.random.Generator, step: float | None
    ) -> Structured:
        bounds = self._mutate_bounds(parent.piece_bounds or self._infer_bounds(grid), rng)
        grid = self._layout(grid, bounds)
        alpha, beta = bounds
        self._change_genes(grid, alpha + 1, beta, self._one, self._ceiling(beta), rng, step)
        return grid, parent.critical_dim, bounds

    def _cross_factors(
        self,
        grid: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        parent1: Candidate,
        parent2: Candidate,
        rng: np.random.Generator,
    ) -> Structured | None:
        half_p = self.mutation_prob / 2
        bounds1 = parent1.piece_bounds or self._infer_bounds(first)
        bounds2 = parent2.piece_bounds or self._infer_bounds(second)
        alpha = bounds2[0] if rng.random() < half_p else bounds1[0]
        beta = bounds2[1] if rng.random() < half_p else bounds1[1]
        if alpha >= beta:
            return None
        return self._layout(grid, (alpha, beta), clip=False), parent1.critical_dim, (alpha, beta)

    @property
    def _one(self) -> int:
        return max(self.space.grid_min, round(1.0 / self.space.factor_step))

    def _ceiling(self, beta: int) -> int:
        # Dims after beta sit at the scale, so the searched ones may not exceed it; with none after, factor_max.
        return self.space.grid_scale if beta < self.space.num_factors - 1 else self.space.grid_max

    def _infer_bounds(self, grid: np.ndarray) -> tuple[int, int]:
        n, one, top = len(grid), self._one, self.space.grid_scale
        alpha = -1
        while alpha + 1 < n - 1 and grid[alpha + 1] <= one:
            alpha += 1
        first_top = n
        while first_top - 1 > alpha + 1 and grid[first_top - 1] == top:
            first_top -= 1
        return alpha, max(alpha + 1, first_top - 1)

    def _layout(self, grid: np.ndarray, bounds: tuple[int, int], clip: bool = True) -> np.ndarray:
        alpha, beta = bounds
        laid = grid.copy()
        laid[: alpha + 1] = self._one
        laid[beta + 1 :] = self.space.grid_scale
        if clip:
            laid[alpha + 1 : beta + 1] = np.clip(laid[alpha + 1 : beta + 1], self._one, self._ceiling(beta))
        return laid

    def _mutate_bounds(self, bounds: tuple[int, int], rng: np.random.Generator) -> tuple[int, int]:
        alpha, beta = bounds
        radius, p = self.space.piece_radius, self.mutation_prob
        if rng.random() < p:
            alpha = int(rng.integers(max(-1, alpha - radius), min(beta - 1, alpha + radius) + 1))
        if rng.random() < p:
            top = self.space.num_factors - 1
            beta = int(rng.integers(max(alpha + 1, beta - radius), min(top, beta + radius) + 1))
        return alpha, beta


class LongRope2Variant(Variant):
    """``longrope2`` (LongRoPE2's critical-dimension search): dims >= d_rcd are searched in [scale, factor_max],
    dims below are NTK-filled from the first searched one. Generation 0 adds one individual per critical dimension
    in the space's range; the plain seeds (no critical dimension) are scored as baselines and never breed."""

    needs_seeds = False

    def initial_individuals(self, rng: np.random.Generator, mscale: float | None) -> list[tuple[Candidate, str]]:
        space = self.space
        return [
            (critical_individual(space, rng, critical_dim, mscale), f"critical-init:{critical_dim}")
            for critical_dim in range(space.critical_dim_min, space.critical_dim_max + 1)
        ]

    def may_breed(self, candidate: Candidate) -> bool:
        # A child is defined relative to its critical dimension; a plain seed (PI/NTK/YaRN) has none.
        return candidate.critical_dim is not None

    def _project_structure(self, grid: np.ndarray, candidate: Candidate, label: str) -> Structured:
        critical_dim = candidate.critical_dim
        if critical_dim is not None:
            if grid[critical_dim:].min() < self.space.grid_scale:
                fail(f"{label}: factors from critical_dim {critical_dim} on must be >= scale ({self.space.scale})")
            grid = ntk_filled(self.space, grid, critical_dim)
        return grid, critical_dim, candidate.piece_bounds

    def _mutate_factors(
        self, grid: np.ndarray, parent: Candidate, rng: np.random.Generator, step: float | None
    ) -> Structured:
        critical_dim = parent.critical_dim
        if critical_dim is None:
            return super()._mutate_factors(grid, parent, rng, step)
        space = self.space
        self._change_genes(grid, critical_dim, space.num_factors - 1, space.grid_scale, space.grid_max, rng, step)
        return ntk_filled(space, grid, critical_dim), critical_dim, parent.piece_bounds

    def _cross_factors(
        self,
        grid: np.ndarray,
        first: np.ndarray,
        second: np.ndarray,
        parent1: Candidate,
        parent2: Candidate,
        rng: np.random.Generator,
    ) -> Structured | None:
        critical_dim = parent1.critical_dim
        if critical_dim is None:
            return super()._cross_factors(grid, first, second, parent1, parent2, rng)
        if grid[critical_dim:].min() < self.space.grid_scale:
            return None
        return ntk_filled(self.space, grid, critical_dim), critical_dim, parent1.piece_bounds


VARIANT_TYPES: dict[str, type[Variant]] = {
    "lambda": LambdaVariant,
    "lambda_start": LambdaStartVariant,
    "piecewise": PiecewiseVariant,
    "longrope2": LongRope2Variant,
}


def variant_for(config: EvolutionConfig) -> Variant:
    """The operators of ``config.space.variant``."""
    return VARIANT_TYPES[config.space.variant](config)


def redraw_genes(
    grid: np.ndarray, first: int, last: int, low: int, high: int, rng: np.random.Generator, p: float
) -> None:
    """Algorithm 1's mutation of ``grid[first:last + 1]`` in place: each gene, with probability ``p``, is redrawn
    uniformly between its (already updated) left neighbour and its right neighbour, as the released code does."""
    for i in range(first, last + 1):
        if rng.random() < p:
            left = grid[i - 1] if i > first else low
            right = grid[i + 1] if i < last else high
            if right >= left:
                grid[i] = rng.integers(left, right + 1)


def perturb_genes(
    grid: np.ndarray, first: int, last: int, low: int, high: int, rng: np.random.Generator, p: float, sigma: float
) -> None:
    """Fast mode's mutation of ``grid[first:last + 1]`` in place: multiplicative log-normal steps of size ``sigma``
    around the parent, then sorted to restore the monotone constraint."""
    # The paper redraws a gene anywhere between its neighbours, which near a good curve is almost always a step back.
    for i in range(first, last + 1):
        if rng.random() < p:
            moved = int(np.rint(grid[i] * math.exp(sigma * rng.standard_normal())))
            if moved == grid[i]:
                moved += 1 if rng.random() < 0.5 else -1
            grid[i] = moved
    grid[first : last + 1] = np.sort(np.clip(grid[first : last + 1], low, high))


def ntk_filled(space: SearchSpaceConfig, grid: np.ndarray, critical_dim: int) -> np.ndarray:
    """A copy of ``grid`` with the dims below ``critical_dim`` NTK-filled: ``value ** (i / critical_dim)`` on the
    grid, ``value`` being the factor at ``critical_dim``, so the curve is continuous there."""
    filled = grid.copy()
    anchor = grid[critical_dim] * space.factor_step
    exponents = np.arange(critical_dim) / critical_dim
    filled[:critical_dim] = np.rint(anchor**exponents / space.factor_step).astype(np.int64)
    filled[:critical_dim] = np.clip(filled[:critical_dim], space.grid_min, grid[critical_dim])
    return filled


def critical_individual(
    space: SearchSpaceConfig, rng: np.random.Generator, critical_dim: int, mscale: float | None
) -> Candidate:
    """LongRoPE2's initial individual for one critical dimension: dims >= d_rcd all equal a value drawn uniformly
    on the grid in [scale, 2 * scale] (clipped to factor_max), dims below NTK-filled."""
    high = min(space.grid_max, round(2 * space.scale / space.factor_step))
    value = int(rng.integers(space.grid_scale, max(space.grid_scale, high) + 1))
    grid = ntk_filled(space, np.full(space.num_factors, value, dtype=np.int64), critical_dim)
    return grid_candidate(space, grid, 0, mscale, critical_dim, None)


def ntk_fill_values(space: SearchSpaceConfig, critical_dim: int, value: float) -> tuple[float, ...]:
    """The NTK-filled factors below ``critical_dim`` when the first searched factor is ``value``."""
    grid = np.zeros(space.num_factors, dtype=np.int64)
    grid[critical_dim:] = round(value / space.factor_step)
    return tuple(float(x) for x in factor_values(space, ntk_filled(space, grid, critical_dim)[:critical_dim]))
