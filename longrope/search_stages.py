"""What a search stage searches: search.py's keys, the search space and seeds per stage, and candidates as scalings.

Stages (LongRoPE Sec. 3.3): ``first`` searches the base model for ``target_length``, seeded with every registered
method marked ``search_seed`` (PI, NTK and YaRN computed by transformers); ``second`` searches a fine-tuned checkpoint
for a further extension, seeded with its factors stretched to the new scale; ``short`` searches short factors at the
original window on the extended model (with a lower factor cap), which go next to the unchanged long factors and
long mscale into one factors file, with the short set's own mscale (:func:`short_stage_mscale`). The RoPE keys
(``target_length``, ``rope_factors_path``, ``rope_mscale``, ``yarn_beta_*``) are the shared
:class:`longrope.args.RopeArguments`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from longrope import factors, rope
from longrope.args import (
    LONG_SET_MSCALE,
    DocumentsArguments,
    LossArguments,
    OutputArguments,
    RetrievalTemplateArguments,
    RopeArguments,
    TrackingArguments,
    require_positive_int,
)
from longrope.errors import LongRopeError
from longrope.evolution import Candidate, EvolutionConfig, SearchSpaceConfig

STAGES = ("first", "second", "short")
FITNESSES = ("perplexity", "needle")
# Search-space keys the script derives from the model and stage; a config may not set them.
DERIVED_SPACE_KEYS = {
    "rotary_dim",
    "scale",
    "original_max_position_embeddings",
    "max_position_embeddings",
    "rope_theta",
}
# The attention factor of the candidates when rope_mscale is not set: LongRoPE's own.
DEFAULT_MSCALE = "su"


class JsonMapping(dict):
    """A mapping-valued key: a mapping in YAML, a JSON object on the command line (``--evolution '{"mode": "fast"}'``)."""

    def __init__(self, value: Any = (), **kwargs: Any) -> None:
        if isinstance(value, str):
            import argparse

            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}") from None
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object, got {value!r}")
        super().__init__(value, **kwargs)


@dataclass
class SearchArguments(
    DocumentsArguments, LossArguments, OutputArguments, TrackingArguments, RetrievalTemplateArguments
):
    """Keys only search.py reads; the model, RoPE, documents (num_documents: the paper's N samples), loss chunk,
    output, tracking and retrieval_template (the needle fitness's wording) keys are the shared ones of
    :mod:`longrope.args`."""

    stage: Literal["first", "second", "short"] = field(
        default="first",
        metadata={
            "help": "first: base model, target_length. second: fine-tuned checkpoint, a further extension seeded "
            "with its factors stretched to the new scale. short: short factors at the original window (4k/8k)."
        },
    )
    fitness: Literal["perplexity", "needle"] = field(
        default="perplexity",
        metadata={
            "help": "perplexity: truncated-sample PPL (LongRoPE). needle: answer-token PPL of a needle at each "
            "sample's start, worded by retrieval_template (LongRoPE2)."
        },
    )
    evolution: JsonMapping = field(
        default_factory=dict,
        metadata={
            "help": "Algorithm settings (longrope.evolution.EvolutionConfig and SearchSpaceConfig keys): "
            "population_size, num_generations, mode (fast, the default, or paper), variant, factor_max, ..."
        },
    )
    resume: bool = field(default=False, metadata={"help": "Continue from output_dir/search_state.json."})
    gpus_per_process: int = field(
        default=1, metadata={"help": "GPUs one evaluator spreads the model over (large models); 1 per GPU otherwise."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.stage not in STAGES:
            raise LongRopeError(f"stage: {self.stage!r} is not one of {', '.join(STAGES)}")
        if self.fitness not in FITNESSES:
            raise LongRopeError(f"fitness: {self.fitness!r} is not one of {', '.join(FITNESSES)}")
        if self.documents_path is None:
            raise LongRopeError(
                "documents_path: required; prepare documents with data/prepare.py (output_format documents)"
            )
        if self.num_documents is None:
            raise LongRopeError(
                "num_documents: required by search.py, the N documents each candidate is scored on (the paper: 5)"
            )
        require_positive_int("gpus_per_process", self.gpus_per_process)
        if not isinstance(self.evolution, dict):
            raise LongRopeError("evolution: must be a mapping of algorithm settings (e.g. {num_generations: 40})")
        derived = sorted(DERIVED_SPACE_KEYS & set(self.evolution))
        if derived:
            raise LongRopeError(f"evolution.{derived[0]}: derived from the model and stage; remove it")
        if "num_samples" in self.evolution:
            raise LongRopeError("evolution.num_samples: set num_documents at the top level instead")


def check_rope_keys(rope_args: RopeArguments) -> None:
    """The RoPE keys search.py reads: the target, the input factors, the candidates' mscale, the YaRN seed."""
    if rope_args.rope_method is not None:
        raise LongRopeError(
            "rope_method: search.py always searches LongRoPE factors; drop rope_method (its input factors, if any, "
            "are rope_factors_path)"
        )
    if rope_args.target_length is None or rope_args.target_length < 2:
        raise LongRopeError("target_length: required by search.py, the length to search factors for (e.g. 2048)")


def candidate_mscale(rope_args: RopeArguments) -> str | float:
    if rope_args.rope_mscale == LONG_SET_MSCALE:
        raise LongRopeError(
            f"rope_mscale: {LONG_SET_MSCALE} is for stage short (the short set takes the long set's); the first and "
            "second stages take su, yarn, none or a number"
        )
    return rope.parse_mscale(rope_args.rope_mscale) if rope_args.rope_mscale is not None else DEFAULT_MSCALE


def short_stage_mscale(
    rope_args: RopeArguments, trained: rope.RopeScaling | None, long: rope.RopeScaling
) -> tuple[float, str]:
    """The short candidates' mscale (without ``search_mscale``; with it, where the search starts) and its source.

    ``rope_mscale`` when given (a number, none = 1.0, or ``long``: the long set's, the one attention factor a stock
    ``rope_type: longrope`` config applies at every length, so its export computes what was searched). Otherwise
    the mscale the checkpoint applies to sequences at the original window, read from its config: its ``short_mscale`` if it has one, else its ``attention_factor``, the
    factor it was fine-tuned with. Its weights adapted to that scaling of the attention logits (by mscale²); the long
    set's mscale grows with the new scale (su: 1.17 at 8x, 1.32 at 64x on a 256 window) and would sharpen attention
    at short lengths beyond anything trained. A config without longrope factors (a model never fine-tuned long) gives
    1.0: the original RoPE.
    """
    if rope_args.rope_mscale == LONG_SET_MSCALE:
        return long.mscale, "the long set's attention factor (rope_mscale long)"
    if rope_args.rope_mscale is not None:
        value = rope.parse_mscale(rope_args.rope_mscale)
        if value in ("su", "yarn"):
            raise LongRopeError(
                f"rope_mscale: {value} is a formula of the scale, but the short stage's candidates serve lengths up "
                "to the original window (scale <= 1); give a number (e.g. 1.0), long (the long set's) or drop "
                "rope_mscale for the checkpoint's attention factor"
            )
        return (1.0, "rope_mscale none") if value == "none" else (float(value), "rope_mscale")
    if trained is None:
        return 1.0, "the original RoPE (the checkpoint's config has no longrope factors)"
    return trained.short_set_mscale, "the checkpoint's attention factor (its config)"


# ----------------------------------------------------------------------------------------------------------------
# Stages: geometry, seeds and how a candidate becomes a RopeScaling


def stretch_factors(long_factors: tuple[float, ...], old_scale: float, new_scale: float) -> tuple[float, ...]:
    """Move factors searched for ``old_scale`` to ``new_scale`` linearly, as the official search's ``rescale``.

    λ' = 1 + (λ - 1)(s' - 1)/(s - 1): extrapolated pairs (λ = 1) stay, interpolated ones grow with the scale.
    """
    if old_scale <= 1:
        return tuple(float(new_scale) for _ in long_factors)
    ratio = (new_scale - 1) / (old_scale - 1)
    return tuple(1.0 + (value - 1.0) * ratio for value in long_factors)


def monotone(values: tuple[float, ...]) -> tuple[float, ...]:
    """Running maximum: the search space is non-decreasing, and derived seeds may carry float noise."""
    result, running = [], -math.inf
    for value in values:
        running = max(running, value)
        result.append(running)
    return tuple(result)


@dataclass
class StagePlan:
    geometry: rope.RopeGeometry
    scale: float
    seeds: dict[str, Candidate]
    base: rope.RopeScaling | None  # the input factors (second/short stage)
    factor_max: float | None
    target_length: int
    mscale: str | float  # of candidates without an mscale gene: a policy, or the short stage's short mscale
    mscale_source: str | None = None  # the short stage's: where its short mscale came from (provenance)

    @property
    def seed_mscale(self) -> float:
        """The mscale value the seeds carry when the mscale is searched (the gene needs a starting point)."""
        return rope.resolve_mscale(self.mscale, self.scale, self.geometry.original_max_position_embeddings)[0]


def plan_stage(args: SearchArguments, rope_args: RopeArguments, model_config: Any) -> StagePlan:
    geometry = rope.RopeGeometry.from_config(model_config, rope_args.original_max_position_embeddings)
    original = geometry.original_max_position_embeddings
    target = rope_args.target_length
    base = _input_factors(args, rope_args, model_config, geometry)
    if args.stage == "short":
        if target > original:
            raise LongRopeError(
                f"target_length: {target} is beyond the original window {original}; the short stage searches at or "
                "below it (e.g. 4096/8192 for LLaMA2)"
            )
        if base is None:
            raise LongRopeError("rope_factors_path: the short stage needs the extended model's long factors")
        long_scale = base.scale
        cap = max(1.25, 0.25 * long_scale)
        capped = tuple(min(value, cap) for value in base.long_factors)
        seeds = {
            "original": Candidate(tuple(1.0 for _ in base.long_factors)),
            "long_capped": Candidate(capped),
            # Long factors may exceed their scale (the space reaches 1.25 s), so the compressed ones may exceed cap.
            "long_compressed": Candidate(
                tuple(min(v, cap) for v in stretch_factors(base.long_factors, long_scale, cap))
            ),
        }
        if base.short_factors is not None:
            seeds["short"] = Candidate(tuple(min(v, cap) for v in base.short_factors))
        # The factors the checkpoint was fine-tuned with served every length up to its training length, so they are
        # the natural starting point below it.
        trained = factors.from_model_config(model_config, geometry)
        if trained is not None and len(trained.long_factors) == len(base.long_factors):
            seeds["trained"] = Candidate(tuple(min(float(v), cap) for v in trained.long_factors))
        short_mscale, source = short_stage_mscale(rope_args, trained, base)
        return StagePlan(geometry, cap, seeds, base, cap, target, short_mscale, source)
    if target <= original:
        raise LongRopeError(
            f"target_length: {target} must be larger than the original length {original} "
            f"(stage {args.stage}); the short stage searches at the original window"
        )
    scale = target / original
    mscale = candidate_mscale(rope_args)
    options = {
        "mscale": mscale,
        "yarn_beta_fast": rope_args.yarn_beta_fast,
        "yarn_beta_slow": rope_args.yarn_beta_slow,
    }
    # Computed factors carry float noise (PI's at a scale that is not a power of two differ in the last bits).
    seeds = {
        name: Candidate(monotone(rope.build_scaling(name, geometry, target, **options).long_factors))
        for name in rope.methods_with(search_seed=True)
    }
    if base is not None:
        name = "finetuned_stretched" if args.stage == "second" else "given"
        stretched = monotone(stretch_factors(base.long_factors, base.scale, scale))
        seeds[name] = Candidate(stretched, base.start_tokens)
    elif args.stage == "second":
        raise LongRopeError(
            "rope_factors_path: the second stage starts from the fine-tuned model's factors; give its factors file "
            "(or a checkpoint whose config has rope_type longrope)"
        )
    return StagePlan(geometry, scale, seeds, base, None, target, mscale)


def seeds_within_space(
    seeds: dict[str, Candidate], config: EvolutionConfig, mscale: float | None = None
) -> dict[str, Candidate]:
    """Derived seeds clipped into the search space: searched factors may exceed their scale (up to 1.25 s), so
    stretched or compressed to another scale they can cross the new bounds (clipping keeps them monotone). When the
    mscale is searched, a seed without one starts from ``mscale`` (the stage's), clipped into its bounds too."""
    space = config.space
    low, high = space.factor_min, space.factor_max
    fitted = {}
    for name, seed in seeds.items():
        seed = dataclasses.replace(seed, factors=tuple(min(max(v, low), high) for v in seed.factors))
        if space.search_mscale and seed.mscale is None and mscale is not None:
            seed = dataclasses.replace(seed, mscale=min(max(mscale, space.mscale_min), space.mscale_max))
        fitted[name] = seed
    return fitted


def _input_factors(
    args: SearchArguments, rope_args: RopeArguments, model_config: Any, geometry: rope.RopeGeometry
) -> rope.RopeScaling | None:
    if rope_args.rope_factors_path is not None:
        loaded = factors.load_for_model(
            rope_args.rope_factors_path,
            model_config,
            target_length=rope_args.target_length,
            original_max_position_embeddings=rope_args.original_max_position_embeddings,
        )
        return loaded.scaling
    if args.stage != "first":
        return factors.from_model_config(model_config, geometry)
    return None


def scaling_for(args: SearchArguments, plan: StagePlan, candidate: Candidate) -> rope.RopeScaling:
    mscale: Any = candidate.mscale if candidate.mscale is not None else plan.mscale
    if args.stage == "short":
        # The input's long factors, long mscale (and its policy) and start tokens stay exactly as they were.
        return plan.base.replace(
            method="longrope",
            short_factors=candidate.factors,
            short_mscale=float(mscale),
            short_mscale_policy="constant",
            dynamic=False,
        )
    return rope.longrope_scaling(
        plan.geometry, plan.target_length, candidate.factors, start_tokens=candidate.start_tokens, mscale=mscale
    )


def evolution_config(args: SearchArguments, plan: StagePlan) -> EvolutionConfig:
    settings = dict(args.evolution)
    space_keys = {f.name for f in dataclasses.fields(SearchSpaceConfig)}
    space = {key: settings.pop(key) for key in list(settings) if key in space_keys}
    if plan.factor_max is not None:
        space.setdefault("factor_max", plan.factor_max)
    if "start_token_choices" in space:
        space["start_token_choices"] = tuple(space["start_token_choices"])
    too_far = [n for n in space.get("start_token_choices", ()) if n >= plan.target_length]
    if too_far and space.get("variant") == "lambda_start":
        raise LongRopeError(
            f"evolution.start_token_choices: {too_far[0]} start tokens is not below the sample length "
            f"{plan.target_length}; drop the choices >= target_length"
        )
    space.update(
        rotary_dim=plan.geometry.rotary_dim,
        scale=plan.scale,
        original_max_position_embeddings=plan.geometry.original_max_position_embeddings,
        rope_theta=plan.geometry.rope_theta,
    )
    if space.get("variant") == "lambda_start" and "start_token_choices" not in space:
        space["start_token_choices"] = tuple(
            n for n in SearchSpaceConfig.__dataclass_fields__["start_token_choices"].default if n < plan.target_length
        )
    settings["num_samples"] = args.num_documents
    try:
        return EvolutionConfig(space=SearchSpaceConfig(**space), **settings)
    except TypeError as error:
        raise LongRopeError(
            f"evolution: {str(error).split('(')[-1].rstrip(')')}; see longrope/evolution/config.py"
        ) from None
