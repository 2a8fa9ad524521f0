"""The search space and its points: what a candidate may be (:class:`SearchSpaceConfig`, one of the variants listed
in :mod:`longrope.evolution`), a candidate itself (:class:`Candidate`) and the conversions between factors and the
integer grid the operators (:mod:`longrope.evolution.variants`) work on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from longrope.evolution.checks import fail, is_int, require_choice, require_int, require_number

PAPER_START_TOKENS: tuple[int, ...] = (0, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 64, 128, 256)
VARIANTS: tuple[str, ...] = ("lambda", "lambda_start", "piecewise", "longrope2")

# Keys identify factors to 1e-6; the search snaps everything to its grid (>= 1e-4) first, so a key is a grid point.
_KEY_DECIMALS = 6
_MIN_STEP = 1e-4


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
        require_int("rotary_dim", self.rotary_dim, 2, " (head_dim * partial_rotary_factor)")
        if self.rotary_dim % 2:
            fail(f"rotary_dim = {self.rotary_dim}: must be even (one rescale factor per pair of channels)")
        require_choice("variant", self.variant, VARIANTS)
        for name in ("original_max_position_embeddings", "max_position_embeddings"):
            value = getattr(self, name)
            if value is not None:
                require_int(name, value, 1)
        lengths = (self.original_max_position_embeddings, self.max_position_embeddings)
        if self.scale is None:
            if None in lengths:
                fail("scale: give scale, or both original_max_position_embeddings and max_position_embeddings")
            self.scale = lengths[1] / lengths[0]
        require_number("scale", self.scale, 1e-6, hint=" (target length / original length)")
        self.scale = float(self.scale)
        if None not in lengths and not math.isclose(self.scale, lengths[1] / lengths[0], rel_tol=1e-6):
            fail(
                f"scale = {self.scale}: differs from max_position_embeddings / original_max_position_embeddings"
                f" = {lengths[1] / lengths[0]}; drop scale or fix the lengths"
            )
        require_number("factor_step", self.factor_step, _MIN_STEP, hint=" (the paper uses 0.01)")
        require_number("factor_min", self.factor_min, 1e-6, hint=" (1.0 = extrapolation)")
        if self.factor_max is None:
            self.factor_max = (2.0 if self.variant == "longrope2" else 1.25) * self.scale
        require_number("factor_max", self.factor_max, 1e-6)
        self.factor_step, self.factor_min, self.factor_max = (
            float(self.factor_step),
            float(self.factor_min),
            float(self.factor_max),
        )
        if self.grid_min > self.grid_max:
            fail(
                f"factor_max = {self.factor_max}: the range [factor_min, factor_max] = [{self.factor_min}, "
                f"{self.factor_max}] holds no point of the {self.factor_step} grid; raise factor_max"
            )
        choices = tuple(self.start_token_choices)
        if not choices or not all(is_int(n) and n >= 0 for n in choices) or len(set(choices)) != len(choices):
            fail(f"start_token_choices = {list(choices)!r}: must be distinct integers >= 0, at least one")
        self.start_token_choices = tuple(sorted(int(n) for n in choices))
        if not isinstance(self.search_mscale, bool):
            fail(f"search_mscale = {self.search_mscale!r}: must be true or false")
        require_number("mscale_step", self.mscale_step, _MIN_STEP)
        require_number("mscale_min", self.mscale_min, 1e-6)
        require_number("mscale_max", self.mscale_max, self.mscale_min, hint=" (and >= mscale_min)")
        require_number("mscale_radius", self.mscale_radius, self.mscale_step, hint=" (and >= mscale_step)")
        require_int("piece_radius", self.piece_radius, 1)
        if self.variant == "piecewise":
            if self.num_factors < 2:
                fail(f"rotary_dim = {self.rotary_dim}: the piecewise variant needs at least 2 factors")
            if not (self.factor_min <= 1.0 <= self.scale <= self.factor_max):
                fail(
                    f"factor_min/factor_max = [{self.factor_min}, {self.factor_max}]: the piecewise variant needs "
                    f"factor_min <= 1 <= scale ({self.scale}) <= factor_max"
                )
        if self.variant == "longrope2":
            self._validate_longrope2()

    def _validate_longrope2(self) -> None:
        if self.rope_theta is None:
            fail("rope_theta: the longrope2 variant needs the model's RoPE base (config.rope_theta)")
        require_number("rope_theta", self.rope_theta, 1.0 + 1e-9, hint=" (the model's RoPE base)")
        if self.original_max_position_embeddings is None:
            fail("original_max_position_embeddings: the longrope2 variant needs the pre-trained context length")
        if self.scale < 1.0:
            fail(f"scale = {self.scale}: the longrope2 variant extends the context, so scale must be >= 1")
        if not (self.factor_min <= self.scale <= self.factor_max):
            fail(
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
        require_int("critical_dim_min", self.critical_dim_min, 1)
        require_int("critical_dim_max", self.critical_dim_max, self.critical_dim_min, " (and >= critical_dim_min)")
        if self.critical_dim_max > top:
            fail(f"critical_dim_max = {self.critical_dim_max}: must be <= {top} (rotary_dim / 2 - 1)")

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
            fail(f"factors = {self.factors!r}: must be a list of numbers")
        object.__setattr__(self, "factors", factors)
        if not factors or not all(math.isfinite(f) and f > 0 for f in factors):
            fail("factors: must be a non-empty list of finite positive numbers")
        for index in range(1, len(factors)):
            if factors[index] < factors[index - 1] - 1e-9:
                fail(
                    f"factors[{index}] = {factors[index]} < factors[{index - 1}] = {factors[index - 1]}: "
                    "rescale factors must be non-decreasing"
                )
        require_int("start_tokens", self.start_tokens, 0)
        object.__setattr__(self, "start_tokens", int(self.start_tokens))
        if self.mscale is not None:
            require_number("mscale", self.mscale, 1e-9)
            object.__setattr__(self, "mscale", float(self.mscale))
        if self.critical_dim is not None:
            if not is_int(self.critical_dim) or not 0 < self.critical_dim < len(factors):
                fail(f"critical_dim = {self.critical_dim!r}: must be an integer in [1, {len(factors) - 1}]")
            object.__setattr__(self, "critical_dim", int(self.critical_dim))
        if self.piece_bounds is not None:
            bounds = tuple(self.piece_bounds)
            if len(bounds) != 2 or not all(is_int(b) for b in bounds) or not -1 <= bounds[0] < bounds[1]:
                fail(f"piece_bounds = {self.piece_bounds!r}: must be two integers -1 <= alpha < beta")
            if bounds[1] > len(factors) - 1:
                fail(f"piece_bounds = {self.piece_bounds!r}: beta must be <= {len(factors) - 1}")
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


def factor_units(space: SearchSpaceConfig, candidate: Candidate) -> np.ndarray:
    """The candidate's factors in grid units (factor = units * factor_step)."""
    return np.rint(np.asarray(candidate.factors) / space.factor_step).astype(np.int64)


def factor_values(space: SearchSpaceConfig, grid: np.ndarray) -> list[float]:
    """Grid units back to factors, rounded so that equal units always give equal keys."""
    return [round(int(k) * space.factor_step, _KEY_DECIMALS + 2) for k in grid]


def grid_candidate(
    space: SearchSpaceConfig,
    grid: np.ndarray,
    start_tokens: int,
    mscale: float | None,
    critical_dim: int | None,
    piece_bounds: tuple[int, int] | None,
) -> Candidate:
    """The candidate whose factors are these grid units."""
    return Candidate(tuple(factor_values(space, grid)), int(start_tokens), mscale, critical_dim, piece_bounds)


def mscale_units(space: SearchSpaceConfig, mscale: float) -> int:
    """An mscale in units of ``mscale_step``."""
    return round(mscale / space.mscale_step)


def mscale_value(space: SearchSpaceConfig, units: int) -> float:
    """An mscale from its units, rounded like the factors."""
    return round(units * space.mscale_step, _KEY_DECIMALS + 2)
