"""evaluate.py on a tiny random model: outputs, methods, lm-eval, 2-rank Ulysses perplexity, bad input."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config, user_error

import evaluate
from longrope import factors, perplexity, rope

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = 64


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Llama with the byte tokenizer (window 64) and documents of real Python source."""
    import sysconfig

    import datasets
    import transformers

    from longrope.corpus import build_byte_tokenizer
    from longrope.data import save_dataset_atomically

    root = tmp_path_factory.mktemp("eval_world")
    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(
        "llama",
        vocab_size=len(tokenizer),
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=ORIGINAL,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
        # Large initial weights make attention sharp, so a missing context shows in the loss.
        initializer_range=0.3,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in ("textwrap.py", "shlex.py", "fnmatch.py", "heapq.py")]
    docs = [tokenizer(text)["input_ids"][:1200] for text in texts] + [tokenizer("short one")["input_ids"]]
    save_dataset_atomically(
        datasets.DatasetDict({"train": datasets.Dataset.from_dict({"input_ids": docs})}), root / "docs", {}
    )
    return root


def write_config(world, tmp_path, **overrides) -> Path:
    config = {
        "model_name_or_path": str(world / "model"),
        "documents_path": str(world / "docs"),
        "methods": ["none", "pi", "ntk", "dynamic_ntk", "yarn"],
        "lengths": [64, 128, 256],
        "num_documents": 3,
        "output_dir": str(tmp_path / "out"),
    }
    config.update(overrides)
    path = tmp_path / "eval.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def test_evaluate_writes_json_table_and_plot(world, tmp_path):
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL)
    searched = rope.longrope_scaling(geometry, 256, [1.0 + 0.2 * i for i in range(16)])
    path = tmp_path / "searched" / "factors.json"
    factors.save(path, searched, {"fitness": 1.0})
    methods = ["none", "pi", "yarn", {"name": "searched", "rope_factors_path": str(path)}]
    results = evaluate.main(["--config", str(write_config(world, tmp_path, methods=methods))])
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == str(world / "model")
    assert saved["data"]["documents"] == 3 and len(saved["data"]["sha256"]) == 64
    names = [entry["name"] for entry in saved["methods"]]
    assert names == ["none", "pi", "yarn", "searched"]
    searched_entry = saved["methods"][3]
    assert searched_entry["rope_factors_sha256"] == factors.load(path).sha256
    for entry in saved["methods"]:
        assert set(entry["perplexity"]) == {"64", "128", "256"}
        assert all(math.isfinite(v) and v > 1 for v in entry["perplexity"].values())
    # Within the original window every method but PI-style interpolation equals plain RoPE... PI changes it.
    ppl = {entry["name"]: entry["perplexity"] for entry in saved["methods"]}
    assert ppl["pi"]["64"] != ppl["none"]["64"]
    table = (out / "results.md").read_text()
    assert "| method | 64 | 128 | 256 |" in table and "| searched |" in table
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["methods"][0]["name"] == "none"


def test_an_interrupted_run_resumes_from_its_finished_methods(world, tmp_path):
    from longrope.evaluation import method_checkpoint_path

    out = tmp_path / "out"
    evaluate.main(["--config", str(write_config(world, tmp_path, methods=["none", "yarn"], lengths=[128]))])
    saved_none = method_checkpoint_path(out, "none")
    assert saved_none.is_file() and method_checkpoint_path(out, "yarn").is_file()
    # Mark the saved entry: a rerun that reuses it reports the mark, one that re-evaluates reports a real number.
    checkpoint = json.loads(saved_none.read_text())
    checkpoint["entry"]["perplexity"]["128"] = -1.0
    saved_none.write_text(json.dumps(checkpoint))
    rerun = evaluate.main(
        ["--config", str(write_config(world, tmp_path, methods=["none", "yarn", "pi"], lengths=[128]))]
    )
    ppl = {entry["name"]: entry["perplexity"]["128"] for entry in rerun["methods"]}
    assert ppl["none"] == -1.0 and ppl["pi"] > 1 and method_checkpoint_path(out, "pi").is_file()
    assert json.loads((out / "results.json").read_text())["methods"][0]["perplexity"]["128"] == -1.0
    # Any other setting changed: nothing is reused.
    changed = evaluate.main(
        ["--config", str(write_config(world, tmp_path, methods=["none"], lengths=[128], num_documents=2))]
    )
    assert changed["methods"][0]["perplexity"]["128"] > 1


