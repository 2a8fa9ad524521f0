"""RoPE rescaling methods, their registry, and the one seam that installs them into a Hugging Face model.

Vocabulary (used across the project):

- **rescale factor** λ_i: one per RoPE frequency pair (``rotary_dim // 2`` of them). Pair ``i`` rotates with
  frequency θ_i / λ_i, where θ_i is the model's own frequency (transformers' default ``inv_freq``,
  rope_theta^(-2i / rotary_dim)). λ = 1 extrapolates, λ = s is PI.
- **scale** s = target length / original (pre-training) length.
- **start tokens** n̂: positions < n̂ keep the original, un-rescaled angles (LongRoPE, arXiv 2402.13753 Eq. 3).
  As in the official ``MixedLongRoPEScaledRotaryEmbedding``, those positions use the original cos/sin without mscale.
- **mscale** (HF's ``attention_factor``): multiplies cos and sin of rescaled positions. Policies: ``su`` =
  sqrt(1 + ln s / ln L_orig), ``yarn`` = 0.1 ln s + 1, or a constant.
- **long / short factors**: the long set applies to sequences longer than the original window, the short set (if
  any) to the others. The choice is made per *sequence* from its global length (the largest position id + 1 over
  all sequence-parallel ranks), or forced with :func:`select_factors`; never from one rank's shard.
- **short mscale** (Phi-3-small's ``short_mscale``): the mscale of the short set; unset, the short set uses ``mscale``.
  A checkpoint fine-tuned long with mscale m has adapted to m, and the short set searched at the original window
  need not share the long set's m (the 64x m is larger than the one the checkpoint was trained with).

**Methods are registered once** (:func:`register_method`): the registry is the only list of methods, and the entry
points, the search seeds, config validation and the factors export all read it. The baselines (PI, NTK-aware,
dynamic NTK, YaRN) are expressed as rescale factors derived from transformers' own ``ROPE_INIT_FUNCTIONS``:
λ_i = θ_i / θ'_i where θ' is what transformers computes for that method, at full float64 precision.

**Precision**: the installed module divides transformers' fp32 base frequencies by the factors and forms the angles
position x frequency in float64 (an fp32 angle at position 2^21 is only good to about 0.12 rad), then returns cos and
sin in the model's dtype. A baseline's frequencies are therefore exactly transformers' own, and its angles exact at
any length. Stock transformers (an exported checkpoint) computes frequencies and angles in fp32: at position p its
angles differ from these by up to about p x θ_0 x 6e-8 rad (6e-5 at 1k, 0.008 at 128k, 0.12 at 2M for θ_0 = 1).

One module on purpose (about 700 lines, in sections): the methods, their registry and the installed module share the
geometry and scaling types and together are the project's one RoPE seam (DESIGN.md); a new method touches only the
registry.

Typical use::

    geometry = RopeGeometry.from_config(model.config)
    scaling = build_scaling("yarn", geometry, target_length=32768)
    install(model, scaling)            # replaces the rotary module(s) in place
    install(model, other_scaling)      # switching again reuses the installed module: no reload
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from longrope.errors import LongRopeError

MSCALE_POLICIES = ("su", "yarn", "none")
SELECTIONS = ("auto", "long", "short")


# ----------------------------------------------------------------------------------------------------------------
# Geometry and scaling descriptions (pure data)


@dataclass(frozen=True)
class RopeGeometry:
    """What a model fixes about its RoPE: base, rotated channels per head, and the pre-training window."""

    rope_theta: float
    head_dim: int
    rotary_dim: int
    original_max_position_embeddings: int

    @property
    def num_pairs(self) -> int:
        return self.rotary_dim // 2

    @classmethod
    def from_config(cls, config: Any, original_max_position_embeddings: int | None = None) -> RopeGeometry:
        """Read the geometry of a transformers config (any RoPE architecture with one global rope setting).

        ``original_max_position_embeddings`` defaults to the config's own (already-extended models such as
        Phi-3-128k keep it in ``rope_parameters``), else ``max_position_embeddings``.
        """
        params = _rope_parameters_of(config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        partial = params.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
        rotary_dim = int(head_dim * partial)
        original = (
            original_max_position_embeddings
            or params.get("original_max_position_embeddings")
            or getattr(config, "original_max_position_embeddings", None)
            or config.max_position_embeddings
        )
        theta = params.get("rope_theta") or getattr(config, "rope_theta", None)
        if theta is None:
            raise LongRopeError(f"{type(config).__name__} has no rope_theta: this model does not use RoPE")
        return cls(float(theta), int(head_dim), rotary_dim, int(original))

    def base_inv_freq(self) -> torch.Tensor:
        """θ_i exactly as transformers computes its default RoPE (fp32 values)."""
        inv_freq, _ = _transformers_inv_freq(self, {"rope_type": "linear", "factor": 1.0}, 1)
        return inv_freq


@dataclass(frozen=True)
class RopeScaling:
    """A complete, model-independent description of how positions are rotated.

    ``long_factors`` apply to sequences longer than ``geometry.original_max_position_embeddings`` and, when
    ``short_factors`` is None, to every sequence. ``mscale`` multiplies the long sequences' cos/sin and
    ``short_mscale`` the others' (None: ``mscale`` too). ``dynamic`` (dynamic NTK only) recomputes the factors from
    each sequence's length; ``long_factors`` then holds the factors at ``max_position_embeddings``.
    """

    method: str
    geometry: RopeGeometry
    max_position_embeddings: int
    long_factors: tuple[float, ...]
    short_factors: tuple[float, ...] | None = None
    start_tokens: int = 0
    mscale: float = 1.0
    mscale_policy: str = "none"
    short_mscale: float | None = None
    short_mscale_policy: str = "constant"
    dynamic: bool = False
    options: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        validate_factors(self.long_factors, self.geometry, "long_factors")
        if self.short_factors is not None:
            validate_factors(self.short_factors, self.geometry, "short_factors")
        if not isinstance(self.start_tokens, int) or self.start_tokens < 0:
            raise LongRopeError(f"start_tokens must be an integer >= 0, got {self.start_tokens!r}")
        for name in ("mscale", "short_mscale"):
            value = getattr(self, name)
            if value is None and name == "short_mscale":
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value > 0)
            ):
                raise LongRopeError(f"{name} must be a finite number > 0, got {value!r}")
        if self.dynamic and self.short_mscale is not None:
            raise LongRopeError(
                "short_mscale: dynamic NTK recomputes its factors per length and has no short set; drop short_mscale"
            )
        original = self.geometry.original_max_position_embeddings
        if self.max_position_embeddings < original:
            raise LongRopeError(
                f"max_position_embeddings {self.max_position_embeddings} is below the original window {original}: "
                "rescale factors extend a model's window; give the target length (>= the original)"
            )

    @property
    def scale(self) -> float:
        return self.max_position_embeddings / self.geometry.original_max_position_embeddings

    @property
    def short_set_mscale(self) -> float:
        """The mscale of sequences no longer than the original window."""
        return self.mscale if self.short_mscale is None else self.short_mscale

    def replace(self, **changes: Any) -> RopeScaling:
        return RopeScaling(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})


def validate_factors(factors: Sequence[float], geometry: RopeGeometry, name: str = "factors") -> None:
    if len(factors) != geometry.num_pairs:
        raise LongRopeError(
            f"{name} has {len(factors)} values but the model rotates {geometry.rotary_dim} channels per head "
            f"(head_dim {geometry.head_dim}), i.e. {geometry.num_pairs} frequency pairs: give one factor per pair"
        )
    for index, value in enumerate(factors):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise LongRopeError(f"{name}[{index}] = {value!r}: every rescale factor must be a finite number > 0")


def decreasing_steps(factors: Sequence[float], tolerance: float = 1e-6) -> list[int]:
    """Indices i where factor i is below factor i - 1: every method here is non-decreasing from the highest
    frequency pair (i = 0, interpolated least) to the lowest."""
    return [i for i in range(1, len(factors)) if factors[i] < factors[i - 1] * (1 - tolerance)]


# ----------------------------------------------------------------------------------------------------------------
# mscale


def parse_mscale(value: Any, key: str = "rope_mscale") -> str | float:
    """A config's mscale: a policy name or a constant > 0 (a numeric string becomes a number)."""
    if isinstance(value, str):
        if value in MSCALE_POLICIES:
            return value
        try:
            value = float(value)
        except ValueError:
            raise LongRopeError(f"{key}: {value!r} is not a number or one of {', '.join(MSCALE_POLICIES)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise LongRopeError(f"{key}: {value!r} must be a number > 0 or one of {', '.join(MSCALE_POLICIES)}")
    return float(value)


def resolve_mscale(
    policy: str | float | None, scale: float, original_max_position_embeddings: int
) -> tuple[float, str]:
    """Return (value, policy name). ``None`` and ``"none"`` give 1.0; a number is a constant."""
    if policy is None or policy == "none":
        return 1.0, "none"
    policy = parse_mscale(policy, key="mscale")
    if isinstance(policy, float):
        return policy, "constant"
    if policy == "su":
        value = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(original_max_position_embeddings))
        return value, "su"
    return (1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0), "yarn"


