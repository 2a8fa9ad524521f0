"""search.py on a tiny random model: outputs, stages, 2 evaluators, SIGKILL + resume, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config, user_error

import search
from longrope import factors, rope
from longrope.args import RopeArguments
from longrope.errors import LongRopeError
from longrope.search_stages import SearchArguments, plan_stage, stretch_factors

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = 64
SMALL_EVOLUTION = {
    "population_size": 8,
    "num_mutations": 4,
    "num_crossovers": 4,
    "num_parents": 4,
    "num_generations": 3,
    "wave_size": 4,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Llama (window 64) and a documents dataset with a few long documents."""
    import datasets
    import transformers

    from longrope.data import save_dataset_atomically

    root = tmp_path_factory.mktemp("search_world")
    torch.manual_seed(0)
    config = tiny_config(
        "llama",
        vocab_size=64,
        head_dim=32,
        max_position_embeddings=ORIGINAL,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    generator = torch.Generator().manual_seed(1)
    # Structured text (a repeating pattern with noise) so positions matter to the model's loss.
    docs = []
    for n in (300, 600, 700, 800, 200, 900):
        pattern = torch.randint(3, 64, (17,), generator=generator)
        doc = pattern.repeat(n // 17 + 1)[:n]
        noise = torch.rand(n, generator=generator) < 0.1
        doc[noise] = torch.randint(3, 64, (int(noise.sum()),), generator=generator)
        docs.append(doc.tolist())
    dataset = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": docs})})
    save_dataset_atomically(dataset, root / "docs", {"documents": len(docs)})
    return root


def write_config(world, tmp_path, **overrides) -> Path:
    config = {
        "model_name_or_path": str(world / "model"),
        "target_length": 4 * ORIGINAL,
        "documents_path": str(world / "docs"),
        "num_documents": 3,
        "output_dir": str(tmp_path / "out"),
        "evolution": dict(SMALL_EVOLUTION),
    }
    config.update(overrides)
    path = tmp_path / "search.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_search_writes_factors_that_beat_its_seeds(world, tmp_path):
    summary = search.main(["--config", str(write_config(world, tmp_path))])
    out = tmp_path / "out"
    for name in ("factors.json", "result_final.csv", "generations.json", "search_state.json", "factors.png"):
        assert (out / name).exists(), name
    loaded = factors.load(out / "factors.json")
    long_factors = loaded.scaling.long_factors
    assert all(a <= b for a, b in zip(long_factors, long_factors[1:])), "monotone non-decreasing"
    assert loaded.scaling.max_position_embeddings == 4 * ORIGINAL
    assert set(summary["seed_fitness"]) == {"pi", "ntk", "yarn"}
    assert summary["best_fitness"] <= min(summary["seed_fitness"].values())
    provenance = loaded.provenance
    assert provenance["fitness"] == summary["best_fitness"] and len(provenance["samples_sha256"]) == 64
    assert provenance["settings"]["population_size"] == 8
    report = json.loads((out / "generations.json").read_text())
    assert [g["generation"] for g in report["generations"]] == [0, 1, 2, 3]
    assert report["generations"][0]["population"][0]["origin"] == "seed:pi"
    # Fast mode breeds each generation's 8 children in 2 waves of 4; the log has one entry per generation.
    for entry in report["generations"][1:]:
        waves = entry["waves"]
        assert [w["wave"] for w in waves] == [0, 1] and len(entry["population"]) == entry["evaluated"] <= 8
        assert waves[0]["total_tokens"] < waves[1]["total_tokens"] == entry["total_tokens"]
        assert waves[1]["best_fitness"] == entry["best_fitness"] <= waves[0]["best_fitness"]
    csv_values = [float(line) for line in (out / "result_final.csv").read_text().split()]
    assert csv_values == pytest.approx(list(long_factors))
    # The fitness is the perplexity of the model with those factors on the samples: recompute it independently.
    from longrope.documents import select_documents

    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(world / "model").eval()
    rope.install(model, loaded.scaling)
    samples, _ = select_documents(str(world / "docs"), 4 * ORIGINAL, 3, 0)
    with torch.no_grad():
        losses = [model(torch.tensor([s]), labels=torch.tensor([s])).loss.item() for s in samples]
    assert math.exp(sum(losses) / len(losses)) == pytest.approx(summary["best_fitness"], rel=1e-4)


def _run(args: list[str], env_extra: dict | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs)


@pytest.mark.distributed
def test_two_evaluators_give_the_result_of_one(world, tmp_path):
    single = write_config(world, tmp_path / "one", output_dir=str(tmp_path / "one" / "out"))
    double = write_config(world, tmp_path / "two", output_dir=str(tmp_path / "two" / "out"))
    one = _run([sys.executable, "search.py", "--config", str(single)])
    two = _run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "search.py", "--config", str(double)]
    )
    for process in (one, two):
        output = process.communicate(timeout=600)[0].decode()
        assert process.returncode == 0, output[-3000:]
    a = factors.load(tmp_path / "one" / "out" / "factors.json")
    b = factors.load(tmp_path / "two" / "out" / "factors.json")
    assert a.scaling.long_factors == b.scaling.long_factors
    assert a.provenance["fitness"] == b.provenance["fitness"]
    history_a = json.loads((tmp_path / "one" / "out" / "generations.json").read_text())
    history_b = json.loads((tmp_path / "two" / "out" / "generations.json").read_text())
    assert [g["population"] for g in history_a["generations"]] == [g["population"] for g in history_b["generations"]]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["paper", "fast"])
