"""The whole LongRoPE method on the embedded tiny model, stage by stage, then the paper's claims: ``make demo``.

    python -m scripts.demo                                   # every stage into outputs/demo, then the summary
    python -m scripts.demo --profile ci --output_dir /tmp/x  # the CI-sized run (tests/test_pipeline.py)
    python -m scripts.demo --summary_only                    # re-print the claims from finished stages

What runs and what is claimed is data, ``configs/tiny/demo.yaml`` (its header describes every key): the stages, the
profiles' overrides and the claims. This module chains, runs and resumes the stages and implements the few generic
kinds of claim that file uses; it refuses a file whose claims name a stage or method the stage configs lack before
any stage runs.

Each stage is a real call of ``python -m data.prepare`` / ``search.py`` / ``train.py`` / ``evaluate.py`` (under
``torchrun`` where it has several processes) with a committed config of ``configs/tiny/``. The committed configs chain
through ``outputs/tiny/<stage>/...`` paths (each stage reads the files an earlier stage wrote there); the demo
rewrites those paths into its own output directory, so it never touches the outputs of hand-run stages, and refuses a
config that reads a stage which has not run before it. A ``data.prepare`` stage writes its dataset under
``<output_dir>/data/<stage>``, and later configs naming its committed ``dataset_path`` read it there. Every stage's
resolved config, command, log, inputs, outputs and wall time are recorded in ``<output_dir>/pipeline.json``. A
finished stage whose resolved config is unchanged is skipped, so an interrupted demo resumes where it stopped
(``--fresh`` starts over).

One script on purpose (about 640 lines): the stage runner, the claim kinds and the summary are read together when a
claim changes, and nothing else imports them.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from longrope import preloaded
from longrope.distributed import free_port
from longrope.errors import LongRopeError
from longrope.io import atomic_save_figure, atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = "configs/tiny/demo.yaml"
# Where the committed configs of the tiny demo chain their stages (another pipeline file names its own chain_prefix).
CHAIN_PREFIX = "outputs/tiny/"
ENTRIES = ("data.prepare", "search.py", "train.py", "evaluate.py")


@dataclass(frozen=True)
class Stage:
    """One step of the method: ``entry`` (a script, or ``data.prepare``) run with a committed ``config``."""

    name: str
    entry: str
    config: str
    produces: tuple[str, ...]  # files the stage must leave in its output directory
    processes: int = 1

    @property
    def output_key(self) -> str:
        return "dataset_path" if self.entry == "data.prepare" else "output_dir"

    @property
    def relative_output(self) -> str:
        # Datasets live apart from the stages' own directories, so a stage name can never collide with one.
        return f"data/{self.name}" if self.entry == "data.prepare" else self.name


@dataclass(frozen=True)
class MethodRef:
    """A method of a claim: the entry ``name`` in the results of evaluate.py stage ``stage``."""

    stage: str
    name: str
    label: str


@dataclass(frozen=True)
class Demo:
    """configs/tiny/demo.yaml, checked: claims hold MethodRefs and their texts are filled in."""

    stages: tuple[Stage, ...]
    profiles: dict[str, dict[str, dict[str, Any]]]
    claims: tuple[dict[str, Any], ...] = ()
    plot: tuple[dict[str, Any], ...] = ()
    original: int | None = None  # the base model's pre-training window (None: not read yet, see load_demo)
    chain_prefix: str = CHAIN_PREFIX  # every stage's committed output is <chain_prefix><stage name>
    base_model: str = "models/tiny"


# ---------------------------------------------------------------------------------------------------------------
# Loading demo.yaml


def _committed_config(stage: Stage) -> dict[str, Any]:
    path = ROOT / stage.config  # an absolute config path stays absolute
    if not path.is_file():
        raise LongRopeError(f"stage {stage.name}: config {stage.config} not found")
    return yaml.safe_load(path.read_text()) or {}


def _require_keys(where: str, mapping: Any, required: set[str], optional: set[str] | None = None) -> None:
    """One line naming the first missing or unknown key of ``mapping``, so a typo in demo.yaml is never ignored."""
    if not isinstance(mapping, dict):
        raise LongRopeError(f"{where}: {mapping!r} must be a mapping")
    allowed = required | (optional or set())
    missing = sorted(required - set(mapping))
    unknown = sorted(set(mapping) - allowed)
    if missing:
        raise LongRopeError(f"{where}: {missing[0]!r} is missing")
    if unknown:
        raise LongRopeError(f"{where}: unknown key {unknown[0]!r}; keys: {', '.join(sorted(allowed))}")


def _method_names(config: dict[str, Any]) -> list[str]:
    """The names evaluate.py gives the entries of ``methods``: ``name:``, or a plain entry's own string."""
    return [item if isinstance(item, str) else item.get("name") for item in config.get("methods") or []]


