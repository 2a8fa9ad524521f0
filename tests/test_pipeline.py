"""The demo pipeline: stage chaining, the claims table, and a CI-sized end-to-end run of every stage."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longrope import pipeline
from longrope.errors import LongRopeError

ROOT = Path(__file__).resolve().parents[1]


def _stage_config(tmp_path: Path, name: str, values: dict) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(values))
    return str(path)  # absolute: ROOT / absolute stays absolute


def test_a_stage_reads_earlier_stages_through_the_pipeline_directory(tmp_path):
    config = _stage_config(
        tmp_path,
        "eval",
        {
            "model_name_or_path": "outputs/tiny/finetune-8x",
            "methods": ["pi", {"name": "s", "factors_path": "outputs/tiny/search-8x/factors.json"}],
            "documents_path": "data/tiny/corpus/test-long",
            "output_dir": "outputs/tiny/eval-x",
        },
    )
    stage = pipeline.Stage("eval-x", "evaluate.py", config, ("results.json",))
    out = tmp_path / "run"
    resolved = pipeline.resolve_stage(stage, out, {"num_documents": 1}, ["search-8x", "finetune-8x"], out / "data")
    assert resolved.config["model_name_or_path"] == str(out / "finetune-8x")
    assert resolved.config["methods"][1]["factors_path"] == str(out / "search-8x/factors.json")
    assert resolved.config["methods"][0] == "pi"
    assert resolved.config["documents_path"] == "data/tiny/corpus/test-long"  # shared data stays shared
    assert resolved.config["output_dir"] == str(out / "eval-x")
    assert resolved.config["num_documents"] == 1
    assert sorted(resolved.reads) == ["finetune-8x", "search-8x/factors.json"]

    with pytest.raises(LongRopeError, match="reads outputs/tiny/search-8x/factors.json, but stage 'search-8x'"):
        pipeline.resolve_stage(stage, out, {}, ["finetune-8x"], out / "data")


def test_a_stage_writing_outside_its_own_directory_is_refused(tmp_path):
    config = _stage_config(tmp_path, "s", {"model_name_or_path": "models/tiny", "output_dir": "outputs/tiny/other"})
    stage = pipeline.Stage("search-x", "search.py", config, ("factors.json",))
    with pytest.raises(LongRopeError, match="set output_dir: outputs/tiny/search-x"):
        pipeline.resolve_stage(stage, tmp_path, {}, [], tmp_path / "data")


def test_every_shipped_stage_chains_only_backwards():
    earlier: list[str] = []
    for stage in pipeline.STAGES:
        for profile in pipeline.PROFILES.values():
            pipeline.resolve_stage(stage, Path("/x"), profile.get(stage.name, {}), earlier, Path("/x/data"))
        earlier.append(stage.name)


def _write_results(
    directory: Path,
    perplexity: dict[str, dict[int, float]],
    passkey: dict[int, float] | None = None,
    documents: int = 6,
):
    methods = []
    for name, values in perplexity.items():
        entry = {"name": name, "perplexity": {str(k): v for k, v in values.items()}}
        if passkey is not None:
            entry["passkey_accuracy"] = {str(k): v for k, v in passkey.items()}
        methods.append(entry)
    lengths = sorted({k for values in perplexity.values() for k in values})
    directory.mkdir(parents=True)
    data = {"path": "data/tiny/corpus/test-long", "documents": documents, "seed": 0}
    (directory / "results.json").write_text(json.dumps({"lengths": lengths, "methods": methods, "data": data}))


def _claims_world(
    root: Path, searched_8x: float, tuned: float, second: float, short: float, passkey: float, base_documents: int = 6
):
    # eval-8x's own "none" at 256 (2.0) must not be the reference: it read other documents than eval-64x.
    base = {m: {256: 2.0, 2048: v} for m, v in [("none", 80.0), ("pi", 9.0), ("ntk", 6.0), ("yarn", 4.4)]}
    _write_results(root / "eval-base-256", {"none": {256: 3.0}}, documents=base_documents)
    _write_results(
        root / "eval-8x", {**base, "dynamic_ntk": {256: 3.0, 2048: 5.0}, "longrope-search": {2048: searched_8x}}
    )
    _write_results(root / "eval-finetune-8x", {"longrope-search": {2048: tuned}}, {256: passkey, 2048: passkey})
    _write_results(root / "eval-finetune-8x-pi", {"pi": {2048: 5.7}})
    _write_results(root / "eval-finetune-8x-yarn", {"yarn": {2048: 3.05}})
    _write_results(
        root / "eval-64x",
        {
            "pi": {16384: 20.0},
            "yarn": {16384: 8.0},
            "longrope-second": {256: 4.0, 16384: second},
            "longrope-final": {256: short},
        },
    )


def test_the_claims_follow_the_measured_numbers(tmp_path):
    good, bad = tmp_path / "good", tmp_path / "bad"
    _claims_world(good, searched_8x=3.8, tuned=3.0, second=7.0, short=3.2, passkey=1.0)
    _claims_world(bad, searched_8x=4.5, tuned=3.1, second=9.0, short=3.5, passkey=0.5)
    assert [claim.held for claim in pipeline.evaluate_claims(good)] == [True] * 5
    assert [claim.held for claim in pipeline.evaluate_claims(bad)] == [False] * 5
    first = pipeline.evaluate_claims(good)[0]
    assert "yarn 4.400" in first.measured and "3.800" in first.measured
    assert [claim.held for claim in pipeline.evaluate_claims(tmp_path / "nothing")] == [None] * 5
    assert "short 3.200 vs base 3.000" in pipeline.evaluate_claims(good)[3].measured

    other_documents = tmp_path / "other"
    _claims_world(other_documents, 3.8, 3.0, 7.0, 3.2, 1.0, base_documents=20)
    with pytest.raises(LongRopeError, match="different documents"):
        pipeline.evaluate_claims(other_documents)


@pytest.mark.slow
@pytest.mark.distributed
def test_the_ci_sized_pipeline_runs_every_stage_and_chains_their_outputs(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "longrope.pipeline", "--profile", "ci", "--output_dir", str(out)]
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    manifest = json.loads((out / "pipeline.json").read_text())
    assert list(manifest["stages"]) == [stage.name for stage in pipeline.STAGES]
    sources = {}
    for stage in pipeline.STAGES:
        record = manifest["stages"][stage.name]
        assert record["status"] == "done", stage.name
        for name in stage.produces:
            assert (Path(record["output"]) / name).exists(), f"{stage.name} did not write {name}"
        for relative in record["reads"]:
            assert (out / relative).exists(), f"{stage.name} reads {relative}, which no stage wrote"
        sources[stage.name] = sorted({relative.split("/")[0] for relative in record["reads"]})
    assert sources == {
        "pretrain-2048": [],
        "eval-baselines": [],
        "search-8x": [],
        "eval-8x": ["search-8x"],
        "finetune-8x": ["data", "search-8x"],
        "finetune-8x-pi": ["data"],
        "finetune-8x-yarn": ["data"],
        "eval-finetune-8x": ["finetune-8x", "search-8x"],
        "eval-finetune-8x-pi": ["finetune-8x-pi"],
        "eval-finetune-8x-yarn": ["finetune-8x-yarn"],
        "search-64x-second": ["finetune-8x", "search-8x"],
        "search-short": ["finetune-8x", "search-64x-second"],
        "eval-64x": ["finetune-8x", "search-64x-second", "search-8x", "search-short"],
        "eval-base-256": [],
    }
    # The chained files really were used: the fine-tune recorded the searched factors' hash, the short stage kept
    # the second stage's long factors beside its new short ones.
    searched = json.loads((out / "search-8x/factors.json").read_text())
    tuned_inputs = json.loads((out / "finetune-8x/inputs.json").read_text())
    assert tuned_inputs["rope_factors_path"] == str(out / "search-8x/factors.json")
    second = json.loads((out / "search-64x-second/factors.json").read_text())
    final = json.loads((out / "search-short/factors.json").read_text())
    assert final["long_factors"] == second["long_factors"] != searched["long_factors"]
    assert final.get("short_factors")

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["claims"]) == 5
    assert all(claim["held"] in (True, False) for claim in summary["claims"])  # every claim measured
    assert (out / "summary.png").stat().st_size > 10_000
    assert "| claim (papers.md §10) |" in completed.stdout

    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0
    assert again.stdout.count("done before, skipped") == len(pipeline.STAGES)


def test_a_failing_stage_stops_the_pipeline_with_one_line_and_keeps_its_log(tmp_path, monkeypatch, capsys):
    config = _stage_config(tmp_path, "bad", {"sources": [{"path": "python-stdlib"}], "no_such_key": 1})
    monkeypatch.setattr(pipeline, "STAGES", (pipeline.Stage("pretrain-2048", "data.prepare", config, ("x",)),))
    with pytest.raises(LongRopeError, match=r"^stage pretrain-2048 failed \(exit code \d+\); its log is") as raised:
        pipeline.run_pipeline(tmp_path / "run", "ci", echo=False)
    assert "\n" not in str(raised.value)
    manifest = json.loads((tmp_path / "run/pipeline.json").read_text())
    assert manifest["stages"]["pretrain-2048"]["status"] == "failed"
    assert "no_such_key" in (tmp_path / "run/logs/pretrain-2048.log").read_text()
    assert "no_such_key" in capsys.readouterr().err  # the log's end is shown, outside the one-line error


def test_a_stage_killed_part_way_gets_what_it_needs_to_continue(tmp_path):
    search = pipeline.Stage("search-x", "search.py", "c.yaml", ("factors.json",), 2)
    train = pipeline.Stage("finetune-x", "train.py", "c.yaml", ("model.safetensors",), 2)
    assert pipeline.resume_arguments(search, tmp_path) == []
    (tmp_path / "search_state.json").write_text("{}")
    assert pipeline.resume_arguments(search, tmp_path) == ["--resume", "true"]
    (tmp_path / "checkpoint-50").mkdir()
    # train.py resumes by itself and skips the batches already trained on, also under sequence parallelism.
    assert pipeline.resume_arguments(train, tmp_path) == []