# ----------------------------------------------------------------------------------------------------------------
# Methods: pure functions returning RopeScaling


def _check_target(geometry: RopeGeometry, target_length: int, method: str) -> None:
    if isinstance(target_length, bool) or not isinstance(target_length, int):
        raise LongRopeError(f"target_length: {target_length!r} must be a number of tokens for method {method!r}")
    if target_length <= geometry.original_max_position_embeddings:
        raise LongRopeError(
            f"target_length: {target_length} must be larger than the original window "
            f"{geometry.original_max_position_embeddings} for method {method!r} (scale = target / original > 1)"
        )


def _transformers_inv_freq(
    geometry: RopeGeometry, rope_parameters: dict[str, Any], max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Ask transformers' own RoPE init function for a method's frequencies on a scratch config."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=geometry.rotary_dim,
        num_attention_heads=1,
        head_dim=geometry.rotary_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_theta": geometry.rope_theta, **rope_parameters},
    )
    # On the CPU whatever default device the caller set (a model built with `with torch.device("cuda")`).
    with torch.device("cpu"):
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq.float(), float(attention_factor)


def factors_from_inv_freq(geometry: RopeGeometry, inv_freq: torch.Tensor) -> tuple[float, ...]:
    """λ_i = θ_i / θ'_i at full (float64) precision, so that θ_i / λ_i gives back transformers' θ'_i exactly."""
    ratios = geometry.base_inv_freq().double() / inv_freq.double()
    return tuple(ratios.tolist())


