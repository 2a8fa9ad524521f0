"""The LongRoPE evolutionary search (Algorithm 1 of arXiv 2402.13753) as a pure, resumable ask/tell algorithm.

The search knows nothing of models: the caller evaluates candidates and tells their fitness (perplexity, lower is
better). Everything random happens inside :meth:`EvolutionSearch.ask`, from one seeded ``numpy`` generator whose
state is part of :meth:`EvolutionSearch.state_dict`, so

* a run saved after any ``tell`` and resumed gives exactly the result of an uninterrupted run with the same seed;
* the order and grouping in which the caller evaluates a generation (one process or many) cannot change the outcome.

Search space (LongRoPE Table 4): one rescale factor per RoPE frequency pair on a 0.01 grid in [1, 1.25 * scale],
monotone non-decreasing; optionally the start tokens n (from a fixed set) and the attention scaling (mscale).
Variants: ``lambda`` (the released ``dim_mono``), ``lambda_start`` (also n, as in the internal ``dim_mono_n``),
``piecewise`` (``dim_piece_mono``: dims <= alpha keep 1, dims > beta get the scale, dims in between are searched)
and ``longrope2`` (LongRoPE2's critical-dimension search: dims >= d_rcd searched in [s, 2s], dims below NTK-filled).

Two modes (``EvolutionConfig.mode``; ``fast`` is the default):

* ``paper``: Algorithm 1 as published. Every candidate is scored on all ``num_samples`` samples.
* ``fast``: cheaper at equal quality. The caller scores a candidate one sample at a time and asks
  :meth:`EvolutionSearch.should_continue` after each sample. A candidate that cannot reach the current top-k is
  stopped (``stop_rule="bound"``: proved with an NLL floor; ``"race"``, the default: also predicted from its first
  samples with a calibrated error bar), and one that is in the top-k but not a new best is accepted with its
  predicted fitness. Only possible new bests are scored in full, so the reported best is always exact. The search
  itself is also greedier (each knob can be turned back to Algorithm 1's behaviour): the top ``elite_size`` (4)
  breed and set the stop threshold instead of the top ``num_parents``; a generation's children are bred in waves
  of ``wave_size`` (8), each from the elite the waves before it left; a mutation moves genes by multiplicative
  log-normal steps (``mutation_sigma``, 0.2) instead of redrawing them anywhere between their neighbours, and the
  step adapts after every wave by the 1/5 success rule (``adapt_sigma``); and the search starts from the seeds
  alone instead of ``population_size`` random mutations of them (``seeds_only_start``). On the tiny model these
  reach the paper mode's final fitness with 0.05-0.13x its tokens (median 0.085x over 6 seeds,
  ``benchmarks/README.md``).

Fitness of per-sample scores: ``exp(mean_j nll_j)`` where ``nll_j`` is the mean negative log-likelihood per token of
sample j (nats); with equal-length samples (the paper truncates every sample to the target length) this is the
perplexity over all tokens.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from longrope.errors import LongRopeError

PAPER_START_TOKENS: tuple[int, ...] = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
VARIANTS: tuple[str, ...] = ("lambda", "lambda_start", "piecewise", "longrope2")
MODES: tuple[str, ...] = ("paper", "fast")
STOP_RULES: tuple[str, ...] = ("bound", "race")
NLL_FLOORS: tuple[str, ...] = ("zero", "observed")
STATE_FORMAT = "longrope.evolution/1"

# Keys identify factors to 1e-6; the search snaps everything to its grid (>= 1e-4) first, so a key is a grid point.
_KEY_DECIMALS = 6
_MIN_STEP = 1e-4
# Exponent past which exp() overflows a float; a mean NLL this large is as bad as a failed evaluation.
_MAX_LOG_PPL = 700.0
# Fast mode's step adaptation (Rechenberg's 1/5 success rule): the mutation step grows while more than a fifth of a
# wave's children enter the elite and shrinks while fewer do, by exp(rate - 1/5) per wave, within these bounds (a
# 2% step is already about one grid point of a factor near 1; beyond e^1 a step is no longer local).
_TARGET_SUCCESS = 0.2
_SIGMA_BOUNDS = (0.02, 1.0)


def _fail(message: str) -> None:
    raise LongRopeError(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _require_int(name: str, value: Any, minimum: int, hint: str = "") -> None:
    if not _is_int(value) or value < minimum:
        _fail(f"{name} = {value!r}: must be an integer >= {minimum}{hint}")


def _require_number(name: str, value: Any, low: float, high: float = math.inf, hint: str = "") -> None:
    if not _is_number(value) or not math.isfinite(value) or not (low <= value <= high):
        span = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        _fail(f"{name} = {value!r}: must be a finite number {span}{hint}")


def _require_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        _fail(f"{name} = {value!r}: must be one of {', '.join(repr(c) for c in choices)}")


def critical_dimension_range(rotary_dim: int, rope_theta: float, original_length: int) -> tuple[int, int]:
    """LongRoPE2's candidate range for the real critical dimension, in frequency-pair ("cosine") indices.

    Returns ``(d10, d_tcd)``: the dimension with 10 full periods inside ``original_length`` and the theoretical
    critical dimension, the first one whose period does not fit (LongRoPE2 Eq. 7, Alg. 1). Phi3-mini (96, 1e4,
    2048) gives (19, 31); LLaMA3-8B (128, 5e5, 8192) gives (24, 35).
    """
    half = rotary_dim / 2
    d_tcd = math.ceil(half * math.log(original_length / (2 * math.pi)) / math.log(rope_theta))
    d10 = math.ceil(half * math.log(original_length / (2 * math.pi * 10)) / math.log(rope_theta))
    return d10, d_tcd


@dataclass
class SearchSpaceConfig:
    """What a candidate may be. Defaults are LongRoPE's (Table 4); the resolved values are kept in the fields.

    ``rotary_dim`` is the number of rotated channels per head (head_dim * partial_rotary_factor); there is one factor
    per pair, ``rotary_dim // 2``. ``scale`` is target length / original length; give it or both lengths.
    ``factor_max`` defaults to 1.25 * scale (the paper; the released code uses 1 + scale), or 2 * scale for
    ``longrope2``, whose searched dims live in [scale, 2 * scale].
    """

    rotary_dim: int
    scale: float | None = None
    original_max_position_embeddings: int | None = None
    max_position_embeddings: int | None = None
    variant: str = "lambda"
    factor_step: float = 0.01
    factor_min: float = 1.0
    factor_max: float | None = None
    start_token_choices: tuple[int, ...] = PAPER_START_TOKENS
    search_mscale: bool = False
    mscale_min: float = 1.0
    mscale_max: float = 2.0
    mscale_step: float = 0.01
    mscale_radius: float = 0.1
    piece_radius: int = 2
    rope_theta: float | None = None
    critical_dim_min: int | None = None
    critical_dim_max: int | None = None

    def __post_init__(self) -> None:
        _require_int("rotary_dim", self.rotary_dim, 2, " (head_dim * partial_rotary_factor)")
        if self.rotary_dim % 2:
            _fail(f"rotary_dim = {self.rotary_dim}: must be even (one rescale factor per pair of channels)")
        _require_choice("variant", self.variant, VARIANTS)
        for name in ("original_max_position_embeddings", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None:
                _require_int(name, value, 1)
        lengths = (self.original_max_position_embeddings, self.max_position_embeddings)
        if self.scale is None:
            if None in lengths:
                _fail("scale: give scale, or both original_max_position_embeddings and max_position_embeddings")
            self.scale = lengths[1] / lengths[0]
        _require_number("scale", self.scale, 1e-6, hint=" (target length / original length)")
        self.scale = float(self.scale)
        if None not in lengths and not math.isclose(self.scale, lengths[1] / lengths[0], rel_tol=1e-6):
            _fail(
                f"scale = {self.scale}: differs from max_position_embeddings / original_max_position_embeddings"
                f" = {lengths[1] / lengths[0]}; drop scale or fix the lengths"
            )
        _require_number("factor_step", self.factor_step, _MIN_STEP, hint=" (the paper uses 0.01)")
        _require_number("factor_min", self.factor_min, 1e-6, hint=" (1.0 = extrapolation)")
        if self.factor_max is None:
            self.factor_max = (2.0 if self.variant == "longrope2" else 1.25) * self.scale
        _require_number("factor_max", self.factor_max, 1e-6)
        self.factor_step, self.factor_min, self.factor_max = (
            float(self.factor_step),
            float(self.factor_min),
            float(self.factor_max),
        )
        if self.grid_min > self.grid_max:
            _fail(
                f"factor_max = {self.factor_max}: the range [factor_min, factor_max] = [{self.factor_min}, "
                f"{self.factor_max}] holds no point of the {self.factor_step} grid; raise factor_max"
            )
        choices = tuple(self.start_token_choices)
        if not choices or not all(_is_int(n) and n >= 0 for n in choices) or len(set(choices)) != len(choices):
            _fail(f"start_token_choices = {list(choices)!r}: must be distinct integers >= 0, at least one")
        self.start_token_choices = tuple(sorted(int(n) for n in choices))
        if not isinstance(self.search_mscale, bool):
            _fail(f"search_mscale = {self.search_mscale!r}: must be true or false")
        _require_number("mscale_step", self.mscale_step, _MIN_STEP)
        _require_number("mscale_min", self.mscale_min, 1e-6)
        _require_number("mscale_max", self.mscale_max, self.mscale_min, hint=" (and >= mscale_min)")
        _require_number("mscale_radius", self.mscale_radius, self.mscale_step, hint=" (and >= mscale_step)")
        _require_int("piece_radius", self.piece_radius, 1)
        if self.variant == "piecewise":
            if self.num_factors < 2:
                _fail(f"rotary_dim = {self.rotary_dim}: the piecewise variant needs at least 2 factors")
            if not (self.factor_min <= 1.0 <= self.scale <= self.factor_max):
                _fail(
                    f"factor_min/factor_max = [{self.factor_min}, {self.factor_max}]: the piecewise variant needs "
                    f"factor_min <= 1 <= scale ({self.scale}) <= factor_max"
                )
        if self.variant == "longrope2":
            self._validate_longrope2()

    def _validate_longrope2(self) -> None:
        if self.rope_theta is None:
            _fail("rope_theta: the longrope2 variant needs the model's RoPE base (config.rope_theta)")
        _require_number("rope_theta", self.rope_theta, 1.0 + 1e-9, hint=" (the model's RoPE base)")
        if self.original_max_position_embeddings is None:
            _fail("original_max_position_embeddings: the longrope2 variant needs the pre-trained context length")
        if self.scale < 1.0:
            _fail(f"scale = {self.scale}: the longrope2 variant extends the context, so scale must be >= 1")
        if not (self.factor_min <= self.scale <= self.factor_max):
            _fail(
                f"factor_max = {self.factor_max}: the longrope2 variant searches dims above d_rcd in "
                f"[scale, factor_max], so factor_min <= scale ({self.scale}) <= factor_max is required"
            )
        low, high = critical_dimension_range(
            self.rotary_dim, float(self.rope_theta), self.original_max_position_embeddings
        )
        top = self.num_factors - 1
        if self.critical_dim_min is None:
            self.critical_dim_min = min(max(low, 1), top)
        if self.critical_dim_max is None:
            self.critical_dim_max = min(max(high, self.critical_dim_min), top)
        _require_int("critical_dim_min", self.critical_dim_min, 1)
        _require_int("critical_dim_max", self.critical_dim_max, self.critical_dim_min, " (and >= critical_dim_min)")
        if self.critical_dim_max > top:
            _fail(f"critical_dim_max = {self.critical_dim_max}: must be <= {top} (rotary_dim / 2 - 1)")

    @property
    def num_factors(self) -> int:
        """Number of rescale factors: one per RoPE frequency pair."""
        return self.rotary_dim // 2

    @property
    def grid_min(self) -> int:
        """Smallest allowed factor, in grid units (factor = units * factor_step)."""
        return math.ceil(self.factor_min / self.factor_step - 1e-9)

    @property
    def grid_max(self) -> int:
        """Largest allowed factor, in grid units."""
        return math.floor(self.factor_max / self.factor_step + 1e-9)

    @property
    def grid_scale(self) -> int:
        """The scale s snapped to the grid: the value PI uses and the piecewise / longrope2 regions start at."""
        return min(max(round(self.scale / self.factor_step), self.grid_min), self.grid_max)


@dataclass
class EvolutionConfig:
    """How the search runs. Defaults are the paper's (LongRoPE Sec. 4, targets up to 256k), except ``mode``.

    ``mode`` defaults to ``fast``, the project's default (the paper mode's final fitness for a fraction of its
    samples, see the module docstring); ``paper`` is Algorithm 1 as published. ``init_seeds`` names the seeds the
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
            _fail(f"space = {self.space!r}: must be a SearchSpaceConfig")
        _require_int("population_size", self.population_size, 1, " (the paper uses 64)")
        _require_int("num_mutations", self.num_mutations, 0, " (the paper uses 16)")
        _require_int("num_crossovers", self.num_crossovers, 0, " (the paper uses 16)")
        if self.num_mutations + self.num_crossovers == 0:
            _fail("num_mutations: num_mutations + num_crossovers must be >= 1, or no generation makes children")
        _require_number("mutation_prob", self.mutation_prob, 1e-9, 1.0, " (the paper uses 0.3)")
        _require_int("num_generations", self.num_generations, 0, " (the paper uses 40)")
        _require_int("num_parents", self.num_parents, 1, " (the paper uses 32)")
        if self.num_parents > self.population_size:
            _fail(f"num_parents = {self.num_parents}: must be <= population_size ({self.population_size})")
        _require_int("max_crossover_tries", self.max_crossover_tries, 1, " (the released code uses 20)")
        _require_int("max_mutation_tries", self.max_mutation_tries, 1)
        _require_int("seed", self.seed, 0)
        _require_choice("mode", self.mode, MODES)
        if isinstance(self.init_seeds, str):
            self.init_seeds = (self.init_seeds,)
        self.init_seeds = tuple(self.init_seeds)
        if not all(isinstance(name, str) and name for name in self.init_seeds):
            _fail(f"init_seeds = {list(self.init_seeds)!r}: must be seed names (e.g. ['yarn']) or empty for all")
        _require_int("num_samples", self.num_samples, 1, " (the paper uses 5)")
        _require_choice("stop_rule", self.stop_rule, STOP_RULES)
        _require_choice("nll_floor", self.nll_floor, NLL_FLOORS)
        _require_number("floor_margin", self.floor_margin, 0.0, 1.0, " (1 trusts the best NLL seen per sample)")
        _require_number("race_z", self.race_z, 0.0, hint=" (3 means a 0.13% one-sided risk per stop)")
        _require_number("race_tolerance", self.race_tolerance, 0.0, hint=" (log-perplexity; 0.001 is 0.1%)")
        _require_int("race_window", self.race_window, 8)
        _require_int("elite_size", self.elite_size, 0, " (0 = num_parents)")
        _require_number("mutation_sigma", self.mutation_sigma, 0.0, hint=" (0 = the paper's mutation)")
        if not isinstance(self.adapt_sigma, bool):
            _fail(f"adapt_sigma = {self.adapt_sigma!r}: must be true or false")
        if not isinstance(self.seeds_only_start, bool):
            _fail(f"seeds_only_start = {self.seeds_only_start!r}: must be true or false")
        _require_int("wave_size", self.wave_size, 0, " (0 = a whole generation at once, as the paper)")

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain JSON types (what :meth:`EvolutionSearch.state_dict` records)."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class Candidate:
    """One individual: rescale factors (one per frequency pair, non-decreasing), start tokens n and mscale.

    ``mscale`` None means "the caller's policy" (e.g. LongRoPE's ``su`` formula). ``critical_dim`` (longrope2) and
    ``piece_bounds`` (piecewise: alpha, beta) describe how the factors were built; they are not part of the key,
    which identifies what the model sees.
    """

    factors: tuple[float, ...]
    start_tokens: int = 0
    mscale: float | None = None
    critical_dim: int | None = None
    piece_bounds: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        try:
            factors = tuple(float(f) for f in self.factors)
        except (TypeError, ValueError):
            _fail(f"factors = {self.factors!r}: must be a list of numbers")
        object.__setattr__(self, "factors", factors)
        if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
            _fail("factors: must be a non-empty list of finite positive numbers")
        for index in range(1, len(factors)):
            if factors[index] < factors[index - 1] - 1e-9:
                _fail(
                    f"factors[{index}] = {factors[index]} < factors[{index - 1}] = {factors[index - 1]}: "
                    "rescale factors must be non-decreasing"
                )
        _require_int("start_tokens", self.start_tokens, 0)
        object.__setattr__(self, "start_tokens", int(self.start_tokens))
        if self.mscale is not None:
            _require_number("mscale", self.mscale, 1e-9)
            object.__setattr__(self, "mscale", float(self.mscale))
        if self.critical_dim is not None:
            if not _is_int(self.critical_dim) or not 0 < self.critical_dim < len(factors):
                _fail(f"critical_dim = {self.critical_dim!r}: must be an integer in [1, {len(factors) - 1}]")
            object.__setattr__(self, "critical_dim", int(self.critical_dim))
        if self.piece_bounds is not None:
            bounds = tuple(self.piece_bounds)
            if len(bounds) != 2 or not all(_is_int(b) for b in bounds) or not -1 <= bounds[0] < bounds[1]:
                _fail(f"piece_bounds = {self.piece_bounds!r}: must be two integers -1 <= alpha < beta")
            if bounds[1] > len(factors) - 1:
                _fail(f"piece_bounds = {self.piece_bounds!r}: beta must be <= {len(factors) - 1}")
            object.__setattr__(self, "piece_bounds", (int(bounds[0]), int(bounds[1])))

    @cached_property
    def key(self) -> str:
        """Identity for de-duplication and ``tell``: start tokens, mscale and factors rounded to 1e-6."""
        mscale = "-" if self.mscale is None else repr(round(self.mscale, _KEY_DECIMALS))
        factors = ",".join(repr(round(f, _KEY_DECIMALS)) for f in self.factors)
        return f"n={self.start_tokens};m={mscale};f={factors}"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; :meth:`from_dict` inverts it exactly."""
        return {
            "factors": list(self.factors),
            "start_tokens": self.start_tokens,
            "mscale": self.mscale,
            "critical_dim": self.critical_dim,
            "piece_bounds": None if self.piece_bounds is None else list(self.piece_bounds),
        }

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> Candidate:
        bounds = payload.get("piece_bounds")
        return cls(
            factors=tuple(payload["factors"]),
            start_tokens=payload.get("start_tokens", 0),
            mscale=payload.get("mscale"),
            critical_dim=payload.get("critical_dim"),
            piece_bounds=None if bounds is None else tuple(bounds),
        )


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
class _Record:
    candidate: Candidate
    generation: int
    origin: str
    status: str = "pending"
    fitness: float = math.inf
    sample_nll: tuple[float, ...] | None = None
    sample_units: int = 0


@dataclass
class _StopState:
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
    def from_dict(cls, payload: Mapping[str, Any]) -> _StopState:
        threshold = payload.get("threshold")
        return cls(
            threshold=math.inf if threshold is None else float(threshold),
            floors=[float(x) for x in payload.get("floors", [])],
            weights=None if payload.get("weights") is None else [[float(x) for x in w] for w in payload["weights"]],
            sigma=None if payload.get("sigma") is None else [float(x) for x in payload["sigma"]],
            best=math.inf if payload.get("best") is None else float(payload["best"]),
        )


def fitness_from_sample_nll(sample_nll: Sequence[float]) -> float:
    """Perplexity from per-sample mean NLLs (nats per token): ``exp(mean)``; inf if any value is not finite."""
    values = [float(x) for x in sample_nll]
    if not values or not all(math.isfinite(x) for x in values):
        return math.inf
    return _exp(sum(values) / len(values))


def _exp(log_value: float) -> float:
    return math.exp(log_value) if log_value < _MAX_LOG_PPL else math.inf


def _log(value: float) -> float:
    return math.log(value) if value > 0 else -math.inf


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
            _fail(f"config = {config!r}: must be an EvolutionConfig")
        self.config = config
        self.space = config.space
        self._rng = np.random.Generator(np.random.PCG64(config.seed))
        self._records: list[_Record] = []
        self._by_key: dict[str, int] = {}
        self._pending: list[int] = []
        self._generation = -1
        self._wave = 0
        self._wave_start = 0
        self._sigma = float(config.mutation_sigma)
        self._stop = _StopState()
        if not isinstance(seeds, Mapping):
            _fail("seeds: must be a mapping of name -> Candidate")
        self._seeds: dict[str, Candidate] = {}
        for name, seed in seeds.items():
            if not isinstance(name, str) or not name:
                _fail(f"seeds: the name {name!r} must be a non-empty string")
            if not isinstance(seed, Candidate):
                _fail(f"seeds[{name!r}]: must be a Candidate, got {type(seed).__name__}")
            self._seeds[name] = self.project(seed, label=f"seeds[{name!r}]")
        missing = [name for name in config.init_seeds if name not in self._seeds]
        if missing:
            _fail(f"init_seeds: {', '.join(missing)} not among the seeds given ({', '.join(self._seeds) or 'none'})")
        if not self._seed_names() and self.space.variant != "longrope2":
            _fail("seeds: give at least one initial individual (e.g. the PI, NTK and YaRN factors)")

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
        return [self._evaluation(i) for i, r in enumerate(self._records) if r.status != "pending"]

    @property
    def best(self) -> Evaluation | None:
        """The complete evaluation with the lowest fitness (ties: the earliest created), or None."""
        ranked = self._ranked(lambda record: True)
        return self._evaluation(ranked[0]) if ranked else None

    @property
    def sample_units(self) -> int:
        """Samples scored so far over all candidates (multiply by tokens per sample for evaluated tokens)."""
        return sum(record.sample_units for record in self._records)

    def parents(self) -> list[Evaluation]:
        """The current top-k (``num_parents``; fast mode: ``elite_size``) evaluations that may breed, best first:
        complete ones and, in fast mode, estimated ones (never stopped ones)."""
        return [self._evaluation(i) for i in self._parent_indices()]

    def stop_threshold(self) -> float:
        """Fast mode: the k-th best fitness (complete or estimated) when this wave was created, or the worst
        finite one while fewer than k are known; inf in paper mode and before anything is scored."""
        return self._stop.threshold

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
            _fail("tell: results must be a mapping of candidate key -> fitness or per-sample NLL list")
        updates: list[tuple[int, _Record]] = []
        for key, value in results.items():
            index = self._by_key.get(key)
            if index is None or self._records[index].status != "pending":
                state = "was already told" if index is not None else "was never asked"
                _fail(f"tell: candidate {str(key)[:80]}... {state}; tell only keys returned by the current ask()")
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
            _fail("should_continue: the candidate is not pending; ask() for the current generation first")
        values = [float(x) for x in sample_nll]
        if len(values) >= self.config.num_samples or not all(math.isfinite(x) for x in values):
            return False
        if self.config.mode == "paper" or not values:
            return True
        return self._stop_decision(values) is None

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
            "records": [self._record_to_dict(record) for record in self._records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict`; the configuration (except ``num_generations``, which may be raised to
        extend a run) and the seeds must be the ones that produced it."""
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            _fail(f"state: not a search state of format {STATE_FORMAT!r}; pass the JSON written by state_dict()")
        # num_generations may grow: the random stream does not depend on it, so a 40-generation run extended to
        # 60 equals a 60-generation run.
        saved_config = state.get("config")
        if not isinstance(saved_config, Mapping):
            _fail("state: the search state has no config; pass the JSON written by state_dict()")
        current = {**self.config.to_dict(), "num_generations": None}
        differing = _dict_differences(current, {**saved_config, "num_generations": None})
        if differing:
            _fail(
                f"state: saved with a different config (differs in: {', '.join(differing)}); resume with the config"
                " that produced it or start a new run"
            )
        seed_keys = {name: seed.key for name, seed in self._seeds.items()}
        saved_seeds = state.get("seeds", {})
        if seed_keys != saved_seeds:
            names = sorted(n for n in set(seed_keys) | set(saved_seeds) if seed_keys.get(n) != saved_seeds.get(n))
            _fail(f"state: saved with different seeds ({', '.join(names)}); resume with the seeds of that run")
        try:
            records = [self._record_from_dict(payload) for payload in state["records"]]
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = state["rng"]
            generation = int(state["generation"])
            wave = int(state.get("wave", 0))
            wave_start = int(state.get("wave_start", 0))
            sigma = float(state.get("sigma", self.config.mutation_sigma))
            stop = _StopState.from_dict(state["stop"])
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
        space = self.space
        n = space.num_factors
        if len(candidate.factors) != n:
            _fail(f"{label}: has {len(candidate.factors)} factors, expected {n} (rotary_dim / 2)")
        raw = np.asarray(candidate.factors) / space.factor_step
        grid = np.rint(raw).astype(np.int64)
        outside = np.flatnonzero((raw < space.grid_min - 0.5) | (raw > space.grid_max + 0.5))
        if outside.size:
            i = int(outside[0])
            _fail(
                f"{label}: factor {i} = {candidate.factors[i]} is outside [factor_min, factor_max] = "
                f"[{space.factor_min}, {space.factor_max}]; widen the bounds or fix the seed"
            )
        grid = np.clip(grid, space.grid_min, space.grid_max)
        start_tokens = candidate.start_tokens
        if space.variant == "lambda_start" and start_tokens not in space.start_token_choices:
            _fail(f"{label}: start_tokens = {start_tokens} is not in start_token_choices; add it or change the seed")
        mscale = candidate.mscale
        if space.search_mscale:
            if mscale is None:
                _fail(f"{label}: mscale is None but search_mscale is on; give each seed its mscale (e.g. su value)")
            if not space.mscale_min - space.mscale_step / 2 <= mscale <= space.mscale_max + space.mscale_step / 2:
                _fail(f"{label}: mscale = {mscale} is outside [mscale_min, mscale_max]; widen them or fix the seed")
            mscale = self._mscale_value(self._mscale_units(mscale))
        critical_dim, piece_bounds = candidate.critical_dim, candidate.piece_bounds
        if space.variant == "piecewise":
            piece_bounds = piece_bounds or self._infer_piece_bounds(grid)
            one = self._piece_one
            if grid[piece_bounds[0] + 1 :].min() < one:
                _fail(f"{label}: the piecewise variant needs factors >= 1 after alpha; fix the seed")
            grid = self._piecewise_layout(grid, piece_bounds)
        elif space.variant == "longrope2" and critical_dim is not None:
            if grid[critical_dim:].min() < space.grid_scale:
                _fail(f"{label}: factors from critical_dim {critical_dim} on must be >= scale ({space.scale})")
            grid = self._ntk_fill(grid, critical_dim)
        return self._candidate(grid, start_tokens, mscale, critical_dim, piece_bounds)

    def mutate(self, parent: Candidate) -> Candidate:
        """One mutation of ``parent`` under the monotone constraint (may equal the parent; no de-duplication).

        Each searched factor is redrawn with probability ``mutation_prob``, uniformly on the grid between its
        (already updated) left neighbour and its right neighbour, as the released code does; the structure genes
        of the variant, the start tokens and the mscale mutate with the same probability.
        """
        space, p = self.space, self.config.mutation_prob
        grid = self._units(parent)
        critical_dim, piece_bounds = parent.critical_dim, parent.piece_bounds
        if space.variant == "piecewise":
            piece_bounds = self._mutate_piece_bounds(piece_bounds or self._infer_piece_bounds(grid))
            grid = self._piecewise_layout(grid, piece_bounds)
            alpha, beta = piece_bounds
            self._change_genes(grid, alpha + 1, beta, self._piece_one, self._piece_ceiling(beta))
        elif space.variant == "longrope2" and critical_dim is not None:
            self._change_genes(grid, critical_dim, space.num_factors - 1, space.grid_scale, space.grid_max)
            grid = self._ntk_fill(grid, critical_dim)
        else:
            self._change_genes(grid, 0, space.num_factors - 1, space.grid_min, space.grid_max)
        start_tokens = parent.start_tokens
        if space.variant == "lambda_start" and self._rng.random() < p:
            start_tokens = self.mutate_start_tokens(start_tokens)
        mscale = parent.mscale
        if space.search_mscale and self._rng.random() < p:
            mscale = self.mutate_mscale(mscale)
        return self._candidate(grid, start_tokens, mscale, critical_dim, piece_bounds)

    def mutate_start_tokens(self, start_tokens: int) -> int:
        """A new start-token count drawn uniformly from the allowed set, other than the current one."""
        choices = [n for n in self.space.start_token_choices if n != start_tokens] or [start_tokens]
        return int(choices[self._rng.integers(len(choices))])

    def mutate_mscale(self, mscale: float | None) -> float:
        """A new mscale drawn uniformly on its grid within ``mscale_radius`` of the current one, inside the bounds."""
        space = self.space
        low_units, high_units = self._mscale_units(space.mscale_min), self._mscale_units(space.mscale_max)
        centre = self._mscale_units(mscale if mscale is not None else space.mscale_min)
        radius = max(1, round(space.mscale_radius / space.mscale_step))
        low, high = max(low_units, centre - radius), min(high_units, centre + radius)
        return self._mscale_value(int(self._rng.integers(low, high + 1)))

    def crossover(
        self, parent1: Candidate, parent2: Candidate, exclude: frozenset[str] | set[str] = frozenset()
    ) -> Candidate | None:
        """A child of two parents under the monotone constraint, or None after ``max_crossover_tries`` failures.

        Each gene comes from ``parent2`` with probability ``mutation_prob / 2`` (as the released code), the rest
        from ``parent1``. A try fails when the child breaks the constraint or the bounds, equals a parent, or its
        key is in ``exclude``.
        """
        space, half_p = self.space, self.config.mutation_prob / 2
        first, second = self._units(parent1), self._units(parent2)
        for _ in range(self.config.max_crossover_tries):
            take = self._rng.random(space.num_factors) < half_p
            grid = np.where(take, second, first)
            critical_dim, piece_bounds = parent1.critical_dim, parent1.piece_bounds
            if space.variant == "piecewise":
                bounds1 = parent1.piece_bounds or self._infer_piece_bounds(first)
                bounds2 = parent2.piece_bounds or self._infer_piece_bounds(second)
                alpha = bounds2[0] if self._rng.random() < half_p else bounds1[0]
                beta = bounds2[1] if self._rng.random() < half_p else bounds1[1]
                if alpha >= beta:
                    continue
                piece_bounds = (alpha, beta)
                grid = self._piecewise_layout(grid, piece_bounds, clip=False)
            elif space.variant == "longrope2" and critical_dim is not None:
                if grid[critical_dim:].min() < space.grid_scale:
                    continue
                grid = self._ntk_fill(grid, critical_dim)
            start_tokens = parent1.start_tokens
            if space.variant == "lambda_start" and self._rng.random() < half_p:
                start_tokens = parent2.start_tokens
            mscale = parent1.mscale
            if space.search_mscale and self._rng.random() < half_p:
                mscale = parent2.mscale
            if np.any(np.diff(grid) < 0) or grid.min() < space.grid_min or grid.max() > space.grid_max:
                continue
            child = self._candidate(grid, start_tokens, mscale, critical_dim, piece_bounds)
            if child.key in exclude or child.key in (parent1.key, parent2.key):
                continue
            return child
        return None

    def ntk_fill(self, critical_dim: int, value: float) -> tuple[float, ...]:
        """LongRoPE2's fill below the critical dimension: ``value ** (i / critical_dim)`` on the grid, i < d_rcd.

        That is NTK-aware scaling with the base chosen so that its factor at ``critical_dim`` equals ``value``, the
        first searched factor, so the curve is continuous there.
        """
        grid = np.zeros(self.space.num_factors, dtype=np.int64)
        grid[critical_dim:] = round(value / self.space.factor_step)
        return tuple(float(x) for x in self._factor_values(self._ntk_fill(grid, critical_dim)[:critical_dim]))

    def critical_init(self, critical_dim: int) -> Candidate:
        """LongRoPE2's initial individual for one critical dimension: dims >= d_rcd all equal a value drawn
        uniformly on the grid in [scale, 2 * scale] (clipped to factor_max), dims below NTK-filled."""
        space = self.space
        high = min(space.grid_max, round(2 * space.scale / space.factor_step))
        value = int(self._rng.integers(space.grid_scale, max(space.grid_scale, high) + 1))
        grid = np.full(space.num_factors, value, dtype=np.int64)
        grid = self._ntk_fill(grid, critical_dim)
        mscale = self._default_mscale()
        return self._candidate(grid, 0, mscale, critical_dim, None)

    # ------------------------------------------------------------------ generations

    def _seed_names(self) -> list[str]:
        return list(self.config.init_seeds) or list(self._seeds)

    def _last_wave(self, generation: int) -> int:
        return self.waves_per_generation - 1 if generation >= 1 else 0

    def _advance(self) -> None:
        self._adapt_sigma()
        if self._wave < self._last_wave(self._generation):
            self._wave += 1
        else:
            self._generation += 1
            self._wave = 0
        self._stop = self._freeze_stop_state()
        self._wave_start = len(self._records)
        taken = set(self._by_key)
        offspring = self._initial_population(taken) if self._generation == 0 else self._offspring(taken)
        for candidate, origin in offspring:
            self._by_key[candidate.key] = len(self._records)
            self._pending.append(len(self._records))
            self._records.append(_Record(candidate, self._generation, origin))

    def _adapt_sigma(self) -> None:
        """After a wave of children (not the seeds): the 1/5 success rule on the share that entered the elite, i.e.
        beat the threshold the wave was raced against (a stopped child never did)."""
        config = self.config
        if config.mode != "fast" or config.mutation_sigma <= 0 or not config.adapt_sigma or self._generation < 1:
            return
        wave = self._records[self._wave_start :]
        if not wave or not math.isfinite(self._stop.threshold):
            return
        entered = sum(r.status != "stopped" and r.fitness < self._stop.threshold for r in wave) / len(wave)
        self._sigma = min(_SIGMA_BOUNDS[1], max(_SIGMA_BOUNDS[0], self._sigma * math.exp(entered - _TARGET_SUCCESS)))

    @property
    def mutation_step(self) -> float:
        """Fast mode's current mutation step (log-normal sigma): ``mutation_sigma`` adapted by the 1/5 success rule
        after every wave when ``adapt_sigma``."""
        return self._sigma

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
        if self.space.variant == "longrope2":
            for critical_dim in range(self.space.critical_dim_min, self.space.critical_dim_max + 1):
                add(self.critical_init(critical_dim), f"critical-init:{critical_dim}")
        bases = [candidate for candidate, _ in members if self._may_breed(candidate)]
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

    def _may_breed(self, candidate: Candidate) -> bool:
        # A longrope2 child is defined relative to its critical dimension; a plain seed (PI/NTK/YaRN) has none
        # and is evaluated only as a baseline.
        return self.space.variant != "longrope2" or candidate.critical_dim is not None

    def _ranked(self, keep, statuses=("complete",)) -> list[int]:
        chosen = [i for i, r in enumerate(self._records) if r.status in statuses and keep(r)]
        return sorted(chosen, key=lambda i: (self._records[i].fitness, i))

    def _parent_indices(self) -> list[int]:
        ranked = self._ranked(lambda record: self._may_breed(record.candidate), ("complete", "estimated"))
        return ranked[: self._num_parents]

    @property
    def _num_parents(self) -> int:
        if self.config.mode == "fast" and self.config.elite_size:
            return self.config.elite_size
        return self.config.num_parents

    # ------------------------------------------------------------------ fast mode

    def _freeze_stop_state(self) -> _StopState:
        if self.config.mode != "fast":
            return _StopState()
        n = self.config.num_samples
        ranked = self._ranked(lambda record: True, ("complete", "estimated"))
        k = self._num_parents
        threshold = self._records[ranked[k - 1]].fitness if len(ranked) >= k else math.inf
        if not math.isfinite(threshold) and ranked:
            # Fewer than k known: nothing can be stopped for missing the top-k, but a child worse than every known
            # candidate is no use as a parent either.
            threshold = max(
                (self._records[i].fitness for i in ranked if math.isfinite(self._records[i].fitness)), default=math.inf
            )
        complete = self._ranked(lambda record: True)
        best = self._records[complete[0]].fitness if complete else math.inf
        floors = [0.0] * n
        if self.config.nll_floor == "observed":
            for j in range(n):
                seen = [r.sample_nll[j] for r in self._records if r.sample_nll is not None and len(r.sample_nll) > j]
                floors[j] = max(0.0, min(seen) * self.config.floor_margin) if seen else 0.0
        weights, sigma = None, None
        if self.config.stop_rule == "race" and n >= 2 and math.isfinite(threshold):
            weights, sigma = self._calibrate_prediction()
        return _StopState(threshold, floors, weights, sigma, best)

    def _calibrate_prediction(self) -> tuple[list[list[float]], list[float]]:
        """Least-squares predictors of the full mean NLL from the first m samples, m = 1..N-1, and their RMS error,
        fitted on the most recent fully scored candidates (those resemble the children being scored now)."""
        n = self.config.num_samples
        recent = [
            r.sample_nll
            for r in self._records
            if r.status == "complete" and r.sample_nll is not None and len(r.sample_nll) == n
        ][-self.config.race_window :]
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

    def _stop_decision(self, values: Sequence[float]) -> tuple[str, float] | None:
        """(status, log-fitness) that ends a candidate after these samples, or None to score the next one."""
        stop = self._stop
        if not math.isfinite(stop.threshold):
            return None
        n, m = self.config.num_samples, len(values)
        limit = _log(stop.threshold)
        bound = (sum(values) + sum(stop.floors[m:])) / n
        if bound > limit:
            return "stopped", bound
        if stop.weights is not None and stop.sigma is not None and m <= len(stop.weights):
            weights = stop.weights[m - 1]
            predicted = weights[0] + sum(w * x for w, x in zip(weights[1:], values))
            bar = self.config.race_z * stop.sigma[m - 1]
            tolerance = self.config.race_tolerance
            if predicted - bar > limit - tolerance:
                return "stopped", predicted - bar
            if predicted + bar < limit + tolerance and predicted - bar > _log(stop.best) - tolerance:
                return "estimated", predicted
        return None

    def _scored(self, record: _Record, value: Any) -> _Record:
        n = self.config.num_samples
        if _is_number(value):
            fitness = float(value)
            return self._told(record, "complete", fitness if math.isfinite(fitness) else math.inf, None, n)
        if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
            _fail(f"tell: value {value!r} must be a fitness number or a list of per-sample NLLs")
        if not all(_is_number(x) for x in value) or not 1 <= len(value) <= n:
            _fail(f"tell: a per-sample NLL list must hold 1..{n} numbers (num_samples), got {list(value)!r}")
        values = tuple(float(x) for x in value)
        first_bad = next((i for i, x in enumerate(values) if not math.isfinite(x)), len(values))
        if self.config.mode == "fast":
            # Cut at the first point where should_continue() said stop, so scoring more changes nothing.
            for m in range(1, min(first_bad, n - 1) + 1):
                decision = self._stop_decision(values[:m])
                if decision is not None:
                    return self._told(record, decision[0], _exp(decision[1]), values[:m], len(values))
        if first_bad < len(values):
            return self._told(record, "complete", math.inf, values[:first_bad], len(values))
        if len(values) < n:
            _fail(f"tell: {len(values)} of {n} samples scored but should_continue() says continue; score all samples")
        return self._told(record, "complete", fitness_from_sample_nll(values), values, len(values))

    @staticmethod
    def _told(record: _Record, status: str, fitness: float, sample_nll, units: int) -> _Record:
        return _Record(record.candidate, record.generation, record.origin, status, fitness, sample_nll, units)

    # ------------------------------------------------------------------ grid helpers

    @property
    def _piece_one(self) -> int:
        return max(self.space.grid_min, round(1.0 / self.space.factor_step))

    def _piece_ceiling(self, beta: int) -> int:
        # Dims after beta sit at the scale, so the searched ones may not exceed it; with none after, factor_max.
        return self.space.grid_scale if beta < self.space.num_factors - 1 else self.space.grid_max

    def _units(self, candidate: Candidate) -> np.ndarray:
        return np.rint(np.asarray(candidate.factors) / self.space.factor_step).astype(np.int64)

    def _factor_values(self, grid: np.ndarray) -> list[float]:
        return [round(int(k) * self.space.factor_step, _KEY_DECIMALS + 2) for k in grid]

    def _candidate(
        self,
        grid: np.ndarray,
        start_tokens: int,
        mscale: float | None,
        critical_dim: int | None,
        piece_bounds: tuple[int, int] | None,
    ) -> Candidate:
        return Candidate(tuple(self._factor_values(grid)), int(start_tokens), mscale, critical_dim, piece_bounds)

    def _mscale_units(self, mscale: float) -> int:
        return round(mscale / self.space.mscale_step)

    def _mscale_value(self, units: int) -> float:
        return round(units * self.space.mscale_step, _KEY_DECIMALS + 2)

    def _default_mscale(self) -> float | None:
        # A longrope2 initial individual inherits the mscale of the first seed (None: the caller's policy).
        names = self._seed_names()
        if names:
            return self._seeds[names[0]].mscale
        return self._mscale_value(self._mscale_units(self.space.mscale_min)) if self.space.search_mscale else None

    def _change_genes(self, grid: np.ndarray, first: int, last: int, low: int, high: int) -> None:
        if self.config.mode == "fast" and self.config.mutation_sigma > 0:
            self._perturb_genes(grid, first, last, low, high)
        else:
            self._mutate_genes(grid, first, last, low, high)

    def _perturb_genes(self, grid: np.ndarray, first: int, last: int, low: int, high: int) -> None:
        # Multiplicative steps around the parent, sized by the adapted sigma (the paper redraws a gene anywhere
        # between its neighbours, which near a good curve is almost always a step back); sorting restores the
        # monotone constraint.
        p, sigma = self.config.mutation_prob, self._sigma
        for i in range(first, last + 1):
            if self._rng.random() < p:
                moved = int(np.rint(grid[i] * math.exp(sigma * self._rng.standard_normal())))
                if moved == grid[i]:
                    moved += 1 if self._rng.random() < 0.5 else -1
                grid[i] = moved
        grid[first : last + 1] = np.sort(np.clip(grid[first : last + 1], low, high))

    def _mutate_genes(self, grid: np.ndarray, first: int, last: int, low: int, high: int) -> None:
        p = self.config.mutation_prob
        for i in range(first, last + 1):
            if self._rng.random() < p:
                left = grid[i - 1] if i > first else low
                right = grid[i + 1] if i < last else high
                if right >= left:
                    grid[i] = self._rng.integers(left, right + 1)

    def _ntk_fill(self, grid: np.ndarray, critical_dim: int) -> np.ndarray:
        filled = grid.copy()
        anchor = grid[critical_dim] * self.space.factor_step
        exponents = np.arange(critical_dim) / critical_dim
        filled[:critical_dim] = np.rint(anchor**exponents / self.space.factor_step).astype(np.int64)
        filled[:critical_dim] = np.clip(filled[:critical_dim], self.space.grid_min, grid[critical_dim])
        return filled

    def _infer_piece_bounds(self, grid: np.ndarray) -> tuple[int, int]:
        n, one, top = len(grid), self._piece_one, self.space.grid_scale
        alpha = -1
        while alpha + 1 < n - 1 and grid[alpha + 1] <= one:
            alpha += 1
        first_top = n
        while first_top - 1 > alpha + 1 and grid[first_top - 1] == top:
            first_top -= 1
        return alpha, max(alpha + 1, first_top - 1)

    def _piecewise_layout(self, grid: np.ndarray, bounds: tuple[int, int], clip: bool = True) -> np.ndarray:
        alpha, beta = bounds
        laid = grid.copy()
        laid[: alpha + 1] = self._piece_one
        laid[beta + 1 :] = self.space.grid_scale
        if clip:
            laid[alpha + 1 : beta + 1] = np.clip(
                laid[alpha + 1 : beta + 1], self._piece_one, self._piece_ceiling(beta)
            )
        return laid

    def _mutate_piece_bounds(self, bounds: tuple[int, int]) -> tuple[int, int]:
        alpha, beta = bounds
        radius, p = self.space.piece_radius, self.config.mutation_prob
        if self._rng.random() < p:
            alpha = int(self._rng.integers(max(-1, alpha - radius), min(beta - 1, alpha + radius) + 1))
        if self._rng.random() < p:
            top = self.space.num_factors - 1
            beta = int(self._rng.integers(max(alpha + 1, beta - radius), min(top, beta + radius) + 1))
        return alpha, beta

    # ------------------------------------------------------------------ records

    def _evaluation(self, index: int) -> Evaluation:
        record = self._records[index]
        return Evaluation(
            record.candidate,
            record.generation,
            record.origin,
            record.status,
            record.fitness,
            record.sample_nll,
            record.sample_units,
            index,
        )

    @staticmethod
    def _record_to_dict(record: _Record) -> dict[str, Any]:
        return {
            "candidate": record.candidate.to_dict(),
            "generation": record.generation,
            "origin": record.origin,
            "status": record.status,
            "fitness": record.fitness if math.isfinite(record.fitness) else None,
            "sample_nll": None if record.sample_nll is None else list(record.sample_nll),
            "sample_units": record.sample_units,
        }

    @staticmethod
    def _record_from_dict(payload: Mapping[str, Any]) -> _Record:
        fitness = payload["fitness"]
        sample_nll = payload["sample_nll"]
        return _Record(
            Candidate.from_dict(payload["candidate"]),
            int(payload["generation"]),
            str(payload["origin"]),
            str(payload["status"]),
            math.inf if fitness is None else float(fitness),
            None if sample_nll is None else tuple(float(x) for x in sample_nll),
            int(payload["sample_units"]),
        )


def _dict_differences(current: Mapping[str, Any], saved: Mapping[str, Any], prefix: str = "") -> list[str]:
    differing = []
    for key in sorted(set(current) | set(saved)):
        here, there = current.get(key), saved.get(key)
        if isinstance(here, Mapping) and isinstance(there, Mapping):
            differing.extend(_dict_differences(here, there, f"{prefix}{key}."))
        elif here != there:
            differing.append(f"{prefix}{key}")
    return differing
