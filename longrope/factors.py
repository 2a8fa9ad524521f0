"""The factors file: one JSON document per result, readable by search.py, train.py and evaluate.py.

Example (``factors.json``)::

    {
      "format": "longrope-factors",
      "version": 1,
      "method": "longrope",
      "rope_theta": 10000.0,
      "head_dim": 64,
      "rotary_dim": 64,
      "original_max_position_embeddings": 256,
      "max_position_embeddings": 2048,
      "long_factors": [1.0, 1.02, ..., 9.8],
      "short_factors": null,
      "start_tokens": 0,
      "mscale": {"policy": "su", "value": 1.1677},
      "short_mscale": {"policy": "constant", "value": 1.0},
      "provenance": {"model": "models/tiny", "data_sha256": "...", "fitness": 4.01, "settings": {...}}
    }

``short_factors`` (optional) apply to sequences no longer than the original window; without them the long
factors apply to every length. ``mscale`` multiplies cos/sin of the long sequences and, unless ``short_mscale``
(optional, written only when set) gives the short ones their own, of every sequence. The file converts to a stock
transformers ``rope_parameters`` of ``rope_type: longrope`` whenever ``start_tokens`` is 0 and the short set shares
the long set's mscale, so an exported model loads with no custom code.
The official LongRoPE repository's CSV files (one factor per line, ``result_final.csv``) are readable too.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longrope.errors import LongRopeError
from longrope.io import atomic_write_json, replace_directory, sha256_file, staging_directory
from longrope.rope import RopeGeometry, RopeScaling, canonical_method, decreasing_steps

FORMAT = "longrope-factors"
# The factors file a model folder carries beside its config.json (exports, fine-tunes and their checkpoints).
FACTORS_FILE_NAME = "longrope_factors.json"
VERSION = 1
REQUIRED_KEYS = (
    "method",
    "rope_theta",
    "head_dim",
    "rotary_dim",
    "original_max_position_embeddings",
    "max_position_embeddings",
    "long_factors",
)


@dataclass
class FactorsFile:
    """A scaling plus where it came from."""

    scaling: RopeScaling
    provenance: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def sha256(self) -> str | None:
        return sha256_file(self.path) if self.path and os.path.exists(self.path) else None


# ----------------------------------------------------------------------------------------------------------------
# JSON


def to_dict(scaling: RopeScaling, provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    geometry = scaling.geometry
    mscales = {"mscale": {"policy": scaling.mscale_policy, "value": scaling.mscale}}
    if scaling.short_mscale is not None:
        # Written only when set: a file without one reads as before (the short set uses mscale).
        mscales["short_mscale"] = {"policy": scaling.short_mscale_policy, "value": scaling.short_mscale}
    return {
        "format": FORMAT,
        "version": VERSION,
        "method": scaling.method,
        "rope_theta": geometry.rope_theta,
        "head_dim": geometry.head_dim,
        "rotary_dim": geometry.rotary_dim,
        "original_max_position_embeddings": geometry.original_max_position_embeddings,
        "max_position_embeddings": scaling.max_position_embeddings,
        "long_factors": [float(x) for x in scaling.long_factors],
        "short_factors": None if scaling.short_factors is None else [float(x) for x in scaling.short_factors],
        "start_tokens": scaling.start_tokens,
        **mscales,
        "dynamic": scaling.dynamic,
        "options": dict(scaling.options),
        "provenance": provenance or {},
    }


def _mscale_entry(payload: dict[str, Any], key: str, source: str) -> tuple[float, str] | None:
    """``{"policy": ..., "value": ...}`` of ``key`` as (value, policy); None when the key is absent."""
    entry = payload.get(key)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not _is_number(entry.get("value")):
        raise LongRopeError(
            f'{source}: {key} must be an object like {{"policy": "constant", "value": 1.12}} (a number > 0), '
            f"got {entry!r}"
        )
    policy = entry.get("policy", "constant")
    if not isinstance(policy, str):
        raise LongRopeError(f"{source}: {key}.policy must be a name (su, yarn, none, constant), got {policy!r}")
    return float(entry["value"]), policy


def from_dict(payload: dict[str, Any], source: str = "<dict>") -> FactorsFile:
    if not isinstance(payload, dict):
        raise LongRopeError(f"{source}: a factors file must hold a JSON object, got {type(payload).__name__}")
    if payload.get("format", FORMAT) != FORMAT:
        raise LongRopeError(f"{source}: format is {payload.get('format')!r}, expected {FORMAT!r}")
    if payload.get("version", VERSION) > VERSION:
        raise LongRopeError(f"{source}: version {payload['version']} is newer than this code ({VERSION}): upgrade")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise LongRopeError(f"{source}: missing key(s) {', '.join(missing)}: see the example in longrope/factors.py")
    for key in ("head_dim", "rotary_dim", "original_max_position_embeddings", "max_position_embeddings"):
        if not isinstance(payload[key], int) or payload[key] <= 0:
            raise LongRopeError(f"{source}: {key} must be a positive integer, got {payload[key]!r}")
    for key in ("long_factors", "short_factors"):
        value = payload.get(key)
        if value is not None and not (isinstance(value, list) and all(_is_number(x) for x in value)):
            raise LongRopeError(f"{source}: {key} must be a list of numbers")
    mscale, mscale_policy = _mscale_entry(payload, "mscale", source) or (1.0, "none")
    short_mscale, short_policy = _mscale_entry(payload, "short_mscale", source) or (None, "constant")
    geometry = RopeGeometry(
        float(payload["rope_theta"]),
        payload["head_dim"],
        payload["rotary_dim"],
        payload["original_max_position_embeddings"],
    )
    try:
        scaling = RopeScaling(
            method=canonical_method(payload["method"]),
            geometry=geometry,
            max_position_embeddings=payload["max_position_embeddings"],
            long_factors=tuple(float(x) for x in payload["long_factors"]),
            short_factors=None
            if payload.get("short_factors") is None
            else tuple(map(float, payload["short_factors"])),
            start_tokens=payload.get("start_tokens", 0),
            mscale=mscale,
            mscale_policy=mscale_policy,
            short_mscale=short_mscale,
            short_mscale_policy=short_policy,
            dynamic=bool(payload.get("dynamic", False)),
            options=dict(payload.get("options") or {}),
        )
    except LongRopeError as error:
        raise LongRopeError(f"{source}: {error}") from None
    return FactorsFile(scaling, dict(payload.get("provenance") or {}), warnings=order_warnings(scaling, source))


def order_warnings(scaling: RopeScaling, source: str) -> list[str]:
    """Refuse factor lists that run backwards; warn about local dips.

    Every method (and LongRoPE's search space) interpolates the highest-frequency pair (index 0) least and the
    lowest-frequency pair most. A list whose first factor is above its last was almost surely written in reverse
    order; a few decreasing steps inside an otherwise rising list are legal but worth a look.
    """
    found = []
    for name in ("long_factors", "short_factors"):
        values = getattr(scaling, name)
        if values is None or len(values) < 2:
            continue
        if values[0] > values[-1] * (1 + 1e-6):
            raise LongRopeError(
                f"{source}: {name} fall from {values[0]:g} (pair 0, the highest frequency) to {values[-1]:g} (pair "
                f"{len(values) - 1}): factors run from the highest-frequency pair to the lowest, so the list looks "
                "reversed; reverse it"
            )
        steps = decreasing_steps(values)
        if steps:
            i = steps[0]
            more = f" (and {len(steps) - 1} more)" if len(steps) > 1 else ""
            found.append(
                f"{source}: {name}[{i}] = {values[i]:g} is below {name}[{i - 1}] = {values[i - 1]:g}{more}; LongRoPE "
                "keeps factors non-decreasing from the highest-frequency pair, check the file"
            )
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def save(path: str | os.PathLike, scaling: RopeScaling, provenance: dict[str, Any] | None = None) -> None:
    """Write a factors file atomically (a reader never sees half a file)."""
    atomic_write_json(path, to_dict(scaling, provenance))


def load(
    path: str | os.PathLike, geometry: RopeGeometry | None = None, key: str = "rope_factors_path", **csv_options: Any
) -> FactorsFile:
    """Load a factors JSON file, or an official-repo CSV (then ``geometry`` and ``target_length`` are needed).

    ``key`` is the config key the path came from, named in every error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder, not a file" if os.path.isdir(path) else "does not exist"
        raise LongRopeError(f"{key}: {path} {what}; give a factors file (search.py's factors.json or an official CSV)")
    if path.endswith(".csv"):
        if geometry is None:
            raise LongRopeError(f"{key}: {path}: reading an official CSV needs the model's RoPE geometry")
        loaded = read_official_csv(path, geometry, **csv_options)
    else:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise LongRopeError(f"{path}:{error.lineno}:{error.colno}: malformed JSON ({error.msg})") from None
        loaded = from_dict(payload, source=path)
    loaded.path = path
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# The official repository's CSV


def read_official_csv(
    path: str | os.PathLike,
    geometry: RopeGeometry,
    target_length: int | None = None,
    mscale: str | float | None = "su",
) -> FactorsFile:
    """Read the official LongRoPE CSV: one factor per line (``np.savetxt(..., delimiter='\\n')``) or one row.

    A file with one value more than the model has frequency pairs is the internal ``dim_mono_n`` layout, whose
    first gene is the start-token count n̂. Per-layer tables (one row per layer) are accepted only when all rows are
    equal, because stock transformers has one factor set per model.
    """
    path = os.fspath(path)
    if target_length is None:
        raise LongRopeError(f"target_length: required with the official CSV {path}, which does not record it")
    rows: list[list[float]] = []
    with open(path, encoding="utf-8", newline="") as handle:
        for line_number, row in enumerate(csv.reader(handle), start=1):
            cells = [cell.strip() for cell in row if cell.strip()]
            if not cells or cells[0].startswith("#"):
                continue
            try:
                rows.append([float(cell) for cell in cells])
            except ValueError:
                raise LongRopeError(f"{path}:{line_number}: not a number in {row!r}") from None
    if not rows:
        raise LongRopeError(f"{path}: no factors found")
    if all(len(row) == 1 for row in rows):
        values = [row[0] for row in rows]
    elif len(rows) == 1:
        values = rows[0]
    else:
        if any(row != rows[0] for row in rows):
            raise LongRopeError(
                f"{path}: {len(rows)} different per-layer factor rows; per-layer factors are not supported "
                "(transformers has one set per model): average them or search shared factors"
            )
        values = rows[0]
    start_tokens = 0
    if len(values) == geometry.num_pairs + 1:
        first = values[0]
        if first < 0 or first != int(first):
            raise LongRopeError(f"{path}:1: with {len(values)} values the first is n̂ and must be an integer >= 0")
        start_tokens, values = int(first), values[1:]
    if len(values) != geometry.num_pairs:
        raise LongRopeError(
            f"{path}: {len(values)} factors, but the model has {geometry.num_pairs} frequency pairs "
            f"(rotary_dim {geometry.rotary_dim}): use a CSV searched for this model"
        )
    from longrope.rope import longrope_scaling

    scaling = longrope_scaling(geometry, target_length, values, start_tokens=start_tokens, mscale=mscale)
    return FactorsFile(
        scaling, {"source": f"official csv {os.path.basename(path)}"}, warnings=order_warnings(scaling, path)
    )


def write_official_csv(path: str | os.PathLike, scaling: RopeScaling) -> None:
    """Write the long factors in the official one-per-line layout (for the official evaluation scripts)."""
    from longrope.io import atomic_write_text

    atomic_write_text(path, "".join(f"{value!r}\n" for value in scaling.long_factors))


# ----------------------------------------------------------------------------------------------------------------
# transformers interoperability


# What transformers (5.23) does with a longrope config's attention factors: ``_compute_longrope_parameters`` reads one
# ``attention_factor`` (default sqrt(1 + ln factor / ln original)) and every model's rotary module multiplies cos/sin of
# short and long sequences alike by it. ``short_mscale`` / ``long_mscale`` are read only by PhiMoE's own rotary module
# (and the OpenVINO exporter); Llama, Phi-3 and the others log "Unrecognized keys in rope_parameters" and ignore them.
# So a short set with its own mscale cannot be expressed for a stock loader; writing those keys would only look as if
# it were.


def has_own_short_mscale(scaling: RopeScaling) -> bool:
    """Whether the short sequences' mscale differs from the long ones' (what one ``attention_factor`` cannot hold)."""
    return not math.isclose(scaling.short_set_mscale, scaling.mscale, rel_tol=1e-9)


def to_rope_parameters(
    scaling: RopeScaling, allow_start_tokens: bool = False, allow_shared_mscale: bool = False
) -> dict[str, Any]:
    """A stock transformers ``rope_parameters`` (``rope_type: longrope``) that reproduces ``scaling``.

    Start tokens cannot be expressed there; with ``allow_start_tokens`` they are dropped. Neither can a short set's
    own mscale; with ``allow_shared_mscale`` the long set's serves every length (see :func:`export_model`).
    """
    if scaling.dynamic:
        raise LongRopeError(
            "dynamic_ntk recomputes factors per sequence length and has no fixed factor set: export pi, ntk, yarn "
            "or longrope factors instead"
        )
    if scaling.start_tokens and not allow_start_tokens:
        raise LongRopeError(
            f"start_tokens = {scaling.start_tokens}: stock transformers cannot keep the first positions "
            "un-interpolated; pass allow_start_tokens=True (--allow_start_tokens) to export without them"
        )
    if has_own_short_mscale(scaling) and not allow_shared_mscale:
        raise LongRopeError(
            f"short_mscale = {scaling.short_set_mscale:.4g} differs from mscale = {scaling.mscale:.4g}: stock "
            "transformers' longrope applies one attention_factor to every length; pass allow_shared_mscale=True "
            f"(--allow_shared_mscale) to export the long set's {scaling.mscale:.4g} for every length, or "
            f"rope_mscale: {scaling.short_set_mscale:.4g} (--rope_mscale) to give the long set the short set's"
        )
    geometry = scaling.geometry
    short = scaling.short_factors if scaling.short_factors is not None else scaling.long_factors
    parameters: dict[str, Any] = {
        "rope_type": "longrope",
        "rope_theta": geometry.rope_theta,
        "long_factor": [float(x) for x in scaling.long_factors],
        "short_factor": [float(x) for x in short],
        "original_max_position_embeddings": geometry.original_max_position_embeddings,
        "factor": scaling.scale,
        "attention_factor": scaling.mscale,
    }
    if geometry.rotary_dim != geometry.head_dim:
        parameters["partial_rotary_factor"] = geometry.rotary_dim / geometry.head_dim
    return parameters


def apply_to_config(
    config: Any, scaling: RopeScaling, allow_start_tokens: bool = False, allow_shared_mscale: bool = False
) -> Any:
    """Return a copy of ``config`` whose RoPE settings are ``scaling`` (for saving checkpoints)."""
    config = copy.deepcopy(config)
    config.rope_parameters = to_rope_parameters(scaling, allow_start_tokens, allow_shared_mscale)
    config.max_position_embeddings = scaling.max_position_embeddings
    if hasattr(config, "original_max_position_embeddings"):
        # Phi-3 keeps the pre-training window at the top level, and transformers prefers it there.
        config.original_max_position_embeddings = scaling.geometry.original_max_position_embeddings
    return config


def start_token_loss_note(scaling: RopeScaling) -> str:
    return (
        f"start_tokens = {scaling.start_tokens} dropped: a stock loader rotates positions 0..{scaling.start_tokens - 1} "
        "with the rescaled angles (and mscale) instead of the original ones, so its logits differ slightly from "
        "the LongRoPE model's; load with longrope.rope.install to keep them"
    )


def shared_mscale_loss_note(scaling: RopeScaling) -> str:
    original = scaling.geometry.original_max_position_embeddings
    return (
        f"short_mscale = {scaling.short_set_mscale:.4g} dropped: a stock loader scales sequences of at most {original} "
        f"tokens by the long set's attention_factor {scaling.mscale:.4g} instead, so its logits on them differ from "
        "the LongRoPE model's (longer sequences are unchanged); load with longrope.rope.install to keep it"
    )


def stock_loader_notes(scaling: RopeScaling) -> list[str]:
    """What a stock loader of ``scaling``'s exported config loses, one note per dropped setting."""
    notes = []
    if scaling.start_tokens:
        notes.append(start_token_loss_note(scaling))
    if has_own_short_mscale(scaling):
        notes.append(shared_mscale_loss_note(scaling))
    return notes


def export_model(
    model: Any,
    scaling: RopeScaling,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    provenance: dict[str, Any] | None = None,
    allow_start_tokens: bool = False,
    allow_shared_mscale: bool = False,
) -> list[str]:
    """Save ``model`` (weights as safetensors) with a stock ``longrope`` rope config to ``output_dir``.

    The directory appears complete or not at all (written beside it, then renamed). Returns notes for the user,
    e.g. what a stock loader loses when start tokens or the short set's own mscale were dropped. The factors file is
    saved inside as ``longrope_factors.json``.
    """
    to_rope_parameters(scaling, allow_start_tokens, allow_shared_mscale)  # refuses what is not allowed
    notes = stock_loader_notes(scaling)
    output_dir = Path(output_dir)
    staging = staging_directory(output_dir)
    original_config = model.config
    try:
        model.config = apply_to_config(original_config, scaling, allow_start_tokens, allow_shared_mscale)
        model.save_pretrained(staging, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        save(staging / FACTORS_FILE_NAME, scaling, {**(provenance or {}), "export_notes": notes})
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        model.config = original_config
    return notes


def is_close(a: RopeScaling, b: RopeScaling, rel_tol: float = 1e-9) -> bool:
    """Same factors, start tokens, mscales and lengths (up to float noise); an unset short mscale equals one set to
    the long mscale (both scale the short sequences alike)."""

    def same(x, y):
        if x is None or y is None:
            return x is y
        return len(x) == len(y) and all(math.isclose(p, q, rel_tol=rel_tol) for p, q in zip(x, y))

    return (
        a.geometry == b.geometry
        and a.max_position_embeddings == b.max_position_embeddings
        and same(a.long_factors, b.long_factors)
        and same(a.short_factors, b.short_factors)
        and a.start_tokens == b.start_tokens
        and math.isclose(a.mscale, b.mscale, rel_tol=rel_tol)
        and math.isclose(a.short_set_mscale, b.short_set_mscale, rel_tol=rel_tol)
    )


def load_for_model(
    path: str | os.PathLike,
    config: Any,
    target_length: int | None = None,
    key: str = "rope_factors_path",
    original_max_position_embeddings: int | None = None,
) -> FactorsFile:
    """Load a factors file (JSON or official CSV) and check it fits a model's RoPE geometry."""
    geometry = RopeGeometry.from_config(config, original_max_position_embeddings)
    loaded = load(path, geometry=geometry, key=key, target_length=target_length)
    file_geometry = loaded.scaling.geometry
    if file_geometry.rotary_dim != geometry.rotary_dim or file_geometry.head_dim != geometry.head_dim:
        raise LongRopeError(
            f"{key}: {path} holds factors for head_dim {file_geometry.head_dim} (rotary_dim "
            f"{file_geometry.rotary_dim}) but the model has head_dim {geometry.head_dim} (rotary_dim "
            f"{geometry.rotary_dim}); use factors for this model"
        )
    return loaded


def from_model_config(config: Any, geometry: RopeGeometry | None = None) -> RopeScaling | None:
    """The LongRoPE factors a checkpoint's config carries (``rope_type: longrope``), or None.

    The inverse of :func:`apply_to_config`: short factors equal to the long ones mean "no short set". Phi-3-small
    and PhiMoE configs carry ``long_mscale`` / ``short_mscale`` (their rotary modules apply those, not
    ``attention_factor``); when present they are the long and short sets' mscales.
    """
    from longrope.rope import longrope_scaling

    parameters = getattr(config, "rope_parameters", None) or {}
    if parameters.get("rope_type") != "longrope":
        return None
    geometry = geometry or RopeGeometry.from_config(config)
    if config.max_position_embeddings <= geometry.original_max_position_embeddings:
        raise LongRopeError(
            f"model config: rope_type longrope but max_position_embeddings {config.max_position_embeddings} is not "
            f"beyond original_max_position_embeddings {geometry.original_max_position_embeddings}; fix the config"
        )
    long_factors = parameters["long_factor"]
    short = parameters.get("short_factor")
    for key in ("long_mscale", "short_mscale"):
        value = parameters.get(key)
        if value is not None and (not _is_number(value) or not math.isfinite(value) or value <= 0):
            raise LongRopeError(
                f"model config: rope_parameters.{key} = {value!r} must be a number > 0; fix the config"
            )
    return longrope_scaling(
        geometry,
        config.max_position_embeddings,
        long_factors,
        None if short == long_factors else short,
        mscale=parameters.get("long_mscale") or parameters.get("attention_factor") or "su",
        short_mscale=parameters.get("short_mscale"),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m longrope.factors show FILE``: a factors file's settings and sha256."""
    import argparse
    import sys

    from longrope.errors import exit_on_user_error

    arguments = list(sys.argv[1:] if argv is None else argv)
    with exit_on_user_error("python -m longrope.factors"):
        if arguments[:1] == ["export"]:
            raise LongRopeError(
                "export: moved to python -m longrope.export --model_name_or_path DIR --rope_factors_path FILE "
                "--output_dir DIR (the keys every script uses)"
            )
        parser = argparse.ArgumentParser(prog="python -m longrope.factors", description=main.__doc__)
        commands = parser.add_subparsers(dest="command", required=True)
        show = commands.add_parser("show", help="print a factors file's settings and sha256")
        show.add_argument("rope_factors_path")
        args = parser.parse_args(arguments)
        loaded = load(args.rope_factors_path)
        print(json.dumps({**to_dict(loaded.scaling, loaded.provenance), "sha256": loaded.sha256}, indent=2))
        for warning in loaded.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = [
    "FactorsFile",
    "apply_to_config",
    "export_model",
    "from_dict",
    "from_model_config",
    "has_own_short_mscale",
    "is_close",
    "load",
    "load_for_model",
    "read_official_csv",
    "save",
    "stock_loader_notes",
    "to_dict",
    "to_rope_parameters",
    "write_official_csv",
]