def none_scaling(geometry: RopeGeometry, target_length: int | None = None, **_: Any) -> RopeScaling:
    """Plain RoPE (extrapolation): every factor 1."""
    target = max(target_length or 0, geometry.original_max_position_embeddings)
    return RopeScaling("none", geometry, target, (1.0,) * geometry.num_pairs)


def pi_scaling(geometry: RopeGeometry, target_length: int, mscale: str | float | None = None, **_: Any) -> RopeScaling:
    """Position interpolation (transformers ``linear``): λ_i = s for every pair."""
    _check_target(geometry, target_length, "pi")
    scale = target_length / geometry.original_max_position_embeddings
    inv_freq, _unused = _transformers_inv_freq(
        geometry, {"rope_type": "linear", "factor": scale}, geometry.original_max_position_embeddings
    )
    value, policy = resolve_mscale(mscale, scale, geometry.original_max_position_embeddings)
    return RopeScaling(
        "pi", geometry, target_length, factors_from_inv_freq(geometry, inv_freq), None, 0, value, policy
    )


def ntk_scaling(
    geometry: RopeGeometry, target_length: int, mscale: str | float | None = None, **_: Any
) -> RopeScaling:
    """NTK-aware scaling: base · s^(d/(d-2)).

    transformers' ``dynamic`` init at factor 1 and sequence length s·L_orig is exactly this static rule.
    """
    _check_target(geometry, target_length, "ntk")
    scale = target_length / geometry.original_max_position_embeddings
    inv_freq, _unused = _transformers_inv_freq(
        geometry, {"rope_type": "dynamic", "factor": 1.0}, geometry.original_max_position_embeddings, target_length
    )
    value, policy = resolve_mscale(mscale, scale, geometry.original_max_position_embeddings)
    return RopeScaling(
        "ntk", geometry, target_length, factors_from_inv_freq(geometry, inv_freq), None, 0, value, policy
    )


def dynamic_ntk_factors(geometry: RopeGeometry, scale: float, length: int) -> tuple[float, ...]:
    """Dynamic NTK factors for a sequence of ``length`` tokens (transformers ``dynamic`` with ``factor = scale``)."""
    if length <= geometry.original_max_position_embeddings:
        return (1.0,) * geometry.num_pairs
    inv_freq, _unused = _transformers_inv_freq(
        geometry, {"rope_type": "dynamic", "factor": scale}, geometry.original_max_position_embeddings, length
    )
    return factors_from_inv_freq(geometry, inv_freq)