def original_length(model: str) -> int:
    """The pre-training window of ``model`` (a directory or hub name), read from its config."""
    import transformers

    from longrope.rope import RopeGeometry

    path = ROOT / model
    try:
        config = transformers.AutoConfig.from_pretrained(str(path) if path.exists() else model)
    except (OSError, ValueError) as error:
        raise LongRopeError(f"base_model: cannot read the config of {model!r} ({error})") from None
    return RopeGeometry.from_config(config).original_max_position_embeddings


# The keys each kind of claim needs besides claim, paper and kind (and the optional default stage of its methods).
CLAIM_KINDS: dict[str, set[str]] = {
    "below_every_other": {"method", "length"},
    "below_these": {"method", "others", "length"},
    "within_and_below": {"method", "reference", "within_percent", "below", "length"},
    "retrieval_at_least": {"method", "task", "min_accuracy_percent"},
    "retrieval_above": {"method", "task", "length"},
}
# Keys a kind of claim may leave out (besides the default stage of its methods).
OPTIONAL_CLAIM_KEYS: dict[str, set[str]] = {"retrieval_above": {"others"}}
BOUND_KEYS = ("within_percent", "min_accuracy_percent")  # what {bound} in a claim's text shows


def _method_ref(where: str, value: Any, default_stage: str | None, methods: dict[str, list[set[str]]]) -> MethodRef:
    """A claim's method (a name, or {name, stage, label}) checked against the methods its stage evaluates."""
    item = {"name": value} if isinstance(value, str) else value
    _require_keys(where, item, {"name"}, {"stage", "label"})
    stage = item.get("stage", default_stage)
    if stage not in methods:
        raise LongRopeError(f"{where}: stage {stage!r} is not an evaluate.py stage; those are: {', '.join(methods)}")
    for names in methods[stage]:
        if item["name"] not in names:
            raise LongRopeError(
                f"{where}: stage {stage} has no method named {item['name']!r}; its methods: {', '.join(sorted(names))}"
            )
    return MethodRef(stage, item["name"], item.get("label", item["name"]))


