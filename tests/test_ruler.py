"""lm-eval's RULER tasks through evaluate.py on a tiny random Llama: offline subset, per-length averages, bad input."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import user_error

import evaluate
from longrope import ruler
from longrope.errors import LongRopeError


def write_config(tiny_world, tmp_path, **overrides) -> Path:
    config = {
        "model_name_or_path": str(tiny_world / "model"),
        "methods": ["none", "yarn"],
        "output_dir": str(tmp_path / "out"),
    }
    config.update(overrides)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_offline_ruler_tasks_through_evaluate(tiny_world, tmp_path):
    pytest.importorskip("wonderwords", reason="every lm-eval RULER task imports wonderwords (pip install wonderwords)")
    tasks = ["niah_single_1", "niah_multikey_2"]
    config = write_config(
        tiny_world, tmp_path, methods=["yarn"], ruler_tasks=tasks, ruler_lengths=[640], lm_eval_limit=1
    )
    evaluate.main(["--config", str(config)])
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [entry["name"] for entry in saved["methods"]] == ["yarn"]
    for entry in saved["methods"]:
        result = entry["ruler"]
        assert set(result["scores"]) == set(tasks)
        for task in tasks:
            assert set(result["scores"][task]) == {"640"}
            assert all(0.0 <= v <= 1.0 for v in result["scores"][task].values())
            assert result["samples"][task] == {"640": 1}
        for length in ("640",):
            expected = statistics.fmean(result["scores"][task][length] for task in tasks)
            assert result["average"][length] == pytest.approx(expected)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| method | task | 640 |" in table
    assert re.search(r"\| yarn \| average \| [0-9.]+ \|", table), table
    assert "| yarn | niah_multikey_2 |" in table


def test_each_length_is_evaluated_with_one_factor_set(tiny_world, monkeypatch):
    pytest.importorskip("wonderwords", reason="every lm-eval RULER task imports wonderwords (pip install wonderwords)")
    import lm_eval
    import transformers

    from longrope import rope

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_world / "model").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_world / "model")
    geometry = rope.RopeGeometry.from_config(model.config)
    original = geometry.original_max_position_embeddings
    pairs = geometry.num_pairs
    rope.install(model, rope.longrope_scaling(geometry, 4 * original, [4.0] * pairs, short_factors=[1.0] * pairs))
    seen = {}

    def recording_evaluate(**kwargs):
        length = kwargs["task_manager"].metadata["max_seq_lengths"][0]
        seen[length] = {module.selection for module in rope.installed_modules(model)}
        return {"samples": {task: [] for task in kwargs["tasks"]}}

    monkeypatch.setattr(lm_eval, "simple_evaluate", recording_evaluate)
    ruler.run_ruler(model, tokenizer, ["niah_single_1"], [original, 2 * original])
    assert seen == {original: {"short"}, 2 * original: {"long"}}
    assert {module.selection for module in rope.installed_modules(model)} == {"auto"}


def test_per_length_scores_come_from_the_samples_at_any_length():
    """Lengths outside the YAMLs' 4096..131072 metric list (here 262144) are scored like any other."""
    samples = [
        {"doc": {"max_length": 262144}, "262144": 1.0, "4096": -1.0},
        {"doc": {"max_length": 262144}, "262144": 0.5, "4096": -1.0},
        {"doc": {"max_length": 4096}, "4096": 0.0},
    ]
    assert ruler.sample_scores(samples) == {262144: [1.0, 0.5], 4096: [0.0]}


def test_offline_subset_is_every_task_without_a_download():
    assert ruler.OFFLINE_TASKS == (
        "niah_single_1",
        "niah_multikey_2",
        "niah_multikey_3",
        "ruler_vt",
        "ruler_cwe",
        "ruler_fwe",
    )


def test_the_task_table_matches_the_installed_lm_eval():
    manager = ruler._task_manager({})
    assert sorted(ruler.TASKS) == sorted(manager.all_subtasks)


def test_missing_download_is_one_line_naming_task_and_resource(monkeypatch):
    monkeypatch.setitem(ruler.RESOURCES, "essays", _present(ruler.RESOURCES["essays"], False))
    monkeypatch.setitem(ruler.RESOURCES, "wonderwords", _present(ruler.RESOURCES["wonderwords"]))
    with pytest.raises(LongRopeError) as error:
        ruler.check_resources(["niah_single_1", "niah_single_2"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("ruler_tasks: niah_single_2 needs the Paul Graham essays")
    assert "ruler_allow_downloads: true" in message and "offline subset: niah_single_1, " in message
    # Allowed downloads are not checked; the QA JSON is never cached, so offline it is always missing.
    ruler.check_resources(["niah_single_2"], allow_downloads=True)
    with pytest.raises(LongRopeError, match="ruler_qa_squad needs the SQuAD v2 dev JSON"):
        ruler.check_resources(["ruler_qa_squad"])


def test_missing_package_is_refused_before_anything_runs(tiny_world, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(ruler.RESOURCES, "wonderwords", _present(ruler.RESOURCES["wonderwords"], False))
    config = write_config(tiny_world, tmp_path, ruler_tasks=["ruler_vt"], ruler_lengths=[1024])
    line = user_error(capsys, evaluate.main, ["--config", str(config)])
    assert "ruler_tasks: ruler_vt needs the wonderwords package" in line and "pip install wonderwords" in line


def _present(resource, value=True):
    return ruler.Resource(resource.what, resource.fix, resource.network, lambda: value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"ruler_tasks": ["vt"], "ruler_lengths": [4096]},
            r"ruler_tasks: 'vt' is not a RULER task; pick from niah_single_1, .*ruler_vt.* \(offline: niah_single_1",
        ),
        ({"ruler_tasks": ["ruler_vt"]}, "ruler_lengths: required with ruler_tasks"),
        ({"ruler_lengths": [4096]}, "ruler_tasks: required with ruler_lengths"),
        ({"ruler_tasks": ["ruler_vt"], "ruler_lengths": [1]}, r"ruler_lengths: \[1\] must be token counts >= 2"),
        ({}, "lengths: nothing to evaluate; set .*ruler_tasks"),
    ],
)
def test_bad_ruler_keys_are_one_line(tiny_world, tmp_path, capsys, overrides, message):
    line = user_error(capsys, evaluate.main, ["--config", str(write_config(tiny_world, tmp_path, **overrides))])
    assert re.search(message, line), line


def test_ruler_keys_parse():
    from longrope.config_parser import parse_config

    argv = [
        "--model_name_or_path",
        "m",
        "--output_dir",
        "out",
        "--ruler_tasks",
        "niah_single_1",
        "ruler_vt",
        "--ruler_lengths",
        "4096",
    ]
    _, _, args = parse_config(evaluate.CONFIG_KEYS, argv)
    assert args.ruler_tasks == ["niah_single_1", "ruler_vt"] and args.ruler_lengths == [4096]
    assert args.ruler_allow_downloads is False and args.all_lengths == [4096]
