"""From RoPE keys to a checked RopeScaling for one model: the resolution every entry point shares.

train.py's RoPE keys, each evaluate.py ``methods`` entry, search.py's input factors and the export command are all a
:class:`longrope.args.RopeArguments`; :func:`resolve_rope` turns one into the scaling to install, checked against
the model's RoPE geometry (head_dim, rope_theta, pre-training window) before any weights load. A factors file is read
once here, with its sha256 for provenance and any warnings about its contents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from longrope import factors as factors_io
from longrope import rope
from longrope.args import LONG_SET_MSCALE, RopeArguments
from longrope.errors import LongRopeError


@dataclass
class ResolvedRope:
    """The scaling to install, the factors file it came from (None for computed methods) and notes for the user."""

    scaling: rope.RopeScaling
    factors_path: str | None = None
    sha256: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def method(self) -> str:
        return self.scaling.method

    def summary(self) -> str:
        scaling = self.scaling
        source = self.factors_path or "computed"
        short = "" if scaling.short_mscale is None else f", short mscale {scaling.short_mscale:.4f}"
        return (
            f"{scaling.method} {scaling.scale:g}x to {scaling.max_position_embeddings}, mscale {scaling.mscale:.4f}"
            f"{short} ({source})"
        )


def resolve_rope(
    args: RopeArguments, model_config: Any, default_target: int | None = None, where: str = ""
) -> ResolvedRope:
    """The scaling ``args`` asks for on a model with ``model_config``.

    ``default_target`` is the target length of computed methods when ``target_length`` is not set (evaluate.py: its
    longest length). ``where`` prefixes every error (e.g. ``methods[2].``), so the message names the key as written.
    """
    try:
        return _resolve(args, model_config, default_target)
    except LongRopeError as error:
        if where and not str(error).startswith(where):
            raise LongRopeError(f"{where}{error}") from None
        raise


def _resolve(args: RopeArguments, model_config: Any, default_target: int | None) -> ResolvedRope:
    if args.rope_mscale == LONG_SET_MSCALE:
        raise LongRopeError(
            f"rope_mscale: {LONG_SET_MSCALE} is for search.py's short stage (the short set takes the long set's); "
            "give su, yarn, none or a number"
        )
    geometry = rope.RopeGeometry.from_config(model_config, args.original_max_position_embeddings)
    entry = rope.method(args.method)
    if not entry.from_file:
        target = args.target_length or default_target
        if entry.needs_target and target is None:
            raise LongRopeError(f"target_length: required with rope_method {entry.name}; e.g. 2048")
        options: dict[str, Any] = {"yarn_beta_fast": args.yarn_beta_fast, "yarn_beta_slow": args.yarn_beta_slow}
        if args.rope_mscale is not None:
            options["mscale"] = rope.parse_mscale(args.rope_mscale)
        return ResolvedRope(entry.build(geometry, target_length=target, **options))
    path = args.rope_factors_path
    loaded = factors_io.load_for_model(
        path, model_config, args.target_length, "rope_factors_path", args.original_max_position_embeddings
    )
    scaling = loaded.scaling
    file_geometry = scaling.geometry
    if not math.isclose(file_geometry.rope_theta, geometry.rope_theta, rel_tol=1e-6):
        raise LongRopeError(
            f"rope_factors_path: {path} is for rope_theta {file_geometry.rope_theta:g} but the model has "
            f"{geometry.rope_theta:g}; use factors searched for this model"
        )
    stated = args.original_max_position_embeddings or (getattr(model_config, "rope_parameters", None) or {}).get(
        "original_max_position_embeddings"
    )
    if stated and file_geometry.original_max_position_embeddings != stated:
        # An already-extended checkpoint states its pre-training window; a base model's max_position_embeddings may
        # not be it (Mistral-7B-v0.1 says 32k, the paper treats 8k), so there the file's window is taken.
        raise LongRopeError(
            f"rope_factors_path: {path} is for an original window of {file_geometry.original_max_position_embeddings} "
            f"but the model's is {stated}; use factors searched for this model"
        )
    if args.target_length is not None and scaling.max_position_embeddings != args.target_length:
        raise LongRopeError(
            f"target_length: {args.target_length}, but {path} extends to {scaling.max_position_embeddings}; "
            "drop target_length or use factors for that length"
        )
    if args.rope_mscale is not None:
        value, policy = rope.resolve_mscale(
            rope.parse_mscale(args.rope_mscale), scaling.scale, file_geometry.original_max_position_embeddings
        )
        scaling = scaling.replace(mscale=value, mscale_policy=policy)
    return ResolvedRope(scaling, factors_path=str(path), sha256=loaded.sha256, notes=list(loaded.warnings))


def with_original_short_factors(resolved: ResolvedRope) -> ResolvedRope:
    """The same scaling whose short factors are 1.0 (the original RoPE below the pre-training window)."""
    scaling = resolved.scaling
    original = (1.0,) * scaling.geometry.num_pairs
    return ResolvedRope(
        scaling.replace(short_factors=original), resolved.factors_path, resolved.sha256, resolved.notes
    )


# The config key that ties a checkpoint to the factors file it was trained with (its sha256).
SHA256_CONFIG_KEY = "longrope_factors_sha256"


def install_rope(
    model: Any, resolved: ResolvedRope, allow_start_tokens: bool = False, allow_shared_mscale: bool = False
) -> None:
    """Install the scaling in place and make the config (so every checkpoint) describe it for stock loaders."""
    rope.install(model, resolved.scaling)
    model.config = config_with_rope(model.config, resolved, allow_start_tokens, allow_shared_mscale)


def config_with_rope(
    config: Any, resolved: ResolvedRope, allow_start_tokens: bool = False, allow_shared_mscale: bool = False
) -> Any:
    """A copy of ``config`` that describes ``resolved`` (stock ``rope_type: longrope``, the factors' sha256)."""
    updated = factors_io.apply_to_config(config, resolved.scaling, allow_start_tokens, allow_shared_mscale)
    if resolved.sha256 is not None:
        setattr(updated, SHA256_CONFIG_KEY, resolved.sha256)
    return updated