def test_sigkill_and_resume_give_the_uninterrupted_factors(world, tmp_path, mode):
    evolution = {**SMALL_EVOLUTION, "num_generations": 6, "mode": mode}
    reference_cfg = write_config(
        world, tmp_path / "ref", output_dir=str(tmp_path / "ref" / "out"), evolution=evolution
    )
    killed_cfg = write_config(world, tmp_path / "kill", output_dir=str(tmp_path / "kill" / "out"), evolution=evolution)
    reference = _run([sys.executable, "search.py", "--config", str(reference_cfg)])
    assert reference.wait(timeout=600) == 0, reference.stdout.read().decode()[-2000:]

    state = tmp_path / "kill" / "out" / "search_state.json"
    kills = 0
    # Three kills at points that move with each attempt, then a run to the end: each relaunch pays the whole
    # start-up (imports, model load), so killing after every generation would cost more without testing more.
    for attempt in range(4):
        process = _run([sys.executable, "search.py", "--config", str(killed_cfg), "--resume", "true"])
        if attempt == 3:
            process.wait(timeout=600)
            break
        # Let it make progress, then kill it hard at a point that moves with each attempt.
        deadline = time.time() + 60
        before = json.loads(state.read_text())["evolution"]["generation"] if state.exists() else -1
        while time.time() < deadline and process.poll() is None:
            now = json.loads(state.read_text())["evolution"]["generation"] if state.exists() else -1
            if now > before:
                time.sleep(0.05 * (attempt % 4))
                break
            time.sleep(0.02)
        if process.poll() is not None:
            break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        kills += 1
    assert process.returncode == 0, process.stdout.read().decode()[-2000:]
    assert kills >= 2, "the test must really kill the search mid-run"
    a = factors.load(tmp_path / "ref" / "out" / "factors.json")
    b = factors.load(tmp_path / "kill" / "out" / "factors.json")
    assert a.scaling.long_factors == b.scaling.long_factors
    assert a.provenance["fitness"] == b.provenance["fitness"]