def dynamic_ntk_scaling(
    geometry: RopeGeometry, target_length: int, mscale: str | float | None = None, **_: Any
) -> RopeScaling:
    """Dynamic NTK: the NTK base grows with each sequence's own length (transformers ``dynamic``).

    Unlike transformers' module, which keeps the largest length it has seen, the factors here depend only on the
    current sequence, so results do not depend on what was evaluated before.
    """
    _check_target(geometry, target_length, "dynamic_ntk")
    scale = target_length / geometry.original_max_position_embeddings
    value, policy = resolve_mscale(mscale, scale, geometry.original_max_position_embeddings)
    factors = dynamic_ntk_factors(geometry, scale, target_length)
    return RopeScaling("dynamic_ntk", geometry, target_length, factors, None, 0, value, policy, dynamic=True)


def yarn_scaling(
    geometry: RopeGeometry,
    target_length: int,
    mscale: str | float | None = "yarn",
    yarn_beta_fast: float = 32.0,
    yarn_beta_slow: float = 1.0,
    **_: Any,
) -> RopeScaling:
    """YaRN as transformers implements it (ramp linear over the pair index between the correction dims).

    The official LongRoPE search seeds Llama with beta 32/1 and Mistral with 128/2.
    """
    _check_target(geometry, target_length, "yarn")
    scale = target_length / geometry.original_max_position_embeddings
    inv_freq, _unused = _transformers_inv_freq(
        geometry,
        {
            "rope_type": "yarn",
            "factor": scale,
            "beta_fast": yarn_beta_fast,
            "beta_slow": yarn_beta_slow,
            "original_max_position_embeddings": geometry.original_max_position_embeddings,
        },
        target_length,
    )
    value, policy = resolve_mscale(
        "yarn" if mscale is None else mscale, scale, geometry.original_max_position_embeddings
    )
    options = {"yarn_beta_fast": yarn_beta_fast, "yarn_beta_slow": yarn_beta_slow}
    factors = factors_from_inv_freq(geometry, inv_freq)
    return RopeScaling("yarn", geometry, target_length, factors, None, 0, value, policy, options=options)


def longrope_scaling(
    geometry: RopeGeometry,
    target_length: int,
    long_factors: Sequence[float],
    short_factors: Sequence[float] | None = None,
    start_tokens: int = 0,
    mscale: str | float | None = "su",
    short_mscale: float | None = None,
    **_: Any,
) -> RopeScaling:
    """LongRoPE: searched per-pair factors (long, optionally short), start tokens n̂, an mscale policy and optionally
    the short set's own mscale (a number; None: the short set uses ``mscale``)."""
    _check_target(geometry, target_length, "longrope")
    scale = target_length / geometry.original_max_position_embeddings
    value, policy = resolve_mscale(
        "su" if mscale is None else mscale, scale, geometry.original_max_position_embeddings
    )
    return RopeScaling(
        "longrope",
        geometry,
        target_length,
        tuple(float(x) for x in long_factors),
        None if short_factors is None else tuple(float(x) for x in short_factors),
        start_tokens,
        value,
        policy,
        None if short_mscale is None else float(short_mscale),
    )


# ----------------------------------------------------------------------------------------------------------------
# The registry: the only list of methods


@dataclass(frozen=True)
class RopeMethod:
    """A RoPE scaling method and what the entry points may do with it.

    ``build(geometry, target_length, mscale=..., yarn_beta_fast=..., yarn_beta_slow=...)`` returns its RopeScaling
    (a method ignores options it does not use). ``from_file``: the factors come from a factors file
    (``rope_factors_path``), not from ``build``. ``fixed``: one factor set for every length, so a checkpoint config can
    hold it and train.py can train with it (dynamic NTK recomputes per sequence). ``search_seed``: its factors seed
    the first- and second-stage search. ``needs_target``: it is set up for a target length beyond the original window.
    """

    name: str
    build: Callable[..., RopeScaling]
    description: str
    from_file: bool = False
    fixed: bool = True
    search_seed: bool = False
    needs_target: bool = True
    aliases: tuple[str, ...] = ()


_REGISTRY: dict[str, RopeMethod] = {}


