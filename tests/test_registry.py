"""A RoPE method is added in one place: registered once, evaluate.py, search.py, train.py and the export accept it."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import TINY_WORLD_ORIGINAL, TINY_WORLD_TARGET, user_error

import evaluate
import search
import train
from longrope import export, rope
from longrope.errors import LongRopeError

ORIGINAL = TINY_WORLD_ORIGINAL
TARGET = TINY_WORLD_TARGET


def half_pi_scaling(geometry: rope.RopeGeometry, target_length: int, mscale=None, **_) -> rope.RopeScaling:
    """A throwaway method: PI at half the scale (never below extrapolation)."""
    pi = rope.pi_scaling(geometry, target_length, mscale=mscale)
    return pi.replace(method="half_pi", long_factors=tuple(max(1.0, value / 2) for value in pi.long_factors))


@pytest.fixture
def half_pi():
    entry = rope.register_method(rope.RopeMethod("half_pi", half_pi_scaling, "PI at half scale", search_seed=True))
    yield entry
    rope.unregister_method("half_pi")


@pytest.fixture
def world(tiny_world):
    return tiny_world


def _config(path, values: dict):
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_a_registered_method_is_evaluated(world, tmp_path, half_pi):
    config = {
        "model_name_or_path": str(world / "model"),
        "methods": ["none", "pi", "half_pi"],
        "lengths": [TARGET],
        "documents_path": str(world / "docs"),
        "output_dir": str(tmp_path / "eval"),
    }
    results = evaluate.main(["--config", _config(tmp_path / "eval.yaml", config)])
    ppl = {entry["name"]: entry["perplexity"][str(TARGET)] for entry in results["methods"]}
    assert set(ppl) == {"none", "pi", "half_pi"} and len(set(ppl.values())) == 3


def test_a_registered_method_seeds_the_search(world, tmp_path, half_pi):
    config = {
        "model_name_or_path": str(world / "model"),
        "target_length": TARGET,
        "documents_path": str(world / "docs"),
        "num_documents": 2,
        "evolution": {
            "population_size": 4,
            "num_mutations": 2,
            "num_crossovers": 2,
            "num_parents": 2,
            "num_generations": 1,
        },
        "output_dir": str(tmp_path / "search"),
    }
    summary = search.main(["--config", _config(tmp_path / "search.yaml", config)])
    assert set(summary["seed_fitness"]) == {"pi", "ntk", "yarn", "half_pi"}


def test_a_registered_method_trains_and_exports(world, tmp_path, half_pi):
    from transformers import AutoConfig

    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL)
    expected = list(half_pi_scaling(geometry, TARGET).long_factors)
    config = {
        "model_name_or_path": str(world / "model"),
        "rope_method": "half_pi",
        "target_length": TARGET,
        "dataset_path": str(world / "rows"),
        "output_dir": str(tmp_path / "train"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
    }
    train.main(["--config", _config(tmp_path / "train.yaml", config)])
    trained = AutoConfig.from_pretrained(tmp_path / "train").rope_parameters
    assert trained["rope_type"] == "longrope" and trained["long_factor"] == pytest.approx(expected, rel=1e-12)
    export.main(
        [
            "--model_name_or_path",
            str(world / "model"),
            "--rope_method",
            "half_pi",
            "--target_length",
            str(TARGET),
            "--output_dir",
            str(tmp_path / "export"),
        ]
    )
    exported = json.loads((tmp_path / "export" / "config.json").read_text())["rope_parameters"]
    assert exported["long_factor"] == pytest.approx(expected, rel=1e-12)


def test_unknown_methods_list_the_registered_ones(world, tmp_path, capsys, half_pi):
    config = {
        "model_name_or_path": str(world / "model"),
        "methods": ["half_pie"],
        "lengths": [TARGET],
        "documents_path": str(world / "docs"),
        "output_dir": str(tmp_path / "eval"),
    }
    line = user_error(capsys, evaluate.main, ["--config", _config(tmp_path / "eval.yaml", config)])
    assert "'half_pie' is not a RoPE method; use one of none, pi, ntk, dynamic_ntk, yarn, longrope, half_pi" in line


def test_a_method_name_is_registered_once(half_pi):
    with pytest.raises(LongRopeError, match="'half_pi' is already registered"):
        rope.register_method(rope.RopeMethod("half_pi", half_pi_scaling, "again"))
    with pytest.raises(LongRopeError, match="'linear' is already registered"):
        rope.register_method(rope.RopeMethod("my_pi", half_pi_scaling, "alias clash", aliases=("linear",)))