def _claim(where: str, item: Any, methods: dict[str, list[set[str]]], original: int | None) -> dict[str, Any]:
    """One claim of demo.yaml checked, its methods as MethodRefs and its text filled in."""
    kind = item.get("kind") if isinstance(item, dict) else None
    if kind not in CLAIM_KINDS:
        raise LongRopeError(f"{where}: kind {kind!r} is not one of {', '.join(CLAIM_KINDS)}")
    _require_keys(
        where, item, {"claim", "paper", "kind"} | CLAIM_KINDS[kind], {"stage"} | OPTIONAL_CLAIM_KEYS.get(kind, set())
    )
    if "task" in item:
        from longrope import retrieval

        retrieval.check_tasks([item["task"]], key=f"{where}.task")
    claim = {key: value for key, value in item.items() if key != "stage"}
    for key in ("method", "reference", "below"):
        if key in item:
            claim[key] = _method_ref(f"{where}.{key}", item[key], item.get("stage"), methods)
    if "others" in item:
        if not isinstance(item["others"], list) or not item["others"]:
            raise LongRopeError(f"{where}.others: {item['others']!r} must be a list of methods")
        claim["others"] = [
            _method_ref(f"{where}.others[{i}]", other, item.get("stage"), methods)
            for i, other in enumerate(item["others"])
        ]
    lengths = ("longest", "all") if kind == "retrieval_above" else ("longest", "original")
    if item.get("length", "longest") not in lengths:
        raise LongRopeError(f"{where}.length: {item['length']!r} must be {' or '.join(lengths)}")
    bound = None
    for key in BOUND_KEYS:
        if key in item:
            bound = item[key]
            if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 <= bound <= 100:
                raise LongRopeError(f"{where}.{key}: {bound!r} must be a percentage (a number from 0 to 100)")
    try:
        # {original} stays in the text until the window is known (the summary reads it; see load_demo).
        known = "{original}" if original is None else original
        claim["claim"] = item["claim"].format(original=known, bound="" if bound is None else f"{bound:g}%")
    except (KeyError, IndexError, ValueError) as error:
        raise LongRopeError(f"{where}.claim: only {{original}} and {{bound}} can be filled in ({error})") from None
    return claim