def test_second_stage_is_seeded_with_stretched_factors(world, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model")
    geometry = rope.RopeGeometry.from_config(model.config)
    first = rope.longrope_scaling(geometry, 4 * ORIGINAL, [1.0 + 0.2 * i for i in range(16)])
    path = tmp_path / "first.json"
    factors.save(path, first)
    args = SearchArguments(stage="second", documents_path="x", num_documents=1, output_dir="o", evolution={})
    plan = plan_stage(args, RopeArguments(target_length=8 * ORIGINAL, rope_factors_path=str(path)), model.config)
    stretched = plan.seeds["finetuned_stretched"].factors
    assert stretched == pytest.approx(stretch_factors(first.long_factors, 4.0, 8.0))
    assert stretched[0] == pytest.approx(1.0) and stretched[-1] == pytest.approx(1 + 3.0 * 7 / 3)
    assert {"pi", "ntk", "yarn"} <= set(plan.seeds) and plan.scale == 8.0
    with pytest.raises(LongRopeError, match="the second stage starts from the fine-tuned model's factors"):
        plan_stage(
            SearchArguments(stage="second", documents_path="x", num_documents=1, output_dir="o", evolution={}),
            RopeArguments(target_length=512),
            model.config,
        )


def test_short_stage_writes_short_factors_beside_the_long_ones(world, tmp_path, capsys):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model")
    geometry = rope.RopeGeometry.from_config(model.config)
    long_scaling = rope.longrope_scaling(geometry, 8 * ORIGINAL, [1.0 + 0.45 * i for i in range(16)])
    path = tmp_path / "long.json"
    factors.save(path, long_scaling)
    config = write_config(world, tmp_path, stage="short", target_length=ORIGINAL, rope_factors_path=str(path))
    search.main(["--config", str(config)])
    loaded = factors.load(tmp_path / "out" / "factors.json")
    result = loaded.scaling
    assert result.long_factors == long_scaling.long_factors
    assert result.max_position_embeddings == 8 * ORIGINAL
    assert result.short_factors is not None and max(result.short_factors) <= max(1.25, 0.25 * 8) + 1e-9
    # The long mscale stays the input's (value and policy); the short set gets the rule's: this checkpoint's config
    # has no longrope factors, so the original RoPE's 1.0.
    assert (result.mscale, result.mscale_policy) == (long_scaling.mscale, "su") and result.mscale > 1.1
    assert result.short_mscale == 1.0 and "original RoPE" in loaded.provenance["short_mscale_source"]
    beyond = write_config(
        world, tmp_path, stage="short", target_length=128, rope_factors_path=str(path), output_dir=str(tmp_path / "o2")
    )
    assert "beyond the original window 64" in user_error(capsys, search.main, ["--config", str(beyond)])


def test_non_finite_fitness_is_recorded_as_inf_and_the_search_goes_on(world, tmp_path, monkeypatch):
    from longrope import searcher

    original = searcher.Fitness.sample_nll
    calls = {"n": 0}

    def sometimes_nan(self, index):
        calls["n"] += 1
        return float("nan") if calls["n"] % 5 == 0 else original(self, index)

    monkeypatch.setattr(searcher.Fitness, "sample_nll", sometimes_nan)
    summary = search.main(["--config", str(write_config(world, tmp_path))])
    report = json.loads((tmp_path / "out" / "generations.json").read_text())
    fitnesses = [p["fitness"] for g in report["generations"] for p in g["population"]]
    assert math.inf in fitnesses
    assert math.isfinite(summary["best_fitness"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"target_length": ORIGINAL}, "target_length: 64 must be larger than the original length 64"),
        ({"num_documents": 6}, r"5 documents have >= 256 tokens, 6 needed \(longest: 900\)"),
        ({"target_length": 2000}, r"0 documents have >= 2000 tokens, 3 needed \(longest: 900\)"),
        ({"evolution": {"rotary_dim": 8}}, "evolution.rotary_dim: derived from the model"),
        (
            {"evolution": {**SMALL_EVOLUTION, "variant": "lambda_start", "start_token_choices": [0, 4, 300]}},
            "300 start tokens is not below the sample length 256",
        ),
        ({"rope_mscale": "hot"}, "rope_mscale: 'hot' is not a number or one of su, yarn, none"),
        ({"stage": "third"}, "stage: 'third' is not one of first, second, short"),
        ({"num_samples": 3}, "num_samples: renamed to num_documents"),
        ({"mscale": "su"}, "mscale: renamed to rope_mscale"),
        ({"rope_method": "pi"}, "rope_method: search.py always searches LongRoPE factors"),
        ({"evolution": {"num_samples": 2}}, "evolution.num_samples: set num_documents at the top level"),
    ],
)
def test_bad_input_is_one_line(world, tmp_path, capsys, overrides, message):
    line = user_error(capsys, search.main, ["--config", str(write_config(world, tmp_path, **overrides))])
    assert re.search(message, line), line
    assert not (tmp_path / "out").exists(), "a refused search writes nothing"


def test_resume_refuses_a_different_config_and_writes_nothing(world, tmp_path, capsys):
    search.main(["--config", str(write_config(world, tmp_path))])
    finished = {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir() if path.is_file()}
    again = ["--config", str(write_config(world, tmp_path))]
    assert "already holds a search; pass --resume true" in user_error(capsys, search.main, again)
    changed = write_config(world, tmp_path, evolution={**SMALL_EVOLUTION, "mutation_prob": 0.5})
    assert "differs in: mutation_prob" in user_error(
        capsys, search.main, ["--config", str(changed), "--resume", "true"]
    )
    longer = ["--config", str(write_config(world, tmp_path, target_length=300)), "--resume", "true"]
    assert "different samples_sha256, target_length" in user_error(capsys, search.main, longer)
    # The refused runs left the finished search's files (its config.yaml included) as they were.
    assert {path.name: path.read_bytes() for path in (tmp_path / "out").iterdir() if path.is_file()} == finished


def test_wandb_gets_generations_factor_curve_and_artifact(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    search.main(["--config", str(write_config(world, tmp_path, report_to="wandb", run_name="tiny-search"))])
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files)
    assert any(name.startswith("factors_curve") and name.endswith(".png") for name in files)