def test_perplexity_equals_the_plain_forward_of_the_patched_model(world, tmp_path):
    import transformers

    from longrope.documents import select_documents

    results = evaluate.main(["--config", str(write_config(world, tmp_path, methods=["yarn"], lengths=[256]))])
    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model").eval()
    rope.install(model, rope.yarn_scaling(rope.RopeGeometry.from_config(model.config), 256))
    documents, _ = select_documents(str(world / "docs"), 256, 3, 0)
    with torch.no_grad():
        nll = [model(torch.tensor([d]), labels=torch.tensor([d])).loss.item() * 255 for d in documents]
    assert results["methods"][0]["perplexity"]["256"] == pytest.approx(math.exp(sum(nll) / (255 * 3)), rel=1e-5)


def test_lengths_beyond_the_setup_warn_but_run(world, tmp_path):
    results = evaluate.main(
        ["--config", str(write_config(world, tmp_path, methods=["pi", "none"], target_length=128, lengths=[64, 256]))]
    )
    pi = results["methods"][0]
    assert pi["warnings"] == ["pi: lengths [256] are beyond the 128 tokens it was set up for (evaluated anyway)"]
    assert math.isfinite(pi["perplexity"]["256"])
    assert results["methods"][1]["warnings"] == []
    assert "warning: pi: lengths [256]" in (tmp_path / "out" / "results.md").read_text()


def test_retrieval_tasks_and_needle_run_on_the_grid_with_a_heat_map_per_method(world, tmp_path):
    config = write_config(
        world,
        tmp_path,
        methods=["none", "yarn"],
        lengths=[],
        target_length=256,
        retrieval_tasks=["passkey", "niah_multikey", "variable_tracking"],
        retrieval_template="code",
        retrieval_haystack="documents",
        retrieval_lengths=[256, 512],
        retrieval_depths=[0.2, 0.8],
        retrieval_trials=2,
        needle_lengths=[600],
    )
    results = evaluate.main(["--config", str(config)])
    assert results["retrieval"]["template"] == "code" and results["retrieval"]["haystack"] == "documents"
    for entry in results["methods"]:
        assert set(entry["retrieval_accuracy"]) == {"passkey", "niah_multikey", "variable_tracking"}
        for task, by_length in entry["retrieval_accuracy"].items():
            assert set(by_length) == {"256", "512"} and all(0.0 <= value <= 1.0 for value in by_length.values())
            cells = entry["retrieval"][task]["cells"]
            assert [(cell["length"], cell["depth"]) for cell in cells] == [
                (256, 0.2),
                (256, 0.8),
                (512, 0.2),
                (512, 0.8),
            ]
            assert all(len(cell["trials"]) == 2 for cell in cells)
        assert math.isfinite(entry["needle_perplexity"]["600"])
        plot = tmp_path / "out" / f"retrieval-{entry['name']}.png"
        assert plot.stat().st_size > 5000
    # Both methods answered the same prompts (seeded per cell, not per method).
    answers = [
        [t["answers"] for c in e["retrieval"]["passkey"]["cells"] for t in c["trials"]] for e in results["methods"]
    ]
    assert answers[0] == answers[1]
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert (
        "Retrieval accuracy (code template, documents haystack" in markdown
        and "| yarn | variable_tracking |" in markdown
    )
    assert "Needle perplexity" in markdown