def load_demo(path: str | Path = DEMO_CONFIG) -> Demo:
    """Read and check a demo file: stages, profiles, and claims whose stages and methods exist in the stage configs."""
    path = ROOT / path  # an absolute path stays absolute
    if not path.is_file():
        raise LongRopeError(f"config: {path} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    _require_keys(path.name, raw, {"base_model", "stages", "profiles", "claims"}, {"plot", "chain_prefix"})
    stages = []
    for index, item in enumerate(raw["stages"] or []):
        where = f"{path.name} stages[{index}]"
        _require_keys(where, item, {"name", "entry", "config", "produces"}, {"processes"})
        if item["entry"] not in ENTRIES:
            raise LongRopeError(f"{where}: entry {item['entry']!r} is not one of {', '.join(ENTRIES)}")
        produces = tuple(item["produces"])
        stages.append(Stage(item["name"], item["entry"], item["config"], produces, item.get("processes", 1)))
    names = [stage.name for stage in stages]
    if len(set(names)) != len(names):
        raise LongRopeError(f"{path.name} stages: two stages share a name; give each a distinct name")
    profiles = {}
    for profile, overrides in (raw["profiles"] or {}).items():
        _require_keys(f"{path.name} profiles.{profile}", overrides or {}, set(), set(names))  # stage names only
        profiles[profile] = overrides or {}
    # The method names of each evaluate.py stage, as committed and under every profile: a claim must find its
    # method in each, so no profile can drop a method a claim reads.
    methods: dict[str, list[set[str]]] = {}
    for stage in stages:
        if stage.entry == "evaluate.py":
            committed = _committed_config(stage)
            variants = [committed] + [
                {**committed, **overrides.get(stage.name, {})} for overrides in profiles.values()
            ]
            methods[stage.name] = [set(_method_names(config)) for config in variants]
    # The base model's window, read here only when a claim uses it and the model is on disk: a pipeline over a
    # model not yet downloaded or converted still loads (its stages are checked and listed, a fresh clone's tests
    # load it); the summary reads the window then, when its claims are judged.
    uses_original = any(
        isinstance(item, dict) and ("{original}" in str(item.get("claim", "")) or item.get("length") == "original")
        for item in raw["claims"] or []
    )
    original = original_length(raw["base_model"]) if uses_original and (ROOT / raw["base_model"]).exists() else None
    claims = [
        _claim(f"{path.name} claims[{i}]", item, methods, original) for i, item in enumerate(raw["claims"] or [])
    ]
    plot = raw.get("plot") or []
    for index, panel in enumerate(plot):
        where = f"{path.name} plot[{index}]"
        _require_keys(where, panel, {"title", "stages"})
        _require_keys(f"{where}.stages", panel["stages"], set(), set(methods))  # evaluate.py stages only
    chain_prefix = str(raw.get("chain_prefix", CHAIN_PREFIX)).rstrip("/") + "/"
    return Demo(tuple(stages), profiles, tuple(claims), tuple(plot), original, chain_prefix, str(raw["base_model"]))


# ---------------------------------------------------------------------------------------------------------------
# Resolving and chaining configs


def _merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class ResolvedStage:
    stage: Stage
    config: dict[str, Any]
    output: Path  # the stage's output directory
    committed_output: str | None  # where its committed config writes; configs reading it are given ``output``
    reads: list[str]  # earlier stages' files it reads, relative to the demo's output directory
    processes: int  # the stage's, or its profile's ``processes``


def resolve_stage(
    stage: Stage, output_dir: Path, overrides: dict[str, Any], links: dict[str, str], prefix: str = CHAIN_PREFIX
) -> ResolvedStage:
    """The config ``stage`` runs with: the committed YAML, chained into ``output_dir``, plus the profile's overrides.

    ``links`` maps the committed output path of each earlier stage to its directory relative to ``output_dir``.
    Raises LongRopeError when the config reads ``outputs/tiny/<x>`` for a stage ``x`` not linked, or when the stage
    does not write into its own directory (the chain would break silently otherwise).
    """
    raw = _committed_config(stage)
    committed = raw.get(stage.output_key)
    committed_output = str(Path(committed)) if isinstance(committed, str) and committed else None
    if stage.entry != "data.prepare" and committed_output != prefix + stage.name:
        raise LongRopeError(
            f"stage {stage.name}: {stage.config} writes to {raw.get(stage.output_key)!r}; set {stage.output_key}: "
            f"{prefix}{stage.name} so later stages find its files"
        )
    reads: list[str] = []

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            return {key: rewrite(item) for key, item in value.items()}
        if isinstance(value, list):
            return [rewrite(item) for item in value]
        if not isinstance(value, str):
            return value
        for committed, relative in links.items():
            if value == committed or value.startswith(committed + "/"):
                reads.append(relative + value[len(committed) :])
                return str(output_dir / reads[-1])
        if value.startswith(prefix):
            source = value[len(prefix) :].split("/", 1)[0]
            raise LongRopeError(
                f"stage {stage.name}: {stage.config} reads {value}, but stage {source!r} does not run before it; "
                "reorder the stages or fix the path"
            )
        return value

    output = output_dir / stage.relative_output
    config = rewrite({key: value for key, value in raw.items() if key != stage.output_key})
    # A profile's ``processes`` is the runner's, not a config key (every entry's result is the same on 1 or N).
    overrides = dict(overrides)
    processes = overrides.pop("processes", stage.processes)
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise LongRopeError(f"stage {stage.name}: processes: {processes!r} must be a whole number >= 1")
    config = _merge({**config, stage.output_key: str(output)}, overrides)
    return ResolvedStage(stage, config, output, committed_output, reads, processes)


def resolve_stages(demo: Demo, output_dir: Path, profile: str) -> dict[str, ResolvedStage]:
    """Every stage resolved in order, each linked to the outputs of the stages before it."""
    resolved: dict[str, ResolvedStage] = {}
    links: dict[str, str] = {}
    for stage in demo.stages:
        entry = resolve_stage(stage, output_dir, demo.profiles[profile].get(stage.name, {}), links, demo.chain_prefix)
        resolved[stage.name] = entry
        if entry.committed_output:
            links[entry.committed_output] = stage.relative_output
    return resolved


def stage_command(stage: Stage, config_path: Path, processes: int) -> list[str]:
    if stage.entry == "data.prepare":
        return [sys.executable, "-m", "data.prepare", "--config", str(config_path)]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        return [*launcher, "--master_port", str(free_port()), stage.entry, "--config", str(config_path)]
    return [sys.executable, stage.entry, "--config", str(config_path)]


def resume_arguments(stage: Stage, output: Path) -> list[str]:
    """Extra arguments that let a stage killed part-way continue instead of refusing to start again."""
    if stage.entry == "search.py" and (output / "search_state.json").is_file():
        return ["--resume", "true"]  # search.py checks the state was written with the same settings
    # train.py resumes from its last complete checkpoint by itself and skips the batches already trained on (under
    # sequence parallelism too), so a fine-tune needs no extra argument.
    return []


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Running


def run_demo(
    demo: Demo,
    output_dir: Path,
    profile: str = "demo",
    *,
    fresh: bool = False,
    only: list[str] | None = None,
    echo: bool = True,
    fork_stages: bool = False,
) -> dict[str, Any]:
    """Run every stage (or the ones named in ``only``) in order; returns the manifest.

    ``fork_stages``: run the single-process stages in children forked from this process once it has imported what
    they import (longrope/preloaded.py), instead of new interpreters: about 8 s less CPU per stage. Only for a
    process that has run nothing else (the ``scripts.demo`` command): a fork must not copy torch's running threads.
    """
    if profile not in demo.profiles:
        raise LongRopeError(f"profile: {profile!r} is not one of {sorted(demo.profiles)}")
    names = [stage.name for stage in demo.stages]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise LongRopeError(f"only: unknown stage {unknown[0]!r}; stages: {', '.join(names)}")
    output_dir = output_dir.resolve()
    # Every config is resolved before the first stage runs, so a broken chain costs nothing.
    resolved = resolve_stages(demo, output_dir, profile)
    if fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    (output_dir / "configs").mkdir(parents=True, exist_ok=True)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / "pipeline.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    manifest.setdefault("stages", {})
    manifest["profile"] = profile
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("WANDB_MODE", "offline")
    started = time.monotonic()
    forkable: bool | None = None if preloaded.can_fork() else False  # None: not preloaded yet
    for stage in demo.stages:
        if only and stage.name not in only:
            continue
        entry = resolved[stage.name]
        config_path = output_dir / "configs" / f"{stage.name}.yaml"
        digest = _config_hash(entry.config)
        record = manifest["stages"].get(stage.name, {})
        outputs_exist = all((entry.output / name).exists() for name in stage.produces)
        if record.get("status") == "done" and record.get("config_sha256") == digest and outputs_exist:
            if echo:
                print(f"[demo] {stage.name}: done before, skipped", flush=True)
            continue
        header = f"# Stage {stage.name} of the LongRoPE demo ({profile}): {stage.config}, chained and resolved.\n"
        atomic_write_text(config_path, header + yaml.safe_dump(entry.config, sort_keys=False))
        command = stage_command(stage, config_path, entry.processes) + resume_arguments(stage, entry.output)
        # Two processes on a small machine: one thread each, or they fight over the cores.
        stage_env = {**env, "OMP_NUM_THREADS": "1"} if entry.processes > 1 else env
        log_path = output_dir / "logs" / f"{stage.name}.log"
        if echo:
            print(f"[demo] {stage.name}: {' '.join(command[1:])}", flush=True)
        fork = fork_stages and entry.processes == 1 and forkable is not False
        if fork and forkable is None:
            forkable = fork = preloaded.preload()  # once, before the first stage that forks
        begin = time.monotonic()
        if fork:  # the same command, in a child forked from this preloaded process
            returncode = preloaded.run_forked(command[1:], stage_env, ROOT, log_path)
        else:
            with open(log_path, "w") as log:
                completed = subprocess.run(command, cwd=ROOT, env=stage_env, stdout=log, stderr=subprocess.STDOUT)
            returncode = completed.returncode
        seconds = time.monotonic() - begin
        missing = [name for name in stage.produces if not (entry.output / name).exists()]
        record = {
            "config": stage.config,
            "resolved_config": str(config_path),
            "config_sha256": digest,
            "command": command,
            "log": str(log_path),
            "output": str(entry.output),
            "reads": entry.reads,
            "produces": list(stage.produces),
            "seconds": round(seconds, 1),
            "launched": "forked" if fork else "new interpreter",
            "status": "done" if returncode == 0 and not missing else "failed",
        }
        manifest["stages"][stage.name] = record
        atomic_write_json(manifest_path, manifest)
        if record["status"] != "done":
            tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
            print(f"[demo] {stage.name}: the end of its log:\n{tail}", file=sys.stderr, flush=True)
            reason = f"exit code {returncode}" if returncode else f"missing {missing}"
            raise LongRopeError(
                f"stage {stage.name} failed ({reason}); its log is {log_path}; fix the cause and run again (finished "
                "stages are kept)"
            )
        if echo:
            print(f"[demo] {stage.name}: {seconds:.0f} s", flush=True)
    manifest["seconds_this_run"] = round(time.monotonic() - started, 1)
    manifest["seconds_all_stages"] = round(sum(r.get("seconds") or 0.0 for r in manifest["stages"].values()), 1)
    atomic_write_json(manifest_path, manifest)
    return manifest


# ---------------------------------------------------------------------------------------------------------------
# The claims, measured on held-out documents


@dataclass
class Verdict:
    claim: str
    measured: str
    paper: str
    held: bool | None  # None: the stages it needs did not run

    def row(self) -> str:
        verdict = {True: "yes", False: "**no**", None: "not run"}[self.held]
        return f"| {self.claim} | {self.measured} | {self.paper} | {verdict} |"


def _fmt(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if math.isfinite(value) and value < 1e4 else f"{value:.3g}"


class _Results:
    """The results.json of every evaluate.py stage under ``output_dir`` (None where the stage has not run)."""

    def __init__(self, demo: Demo, output_dir: Path):
        self._demo = demo
        self.by_stage: dict[str, dict[str, Any] | None] = {}
        for stage in demo.stages:
            path = output_dir / stage.name / "results.json"
            if stage.entry == "evaluate.py":
                self.by_stage[stage.name] = json.loads(path.read_text()) if path.is_file() else None

    @functools.cached_property
    def original(self) -> int:
        return self._demo.original or original_length(self._demo.base_model)

    def methods(self, stage: str) -> list[dict[str, Any]]:
        return (self.by_stage.get(stage) or {}).get("methods", [])

    def entry(self, ref: MethodRef) -> dict[str, Any]:
        return next((entry for entry in self.methods(ref.stage) if entry["name"] == ref.name), {})

    def ppl(self, ref: MethodRef, length: int | None) -> float | None:
        value = self.entry(ref).get("perplexity", {}).get(str(length)) if length else None
        return None if value is None else float(value)

    def length(self, claim: dict[str, Any]) -> int | None:
        """The claim's evaluation length: the pre-training window, or the longest its method's stage evaluated."""
        if claim["length"] == "original":
            return self.original
        lengths = (self.by_stage.get(claim["method"].stage) or {}).get("lengths")
        return max(int(length) for length in lengths) if lengths else None

    def documents(self, stage: str) -> tuple[Any, ...]:
        """Which documents a stage read: path, count and selection seed (the token cut differs with the lengths)."""
        data = (self.by_stage.get(stage) or {}).get("data") or {}
        return tuple(data.get(key) for key in ("path", "documents", "seed"))


def _below_every_other(claim: dict[str, Any], results: _Results) -> tuple[str, bool | None]:
    method = claim["method"]
    length = results.length(claim)
    value = results.ppl(method, length)
    others = {}
    for entry in results.methods(method.stage):
        other = results.ppl(MethodRef(method.stage, entry["name"], entry["name"]), length)
        if entry["name"] != method.name and other is not None:
            others[entry["name"]] = other
    if value is None or not others:
        return "–", None
    best = min(others, key=others.get)
    measured = (
        f"{method.label} {_fmt(value)} vs best baseline {best} {_fmt(others[best])} "
        f"({100 * (1 - value / others[best]):+.1f}%) at {length}"
    )
    return measured, value < others[best]


def _below_these(claim: dict[str, Any], results: _Results) -> tuple[str, bool | None]:
    refs = [claim["method"], *claim["others"]]
    length = results.length(claim)
    values = [results.ppl(ref, length) for ref in refs]
    if None in values:
        return "–", None
    measured = ", ".join(f"{ref.label} {_fmt(value)}" for ref, value in zip(refs, values)) + f" at {length}"
    return measured, values[0] < min(values[1:])


def _within_and_below(claim: dict[str, Any], results: _Results) -> tuple[str, bool | None]:
    method, reference, below = claim["method"], claim["reference"], claim["below"]
    length = results.length(claim)
    value, base, other = (results.ppl(ref, length) for ref in (method, reference, below))
    if None in (value, base, other):
        return "–", None
    # A ratio of perplexities on different documents says nothing about the method.
    if results.documents(reference.stage) != results.documents(method.stage):
        raise LongRopeError(
            f"{reference.stage} and {method.stage} read different documents; give them the same documents"
        )
    measured = (
        f"{method.label} {_fmt(value)} vs {reference.label} {_fmt(base)} ({100 * (value / base - 1):+.1f}%), "
        f"{below.label} {_fmt(other)}"
    )
    return measured, value <= (1 + claim["within_percent"] / 100) * base and value < other


def _accuracy(results: _Results, ref: MethodRef, task: str) -> dict[int, float]:
    by_length = results.entry(ref).get("retrieval_accuracy", {}).get(task, {})
    return {int(length): float(value) for length, value in by_length.items()}


def _retrieval_at_least(claim: dict[str, Any], results: _Results) -> tuple[str, bool | None]:
    entry = results.entry(claim["method"])
    accuracy = _accuracy(results, claim["method"], claim["task"])
    needle = {int(k): float(v) for k, v in entry.get("needle_perplexity", {}).items()}
    parts = []
    if accuracy:
        parts.append(f"{claim['task']} " + ", ".join(f"{k}: {v:.0%}" for k, v in sorted(accuracy.items())))
    if needle:
        parts.append("needle PPL " + ", ".join(f"{k}: {_fmt(v)}" for k, v in sorted(needle.items())))
    held = None if not accuracy else min(accuracy.values()) >= claim["min_accuracy_percent"] / 100
    return "; ".join(parts) or "–", held


def _retrieval_above(claim: dict[str, Any], results: _Results) -> tuple[str, bool | None]:
    """The method's accuracy on the task (at the stage's longest retrieval length, or averaged over all of them)
    above each other method's: the listed ``others``, or every other method of its stage."""
    method = claim["method"]
    others = claim.get("others") or [
        MethodRef(method.stage, entry["name"], entry["name"])
        for entry in results.methods(method.stage)
        if entry["name"] != method.name
    ]
    accuracies = [_accuracy(results, ref, claim["task"]) for ref in [method, *others]]
    if not others or not all(accuracies):
        return "–", None
    if claim["length"] == "longest":
        length = max(accuracies[0])
        values, where = [acc.get(length, 0.0) for acc in accuracies], f"at {length}"
    else:
        values = [sum(acc.values()) / len(acc) for acc in accuracies]
        where = "averaged over " + ", ".join(map(str, sorted(accuracies[0])))
    labels = [ref.label for ref in [method, *others]]
    measured = f"{claim['task']}: " + ", ".join(f"{label} {value:.0%}" for label, value in zip(labels, values))
    return f"{measured} {where}", values[0] > max(values[1:])


CHECKS = {
    "below_every_other": _below_every_other,
    "below_these": _below_these,
    "within_and_below": _within_and_below,
    "retrieval_at_least": _retrieval_at_least,
    "retrieval_above": _retrieval_above,
}


def evaluate_claims(demo: Demo, output_dir: Path) -> list[Verdict]:
    """Each claim of the demo with the measured numbers and whether it held."""
    results = _Results(demo, output_dir)
    verdicts = []
    for claim in demo.claims:
        measured, held = CHECKS[claim["kind"]](claim, results)
        text = claim["claim"]
        if "{original}" in text:  # the base model was not on disk when the pipeline loaded
            text = text.replace("{original}", str(results.original))
        verdicts.append(Verdict(text, measured, claim["paper"], held))
    return verdicts


def _plot(demo: Demo, output_dir: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = _Results(demo, output_dir)
    figure, axes = plt.subplots(1, len(demo.plot), figsize=(16 * len(demo.plot) / 3, 4.6), squeeze=False)
    for axis, panel in zip(axes[0], demo.plot):
        # One line per method: a method evaluated by several of the panel's stages (8k-16k on three documents, 32k
        # on one, say) joins its points into one curve.
        lines: dict[str, dict[int, float]] = {}
        for stage, label in panel["stages"].items():
            for entry in results.methods(stage):
                points = lines.setdefault(label or entry["name"], {})
                points.update((int(k), v) for k, v in entry.get("perplexity", {}).items())
        for label, points in lines.items():
            if points:
                axis.plot(*zip(*sorted(points.items())), marker="o", label=label)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_title(panel["title"])
        axis.set_xlabel("evaluation length (tokens)")
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    axes[0][0].set_ylabel("perplexity (held-out documents)")
    figure.tight_layout()
    atomic_save_figure(figure, path)
    plt.close(figure)


def write_summary(demo: Demo, output_dir: Path, publish: Path | None = None) -> str:
    """The claims table (Markdown) with stage times; also summary.json/.md/.png in ``output_dir`` (and ``publish``)."""
    verdicts = evaluate_claims(demo, output_dir)
    manifest_path = output_dir / "pipeline.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"stages": {}}
    lines = [
        f"LongRoPE on {demo.base_model} ({manifest.get('profile', '?')} profile), held-out documents:",
        "",
        "| claim (papers.md §10) | measured here | the paper | held |",
        "|---|---|---|---|",
        *[verdict.row() for verdict in verdicts],
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {record.get('seconds', '–')} |" for name, record in manifest["stages"].items()],
        f"| **all stages** | {manifest.get('seconds_all_stages', '–')} |",
        "",
    ]
    text = "\n".join(lines)
    payload = {
        "claims": [verdict.__dict__ for verdict in verdicts],
        "stage_seconds": {name: record.get("seconds") for name, record in manifest["stages"].items()},
        "seconds_all_stages": manifest.get("seconds_all_stages"),
        "profile": manifest.get("profile"),
    }
    for directory in [output_dir] + ([publish] if publish else []):
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / "summary.md", text)
        atomic_write_json(directory / "summary.json", payload)
        if demo.plot:
            _plot(demo, output_dir, directory / "summary.png")
    return text


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", default=DEMO_CONFIG, help=f"the stages, profiles and claims (default {DEMO_CONFIG})"
    )
    parser.add_argument("--output_dir", default="outputs/demo", help="where every stage writes (default outputs/demo)")
    parser.add_argument("--profile", default="demo", help="a profile of the config: demo (full) or ci (tiny)")
    parser.add_argument("--fresh", action="store_true", help="delete output_dir first instead of resuming")
    parser.add_argument("--only", nargs="+", help="run only these stages (their inputs must exist)")
    parser.add_argument("--summary_only", action="store_true", help="only re-write the summary of finished stages")
    parser.add_argument("--publish", help="also copy summary.md/.json/.png here (make demo: docs/demo)")
    args = parser.parse_args(argv)
    output_dir = ROOT / args.output_dir  # an absolute path stays absolute
    try:
        demo = load_demo(args.config)
        if not args.summary_only:
            run_demo(demo, output_dir, args.profile, fresh=args.fresh, only=args.only, fork_stages=True)
        text = write_summary(demo, output_dir, None if args.publish is None else ROOT / args.publish)
    except LongRopeError as error:
        raise SystemExit(f"demo: error: {error}") from None
    print(text)
    return text


if __name__ == "__main__":
    main()