def test_short_stage_seeds_stay_under_the_cap_and_include_the_trained_factors(world, tmp_path):
    import transformers

    config = transformers.AutoConfig.from_pretrained(world / "model")
    geometry = rope.RopeGeometry.from_config(config)
    # Long factors above their scale (the space reaches 1.25 s): compressed naively they would pass the cap.
    long_scaling = rope.longrope_scaling(geometry, 8 * ORIGINAL, [1.0 + 0.6 * i for i in range(16)])
    path = tmp_path / "long.json"
    factors.save(path, long_scaling)
    trained = [1.0 + 0.1 * i for i in range(16)]
    config.max_position_embeddings = 8 * ORIGINAL  # as a fine-tuned checkpoint's config says
    config.rope_parameters = {
        **(config.rope_parameters or {}),
        "rope_type": "longrope",
        "long_factor": trained,
        "short_factor": trained,
        "original_max_position_embeddings": ORIGINAL,
    }
    args = SearchArguments(stage="short", documents_path="x", num_documents=1, output_dir="o", evolution={})
    plan = plan_stage(args, RopeArguments(target_length=ORIGINAL, rope_factors_path=str(path)), config)
    cap = max(1.25, 0.25 * 8)
    assert max(long_scaling.long_factors) > 8  # the input really exceeds its scale
    for name, seed in plan.seeds.items():
        assert max(seed.factors) <= cap + 1e-9, name
    assert plan.seeds["trained"].factors == tuple(min(v, cap) for v in trained)


def test_second_stage_seeds_from_factors_above_their_scale_fit_the_new_space(world, tmp_path):
    import transformers

    from longrope.evolution import EvolutionSearch
    from longrope.search_stages import evolution_config, seeds_within_space

    config = transformers.AutoConfig.from_pretrained(world / "model")
    geometry = rope.RopeGeometry.from_config(config)
    # 4x factors reaching 1.25 s = 5: stretched linearly to 32x the last one lands at 1 + 4 * 31 / 3 > 1.25 * 32.
    first = rope.longrope_scaling(geometry, 4 * ORIGINAL, [1.0 + 4.0 * i / 15 for i in range(16)])
    path = tmp_path / "first.json"
    factors.save(path, first)
    args = SearchArguments(stage="second", documents_path="x", num_documents=1, output_dir="o", evolution={})
    plan = plan_stage(args, RopeArguments(target_length=32 * ORIGINAL, rope_factors_path=str(path)), config)
    evolution = evolution_config(args, plan)
    assert max(plan.seeds["finetuned_stretched"].factors) > evolution.space.factor_max  # the raw stretch overshoots
    with pytest.raises(LongRopeError, match="outside"):
        EvolutionSearch(evolution, plan.seeds)
    seeds = seeds_within_space(plan.seeds, evolution)
    search = EvolutionSearch(evolution, seeds)  # accepted
    stretched = seeds["finetuned_stretched"].factors
    assert max(stretched) == evolution.space.factor_max and list(stretched) == sorted(stretched)
    assert [candidate.key for candidate in search.ask()] == [search.project(seed).key for seed in seeds.values()]