def test_lm_eval_custom_task_on_the_patched_model(world, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the task's data_files path is relative to the repository
    config = write_config(
        world,
        tmp_path,
        methods=["none", "pi"],
        lengths=[],
        target_length=256,
        lm_eval_tasks=["tiny_python_keyword"],
        lm_eval_include_path=str(ROOT / "configs" / "lm_eval_tasks"),
        lm_eval_limit=8,
    )
    results = evaluate.main(["--config", str(config)])
    scores = [entry["lm_eval"]["tiny_python_keyword"]["acc,none"] for entry in results["methods"]]
    assert all(0.0 <= score <= 1.0 for score in scores)
    assert "tiny_python_keyword" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.distributed
def test_sequence_parallel_perplexity_equals_single_process(world, tmp_path):
    single = evaluate.main(["--config", str(write_config(world, tmp_path / "one", methods=["yarn"], lengths=[256]))])
    config = write_config(world, tmp_path / "two", methods=["yarn"], lengths=[256], sp_size=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "evaluate.py", "--config"]
    process = subprocess.run([*command, str(config)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-3000:]
    assert "deepspeed_shm_comm_op built" not in process.stdout + process.stderr  # the op inference would use
    sharded = json.loads((tmp_path / "two" / "out" / "results.json").read_text())
    assert sharded["protocol"]["sp_size"] == 2
    expected = single["methods"][0]["perplexity"]["256"]
    assert sharded["methods"][0]["perplexity"]["256"] == pytest.approx(expected, rel=1e-4)


def test_sharding_without_sequence_parallel_attention_would_be_caught(world):
    """The 2-rank test above can fail: scoring the second half of a window without the first changes the loss."""
    import transformers

    from longrope.documents import select_documents

    model = transformers.AutoModelForCausalLM.from_pretrained(world / "model").eval()
    document = select_documents(str(world / "docs"), 256, 1, 0)[0][0]
    whole = perplexity.sequence_nll(model, document, score_from=129)
    second_half_alone = perplexity.sequence_nll(model, document[128:], score_from=1)
    assert abs(whole.nll_sum - second_half_alone.nll_sum) / whole.nll_sum > 1e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lengths": [2000]}, r"0 documents have >= 2000 tokens, 3 needed \(longest: 1200\)"),
        ({"methods": ["none", "su"]}, r"methods\[1\]\.rope_method: 'su' is not a RoPE method; use one of none, pi"),
        (
            {"lm_eval_tasks": ["no_such_task"], "lengths": [], "target_length": 256},
            "lm_eval_tasks: 'no_such_task' is not an lm-eval task",
        ),
        (
            {"retrieval_lengths": [100], "lengths": [], "target_length": 256},
            r"retrieval_lengths: \[100\] cannot hold the paper template of passkey, which needs about \d+ tokens",
        ),
        ({"passkey_lengths": [300]}, "passkey_lengths: renamed to retrieval_lengths; use retrieval_lengths"),
        (
            {"retrieval_lengths": [300], "retrieval_template": "code"},
            "retrieval_haystack: the code template hides its needles in code; set retrieval_haystack: documents",
        ),
        ({"retrieval_lengths": [300], "retrieval_tasks": ["niah"]}, "retrieval_tasks: 'niah' is not a retrieval task"),
        ({"retrieval_lengths": [300], "retrieval_template": "prose"}, "retrieval_template: 'prose' is not a template"),
        (
            {"methods": ["pi"], "lengths": [64], "target_length": 64},
            r"methods\[0\]\.target_length: 64 must be larger than the original window 64",
        ),
        ({"ppl_mode": "sliding"}, "ppl_stride: required with ppl_mode sliding"),
        ({"sp_size": 2}, "sp_size: 2 but 1 processes were launched"),
        ({"sp_size": 2, "retrieval_lengths": [300]}, "retrieval decoding and lm-eval tasks run unsharded"),
        ({"sequence_parallel_size": 2}, "sequence_parallel_size: renamed to sp_size; use sp_size"),
        (
            {"methods": [{"name": "x", "factors_path": "f.json"}]},
            r"methods\[0\]\.factors_path: renamed to rope_factors_path",
        ),
        ({"rope_method": "pi"}, "rope_method / rope_factors_path: evaluate.py compares the entries of `methods`"),
    ],
)
def test_bad_input_is_one_line(world, tmp_path, capsys, overrides, message):
    line = user_error(capsys, evaluate.main, ["--config", str(write_config(world, tmp_path, **overrides))])
    assert re.search(message, line), line


def test_factors_for_another_head_dim_are_refused(world, tmp_path, capsys):
    wrong = rope.longrope_scaling(rope.RopeGeometry(10000.0, 64, 64, ORIGINAL), 256, [2.0] * 32)
    path = tmp_path / "wrong.json"
    factors.save(path, wrong)
    line = user_error(capsys, evaluate.main, ["--config", str(write_config(world, tmp_path, methods=[str(path)]))])
    assert re.search(r"factors for head_dim 64 \(rotary_dim 64\) but the model has head_dim 32", line), line


def test_wandb_gets_the_table_and_plot(world, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    evaluate.main(["--config", str(write_config(world, tmp_path, methods=["none", "yarn"], report_to="wandb"))])
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.startswith("perplexity_plot") and name.endswith(".png") for name in files)
    assert any(name.startswith("perplexity") and name.endswith(".table.json") for name in files)
