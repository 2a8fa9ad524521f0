"""The one config parser of every entry point: ``--config file.yaml`` plus command-line overrides, one-line errors.

A config is read by TRL's ``TrlParser`` into the dataclasses of :mod:`longrope.args`: the YAML sets defaults,
command-line flags override them (``--learning_rate 1e-3``). Unknown keys are errors (with the closest known key), a
renamed key names its new name, a wrong type is one line instead of argparse's whole usage, and every cross-field check
raises a ``LongRopeError`` line naming the key and the fix. ``resolved_config`` writes back what a run used.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import os
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from longrope.args import RENAMED_KEYS
from longrope.errors import LongRopeError


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _dataclass_keys(dataclass_types: Sequence[type]) -> set[str]:
    return {f.name for cls in dataclass_types for f in fields(cls) if f.init}


def _unknown_key(
    key: str, known: set[str], renamed: Mapping[str, str], where: str, flag: bool = False
) -> LongRopeError:
    dashes = "--" if flag else ""
    if key in renamed and renamed[key] in known:
        return LongRopeError(f"{where}{dashes}{key}: renamed to {dashes}{renamed[key]}; use {dashes}{renamed[key]}")
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.75)
    hint = f" (did you mean '{dashes}{close[0]}'?)" if close else ""
    what = "argument" if flag else "key"
    return LongRopeError(f"{where}unknown {what} '{dashes}{key}'{hint}; remove it or fix it")


def read_config_file(
    path: str | os.PathLike, dataclass_types: Sequence[type], renamed: Mapping[str, str] = RENAMED_KEYS
) -> dict[str, Any]:
    """The YAML mapping at ``path``, checked against the keys of ``dataclass_types`` (plus TRL's ``env``)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LongRopeError(f"--config {path}: no such file; pass the path of a YAML config")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path} line {mark.line + 1}" if mark is not None else str(path)
        raise LongRopeError(
            f"{where}: invalid YAML ({getattr(error, 'problem', None) or _first_line(error)})"
        ) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise LongRopeError(f"{path}: must be a mapping of key: value lines, got {type(config).__name__}")
    known = _dataclass_keys(dataclass_types) | {"env"}
    for key in config:
        if key not in known:
            raise _unknown_key(str(key), known, renamed, f"{path}: ")
    return config


def _command_line_keys(argv: Sequence[str]) -> list[str]:
    return [item[2:].split("=", 1)[0] for item in argv if item.startswith("--") and len(item) > 2]


def _parser_type() -> type:
    """TRL's TrlParser whose argparse errors become one LongRopeError line (argparse would print its whole usage,
    one line per key, before the line that matters)."""
    from trl import TrlParser

    class OneLineParser(TrlParser):
        def error(self, message: str) -> None:  # argparse's hook for every parsing error
            if message.startswith("argument --"):
                key, _, problem = message[len("argument --") :].partition(": ")
                raise LongRopeError(f"{key.split('/')[0].strip()}: {problem}")
            raise LongRopeError(f"command line: {message}")

    return OneLineParser


def parse_config(
    dataclass_types: Sequence[type], argv: Sequence[str] | None = None, renamed: Mapping[str, str] = RENAMED_KEYS
) -> tuple[Any, ...]:
    """Instances of ``dataclass_types`` from ``--config file.yaml`` plus command-line overrides (TRL's TrlParser).

    Every problem (missing file, unknown or renamed key, bad value, failed cross-field check) is one LongRopeError
    line. ``renamed`` maps old key names to the new ones (an entry point with its own history adds to it).
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise LongRopeError("--config: give the path of a YAML config after it")
        read_config_file(argv[index + 1], dataclass_types, renamed)
    known = _dataclass_keys(dataclass_types) | {"config"}
    for key in _command_line_keys(argv):
        negated = key.startswith("no_") and key[3:] in known  # argparse's --no_<flag> for a default-true flag
        if key not in known and not negated:
            raise _unknown_key(key, known, renamed, "command line: ", flag=True)
    parser = _parser_type()(dataclass_types)
    try:
        return tuple(parser.parse_args_and_config(argv))
    except LongRopeError:
        raise
    except (ValueError, TypeError, argparse.ArgumentError) as error:
        raise LongRopeError(f"configuration: {_first_line(error)}") from None


def _yaml_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _yaml_safe(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _yaml_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_yaml_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def resolved_config(*arguments: Any) -> dict[str, Any]:
    """One flat mapping of every key of the given argument dataclasses, ready for ``yaml.safe_dump``.

    Credentials never leave the process: every ``*_token`` key (hub tokens) is dropped.
    """
    merged: dict[str, Any] = {}
    for instance in arguments:
        values = instance.to_dict() if hasattr(instance, "to_dict") else dataclasses.asdict(instance)
        for key, value in values.items():
            if key.endswith("_token") or key in ("hub_token", "push_to_hub_token"):
                continue
            merged[key] = _yaml_safe(value)
    return merged