def register_method(entry: RopeMethod) -> RopeMethod:
    """Add a method (its name and aliases must be new); every entry point accepts it from then on."""
    taken = {name for known in _REGISTRY.values() for name in (known.name, *known.aliases)}
    clash = sorted({entry.name, *entry.aliases} & taken)
    if clash:
        raise LongRopeError(f"rope method {clash[0]!r} is already registered; choose another name")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_method(name: str) -> None:
    _REGISTRY.pop(name, None)


def method_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def methods_with(**flags: Any) -> tuple[str, ...]:
    """Names of the registered methods whose attributes equal ``flags`` (e.g. ``search_seed=True``), in order."""
    return tuple(m.name for m in _REGISTRY.values() if all(getattr(m, k) == v for k, v in flags.items()))


def method(name: str, key: str = "rope_method") -> RopeMethod:
    """The registered method called ``name`` (or one of its aliases); a one-line error naming ``key`` otherwise."""
    for entry in _REGISTRY.values():
        if name == entry.name or name in entry.aliases:
            return entry
    raise LongRopeError(f"{key}: {name!r} is not a RoPE method; use one of {', '.join(_REGISTRY)}")


def canonical_method(name: str) -> str:
    return method(name).name


def build_scaling(name: str, geometry: RopeGeometry, target_length: int | None = None, **options: Any) -> RopeScaling:
    """Dispatch by method name: ``build_scaling("yarn", geometry, 2048, mscale="yarn")``."""
    return method(name).build(geometry, target_length=target_length, **options)


register_method(
    RopeMethod("none", none_scaling, "plain RoPE, extrapolation", needs_target=False, aliases=("extrapolation",))
)
register_method(
    RopeMethod("pi", pi_scaling, "position interpolation (transformers linear)", search_seed=True, aliases=("linear",))
)
register_method(
    RopeMethod(
        "ntk",
        ntk_scaling,
        "NTK-aware base change (transformers dynamic at factor 1)",
        search_seed=True,
        aliases=("ntk_aware",),
    )
)
register_method(
    RopeMethod(
        "dynamic_ntk",
        dynamic_ntk_scaling,
        "NTK base from each sequence's length (transformers dynamic)",
        fixed=False,
        aliases=("dynamic",),
    )
)
register_method(
    RopeMethod(
        "yarn", yarn_scaling, "YaRN ramp over the pair index, mscale yarn (transformers yarn)", search_seed=True
    )
)
register_method(
    RopeMethod("longrope", longrope_scaling, "searched per-pair factors from a factors file", from_file=True)
)


# ----------------------------------------------------------------------------------------------------------------
# The installed module


def _angle_dtype(device: torch.device) -> torch.dtype:
    # Apple's MPS has no float64; elsewhere the angles are formed in float64 (see the module docstring).
    return torch.float32 if device.type == "mps" else torch.float64