def _fine_tuned_config(world, attention_factor: float, **mscales):
    """The world model's config as a fine-tune at 8x with ``attention_factor`` would save it."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(world / "model")
    config.max_position_embeddings = 8 * ORIGINAL
    trained = [1.0 + 0.1 * i for i in range(16)]
    config.rope_parameters = {
        **(config.rope_parameters or {}),
        "rope_type": "longrope",
        "long_factor": trained,
        "short_factor": trained,
        "original_max_position_embeddings": ORIGINAL,
        "attention_factor": attention_factor,
        **mscales,
    }
    return config


def test_short_stage_mscale_rule_and_rope_mscale(world, tmp_path):
    from longrope.evolution import Candidate
    from longrope.search_stages import scaling_for

    geometry = rope.RopeGeometry.from_config(_fine_tuned_config(world, 1.0))
    long_scaling = rope.longrope_scaling(geometry, 64 * ORIGINAL, [1.0 + 3.0 * i for i in range(16)])
    path = tmp_path / "long.json"
    factors.save(path, long_scaling)
    args = SearchArguments(stage="short", documents_path="x", num_documents=1, output_dir="o", evolution={})

    def plan(config, **rope_keys):
        return plan_stage(
            args, RopeArguments(target_length=ORIGINAL, rope_factors_path=str(path), **rope_keys), config
        )

    # The attention factor the checkpoint was fine-tuned with, not the 64x one of the long set.
    fine_tuned = plan(_fine_tuned_config(world, 1.17))
    assert fine_tuned.mscale == 1.17 and "attention factor" in fine_tuned.mscale_source
    assert long_scaling.mscale == pytest.approx(math.sqrt(1 + math.log(64) / math.log(ORIGINAL)))
    # A Phi-3-small-style config's own short_mscale wins over its attention_factor.
    assert plan(_fine_tuned_config(world, 1.17, long_mscale=1.19, short_mscale=1.02)).mscale == 1.02
    assert plan(_fine_tuned_config(world, 1.17), rope_mscale="0.9").mscale == 0.9
    assert plan(_fine_tuned_config(world, 1.17), rope_mscale="none").mscale == 1.0
    with pytest.raises(LongRopeError, match="rope_mscale: su is a formula of the scale.*give a number"):
        plan(_fine_tuned_config(world, 1.17), rope_mscale="su")
    # long: the long set's own, which a stock config's one attention_factor applies to short sequences too.
    shared = plan(_fine_tuned_config(world, 1.17), rope_mscale="long")
    assert shared.mscale == long_scaling.mscale and "long set" in shared.mscale_source
    with pytest.raises(LongRopeError, match="rope_mscale: long is for stage short"):
        plan_stage(
            SearchArguments(stage="first", documents_path="x", num_documents=1, output_dir="o", evolution={}),
            RopeArguments(target_length=4 * ORIGINAL, rope_mscale="long"),
            _fine_tuned_config(world, 1.17),
        )

    short_factors = tuple(1.0 + 0.05 * i for i in range(16))
    result = scaling_for(args, fine_tuned, Candidate(short_factors))
    assert (result.long_factors, result.mscale, result.mscale_policy) == (
        long_scaling.long_factors,
        long_scaling.mscale,
        "su",
    )
    assert (result.short_factors, result.short_mscale) == (short_factors, 1.17)
    assert scaling_for(args, fine_tuned, Candidate(short_factors, mscale=1.05)).short_mscale == 1.05


def test_seeds_carry_the_stages_mscale_when_it_is_searched(world, tmp_path):
    import transformers

    from longrope.search_stages import evolution_config, seeds_within_space

    config = transformers.AutoConfig.from_pretrained(world / "model")
    args = SearchArguments(
        stage="first", documents_path="x", num_documents=1, output_dir="o", evolution={"search_mscale": True}
    )
    plan = plan_stage(args, RopeArguments(target_length=4 * ORIGINAL), config)
    su = math.sqrt(1 + math.log(4) / math.log(ORIGINAL))
    assert plan.seed_mscale == pytest.approx(su)
    seeds = seeds_within_space(plan.seeds, evolution_config(args, plan), plan.seed_mscale)
    assert [seed.mscale for seed in seeds.values()] == pytest.approx([su] * len(seeds))
    fixed = SearchArguments(stage="first", documents_path="x", num_documents=1, output_dir="o", evolution={})
    assert {seed.mscale for seed in seeds_within_space(plan.seeds, evolution_config(fixed, plan), su).values()} == {
        None
    }


def test_short_stage_searches_the_short_mscale(world, tmp_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model")
    long_scaling = rope.longrope_scaling(
        rope.RopeGeometry.from_config(model.config), 8 * ORIGINAL, [1.0 + 0.45 * i for i in range(16)]
    )
    path = tmp_path / "long.json"
    factors.save(path, long_scaling)
    evolution = {**SMALL_EVOLUTION, "search_mscale": True, "mscale_min": 0.8, "mscale_max": 1.5}
    config = write_config(
        world, tmp_path, stage="short", target_length=ORIGINAL, rope_factors_path=str(path), evolution=evolution
    )
    summary = search.main(["--config", str(config)])
    loaded = factors.load(tmp_path / "out" / "factors.json")
    report = json.loads((tmp_path / "out" / "generations.json").read_text())
    population = [member for generation in report["generations"] for member in generation["population"]]
    assert {m["mscale"] for m in population if m["origin"].startswith("seed:")} == {1.0}  # the rule's start
    assert len({m["mscale"] for m in population}) > 1, "the short mscale must really be searched"
    best = min((m for m in population if m["status"] != "stopped"), key=lambda member: member["fitness"])
    assert loaded.scaling.short_mscale == best["mscale"] == summary["short_mscale"]
    assert loaded.scaling.mscale == long_scaling.mscale and loaded.scaling.long_factors == long_scaling.long_factors
    assert "searched from there" in loaded.provenance["short_mscale_source"]