class ScaledRotaryEmbedding(nn.Module):
    """Drop-in replacement for a transformers ``*RotaryEmbedding``: ``forward(x, position_ids) -> (cos, sin)``.

    Frequencies live in plain float64 tensors (not buffers), so ``model.to(torch.bfloat16)`` cannot round them.
    """

    def __init__(self, scaling: RopeScaling) -> None:
        super().__init__()
        self.selection = "auto"
        self.sequence_parallel_group: Any = None
        self.set_scaling(scaling)

    def set_scaling(self, scaling: RopeScaling) -> None:
        self.scaling = scaling
        self._base_inv_freq = scaling.geometry.base_inv_freq().double()
        self._long_inv_freq = self._inv_freq(scaling.long_factors)
        self._short_inv_freq = None if scaling.short_factors is None else self._inv_freq(scaling.short_factors)
        self._dynamic_cache: dict[int, torch.Tensor] = {}
        self._device_cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _inv_freq(self, factors: Sequence[float]) -> torch.Tensor:
        # On the CPU like the base frequencies, also under another default device; forward moves them.
        return self._base_inv_freq / torch.tensor(factors, dtype=torch.float64, device=self._base_inv_freq.device)

    def _on(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (name, device)
        if key not in self._device_cache:
            self._device_cache[key] = tensor.to(device=device, dtype=_angle_dtype(device))
        return self._device_cache[key]

    def sequence_lengths(self, position_ids: torch.Tensor) -> torch.Tensor:
        """Global length of each sequence: largest position id + 1, maximised over the sequence-parallel group."""
        lengths = position_ids.amax(dim=-1) + 1
        group = self.sequence_parallel_group
        if group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            lengths = lengths.clone()
            torch.distributed.all_reduce(lengths, op=torch.distributed.ReduceOp.MAX, group=group)
        return lengths

    def _rows(self, position_ids: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Per sequence: frequencies [batch, pairs] and mscale (a number, or [batch] when the rows' sets differ)."""
        scaling = self.scaling
        batch = position_ids.shape[0]
        long_inv = self._on("long", self._long_inv_freq, device)
        # Without a short set the long factors serve every length, so forcing "short" changes only the mscale.
        short_inv = long_inv if self._short_inv_freq is None else self._on("short", self._short_inv_freq, device)
        one_set = self._short_inv_freq is None and scaling.short_mscale is None and not scaling.dynamic
        if self.selection == "long" or one_set:
            return long_inv.expand(batch, -1), scaling.mscale
        if self.selection == "short":
            return short_inv.expand(batch, -1), scaling.short_set_mscale
        lengths = self.sequence_lengths(position_ids).tolist()
        if scaling.dynamic:
            rows = [self._dynamic_inv_freq(int(length)) for length in lengths]
            return torch.stack(rows).to(device=device, dtype=_angle_dtype(device)), scaling.mscale
        is_long = torch.tensor(
            [length > scaling.geometry.original_max_position_embeddings for length in lengths], device=device
        )
        inv_freq = torch.where(is_long[:, None], long_inv, short_inv)
        if scaling.short_mscale is None:
            return inv_freq, scaling.mscale
        mscale = torch.tensor([scaling.mscale, scaling.short_mscale], device=device, dtype=long_inv.dtype)
        return inv_freq, torch.where(is_long, mscale[0], mscale[1])

    def _dynamic_inv_freq(self, length: int) -> torch.Tensor:
        if length not in self._dynamic_cache:
            factors = dynamic_ntk_factors(self.scaling.geometry, self.scaling.scale, length)
            self._dynamic_cache[length] = self._inv_freq(factors)
        return self._dynamic_cache[length]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
        device = x.device
        positions = position_ids.to(_angle_dtype(device))
        with torch.autocast(device_type=device.type if device.type != "mps" else "cpu", enabled=False):
            inv_freq, row_mscale = self._rows(position_ids, device)
            freqs = positions[..., None] * inv_freq[:, None, :]
            # [batch, 1, 1] against cos/sin [batch, positions, rotary_dim] when the rows' mscales differ.
            mscale = row_mscale[:, None, None] if isinstance(row_mscale, torch.Tensor) else row_mscale
            start_tokens = self.scaling.start_tokens
            if start_tokens > 0:
                # Eq. 3: the first n̂ positions keep the original angles (and, as in the official code, no mscale).
                is_start = (position_ids < start_tokens)[..., None]
                original = positions[..., None] * self._on("base", self._base_inv_freq, device)
                freqs = torch.where(is_start, original, freqs)
                mscale = torch.where(is_start, 1.0, torch.as_tensor(mscale, device=device, dtype=freqs.dtype))
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * mscale
            sin = emb.sin() * mscale
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)

    def extra_repr(self) -> str:
        s = self.scaling
        return (
            f"method={s.method}, pairs={s.geometry.num_pairs}, original={s.geometry.original_max_position_embeddings}, "
            f"target={s.max_position_embeddings}, start_tokens={s.start_tokens}, mscale={s.mscale:.4f}, "
            f"short_mscale={s.short_set_mscale:.4f}, selection={self.selection}"
        )


# ----------------------------------------------------------------------------------------------------------------
# Installing into a model


def _rope_parameters_of(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params and all(isinstance(value, dict) for value in params.values()):
        raise LongRopeError(
            f"{type(config).__name__} uses a different RoPE per layer type ({', '.join(params)}): "
            "LongRoPE installation supports models with one global RoPE"
        )
    return dict(params)


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) for every rotary-embedding module of a model."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            is_hf_rotary = type(child).__name__.endswith("RotaryEmbedding") and hasattr(child, "inv_freq")
            if is_hf_rotary or isinstance(child, ScaledRotaryEmbedding):
                found.append((parent, name, child))
    return found


def install(
    model: nn.Module,
    scaling: RopeScaling,
    selection: str = "auto",
    sequence_parallel_group: Any = None,
) -> list[ScaledRotaryEmbedding]:
    """Install ``scaling`` into ``model`` in place and return the installed module(s).

    Calling it again on the same model swaps the factors inside the installed modules (no reload, no new modules,
    no stale state). ``selection`` forces the long or short factors (``"long"``/``"short"``) or chooses them per
    sequence from its global length (``"auto"``). ``sequence_parallel_group``: the process group whose ranks hold
    shards of the same sequences (see :func:`set_sequence_parallel_group` to set it once it exists); sequence lengths
    are maximised over it so every rank picks the same factors.
    """
    if selection not in SELECTIONS:
        raise LongRopeError(f"selection = {selection!r} is not known: use one of {', '.join(SELECTIONS)}")
    found = rotary_modules(model)
    if not found:
        raise LongRopeError(
            f"{type(model).__name__} has no rotary embedding module (no '*RotaryEmbedding' with inv_freq): "
            "LongRoPE applies only to RoPE models"
        )
    config = getattr(model, "config", None)
    if config is not None:
        model_geometry = RopeGeometry.from_config(config, scaling.geometry.original_max_position_embeddings)
        _check_geometry_matches(model_geometry, scaling.geometry)
    installed = []
    for parent, name, module in found:
        if isinstance(module, ScaledRotaryEmbedding):
            module.set_scaling(scaling)
        else:
            module = ScaledRotaryEmbedding(scaling)
            setattr(parent, name, module)
        module.selection = selection
        module.sequence_parallel_group = sequence_parallel_group
        installed.append(module)
    return installed


def _check_geometry_matches(model_geometry: RopeGeometry, geometry: RopeGeometry) -> None:
    if model_geometry.rotary_dim != geometry.rotary_dim:
        raise LongRopeError(
            f"the factors are for {geometry.num_pairs} frequency pairs (rotary_dim {geometry.rotary_dim}) but the "
            f"model has {model_geometry.num_pairs} (head_dim {model_geometry.head_dim}, rotary_dim "
            f"{model_geometry.rotary_dim}): use factors searched for this model"
        )
    if not math.isclose(model_geometry.rope_theta, geometry.rope_theta, rel_tol=1e-6):
        raise LongRopeError(
            f"the factors assume rope_theta {geometry.rope_theta:g} but the model has {model_geometry.rope_theta:g}: "
            "use factors searched for this model"
        )


def installed_modules(model: nn.Module) -> list[ScaledRotaryEmbedding]:
    return [module for module in model.modules() if isinstance(module, ScaledRotaryEmbedding)]


def _require_installed(model: nn.Module) -> list[ScaledRotaryEmbedding]:
    modules = installed_modules(model)
    if not modules:
        raise LongRopeError("no LongRoPE module is installed in this model: call longrope.rope.install first")
    return modules


def select_factors(model: nn.Module, selection: str) -> None:
    """Force the long or short factor set on every installed module (``"auto"`` restores per-sequence choice)."""
    if selection not in SELECTIONS:
        raise LongRopeError(f"selection = {selection!r} is not known: use one of {', '.join(SELECTIONS)}")
    for module in _require_installed(model):
        module.selection = selection


@contextlib.contextmanager
def factors_for_generation(model: nn.Module, final_length: int):
    """Within the block, every installed module uses the factor set of a sequence of ``final_length`` tokens.

    Choosing the set per forward (``"auto"``) would switch sets when a generation grows past the original window:
    the keys cached from the prompt were rotated with the short set and the new tokens with the long one, which
    breaks the answer (SmolLM2's export: 0 of 5 passkeys at an 8k prompt). Stock transformers' ``longrope`` switches
    there too. A model without a short set, or without installed modules, is left as it is.
    """
    modules = [module for module in installed_modules(model) if module.selection == "auto"]
    pinned = [
        module
        for module in modules
        if module.scaling.short_factors is not None or module.scaling.short_mscale is not None
    ]
    for module in pinned:
        original = module.scaling.geometry.original_max_position_embeddings
        module.selection = "long" if final_length > original else "short"
    try:
        yield
    finally:
        for module in pinned:
            module.selection = "auto"


def set_sequence_parallel_group(model: nn.Module, group: Any) -> None:
    """Agree on long vs short factors over ``group`` (the ranks holding shards of the same sequences) from now on."""
    for module in _require_installed(model):
        module.sequence_parallel_group = group
