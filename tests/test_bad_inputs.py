"""Bad input, tried as a new user would: one line naming the key and the fix, before any work, and nothing a user made
is lost. Every case of the review sweep that found files deleted, work thrown away, finished runs damaged, nonsense
accepted and tracebacks shown has a test here (the others live beside their scripts' tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_WORLD_ORIGINAL, TINY_WORLD_TARGET, user_error

import evaluate
import search
import train
from data import prepare
from longrope import export, factors, rope

ROOT = Path(__file__).resolve().parents[1]
UNWRITABLE = "/proc/self/longrope-out"  # refused by the kernel even for root
TARGET = TINY_WORLD_TARGET


def _yaml(path: Path, values: dict) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def _eval_config(world: Path, tmp_path: Path, **overrides) -> str:
    values = {
        "model_name_or_path": str(world / "model"),
        "methods": ["none"],
        "lengths": [TARGET],
        "documents_path": str(world / "docs"),
        "output_dir": str(tmp_path / "eval"),
        **overrides,
    }
    return _yaml(tmp_path / "eval.yaml", values)


def _search_config(world: Path, tmp_path: Path, **overrides) -> str:
    values = {
        "model_name_or_path": str(world / "model"),
        "target_length": TARGET,
        "documents_path": str(world / "docs"),
        "num_documents": 1,
        "evolution": {"population_size": 2, "num_mutations": 1, "num_crossovers": 1, "num_parents": 1},
        "output_dir": str(tmp_path / "search"),
        **overrides,
    }
    return _yaml(tmp_path / "search.yaml", values)


def _train_config(world: Path, tmp_path: Path, **overrides) -> str:
    values = {
        "model_name_or_path": str(world / "model"),
        "rope_method": "pi",
        "target_length": TARGET,
        "dataset_path": str(world / "rows"),
        "output_dir": str(tmp_path / "train"),
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        **overrides,
    }
    return _yaml(tmp_path / "train.yaml", values)


def _data_config(tmp_path: Path, dataset_path: str) -> str:
    texts = tmp_path / "texts"
    texts.mkdir(exist_ok=True)
    (texts / "a.txt").write_text("def f():\n    return 1\n" * 40)
    values = {
        "sources": [str(texts)],
        "tokenizer_name_or_path": str(ROOT / "models" / "tiny"),
        "dataset_path": dataset_path,
        "max_seq_len": 32,
        "dataset_cache_dir": str(tmp_path / "cache"),
    }
    return _yaml(tmp_path / "data.yaml", values)


def _user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    return path


# ----------------------------------------------------------------------------------------------------------------
# A user's files are never replaced


def test_prepare_refuses_to_replace_a_users_folder_or_file(tmp_path, capsys):
    folder = _user_folder(tmp_path / "mine")
    line = user_error(capsys, prepare.main, ["--config", _data_config(tmp_path, str(folder))])
    assert "dataset_path: " in line and "holds files data/prepare.py did not write (notes.txt)" in line
    assert (folder / "notes.txt").read_text() == "my notes"
    (tmp_path / "file.txt").write_text("keep")
    line = user_error(capsys, prepare.main, ["--config", _data_config(tmp_path, str(tmp_path / "file.txt"))])
    assert "is a file, not a folder" in line and (tmp_path / "file.txt").read_text() == "keep"


def test_prepare_replaces_its_own_earlier_dataset(tmp_path):
    target = str(tmp_path / "prepared")
    prepare.main(["--config", _data_config(tmp_path, target)])
    first = json.loads((tmp_path / "prepared" / "longrope_data.json").read_text())
    prepare.main(["--config", _data_config(tmp_path, target), "--max_seq_len", "16"])
    assert json.loads((tmp_path / "prepared" / "longrope_data.json").read_text())["config"]["max_seq_len"] == 16
    assert first["config"]["max_seq_len"] == 32


@pytest.mark.parametrize("entry", ["search", "evaluate"])
def test_automatic_document_preparation_refuses_a_users_folder(tiny_world, tmp_path, capsys, entry):
    folder = _user_folder(tmp_path / "docs-mine")
    prepare_config = _data_config(tmp_path, str(folder))
    if entry == "search":
        argv = ["--config", _search_config(tiny_world, tmp_path, documents_path=str(folder))]
        call = search.main
    else:
        argv = ["--config", _eval_config(tiny_world, tmp_path, documents_path=str(folder))]
        call = evaluate.main
    line = user_error(capsys, call, [*argv, "--documents_prepare_config", prepare_config])
    assert "documents_path: " in line and "did not write (notes.txt)" in line
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------------------------------------
# Output paths are checked before any work


@pytest.mark.parametrize("entry", ["search", "evaluate", "train", "prepare", "export"])
@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_an_output_path_that_cannot_be_written_is_refused_before_any_work(tiny_world, tmp_path, capsys, entry, kind):
    if kind == "file":
        target = tmp_path / "taken.txt"
        target.write_text("keep")
        expected = "is a file, not a folder"
    else:
        target, expected = Path(UNWRITABLE), "is not writable"
    if entry == "search":
        call, argv = search.main, ["--config", _search_config(tiny_world, tmp_path, output_dir=str(target))]
    elif entry == "evaluate":
        call, argv = evaluate.main, ["--config", _eval_config(tiny_world, tmp_path, output_dir=str(target))]
    elif entry == "train":
        call, argv = train.main, ["--config", _train_config(tiny_world, tmp_path, output_dir=str(target))]
    elif entry == "prepare":
        call, argv = prepare.main, ["--config", _data_config(tmp_path, str(target))]
    else:
        call = export.main
        argv = ["--model_name_or_path", str(tiny_world / "model"), "--rope_method", "pi"]
        argv += ["--target_length", str(TARGET), "--output_dir", str(target)]
    line = user_error(capsys, call, argv)
    key = "dataset_path" if entry == "prepare" else "output_dir"
    assert f"{key}: " in line and expected in line, line
    if kind == "file":
        assert target.read_text() == "keep"


def test_export_refuses_to_replace_a_users_folder(tiny_world, tmp_path, capsys):
    folder = _user_folder(tmp_path / "mine")
    argv = ["--model_name_or_path", str(tiny_world / "model"), "--rope_method", "pi", "--target_length", str(TARGET)]
    line = user_error(capsys, export.main, [*argv, "--output_dir", str(folder)])
    assert "holds files an export did not write (notes.txt)" in line
    export.main([*argv, "--output_dir", str(tmp_path / "exported")])
    export.main([*argv, "--output_dir", str(tmp_path / "exported")])  # its own earlier export is replaced


# ----------------------------------------------------------------------------------------------------------------
# A refused run leaves a finished one as it was


def test_train_on_a_finished_output_dir_with_other_rope_writes_nothing(tiny_world, tmp_path, capsys):
    train.main(["--config", _train_config(tiny_world, tmp_path)])
    output = tmp_path / "train"
    before = {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()}
    assert {"config.yaml", "inputs.json", "longrope_factors.json", "model.safetensors"} <= set(before)
    line = user_error(capsys, train.main, ["--config", _train_config(tiny_world, tmp_path, rope_method="yarn")])
    assert "output_dir: " in line and "rope_parameters." in line and "use another output_dir" in line
    assert {p.name: p.read_bytes() for p in output.iterdir() if p.is_file()} == before
    train.main(["--config", _train_config(tiny_world, tmp_path)])  # the same config may run again


def test_train_refuses_a_users_folder(tiny_world, tmp_path, capsys):
    folder = _user_folder(tmp_path / "mine")
    line = user_error(capsys, train.main, ["--config", _train_config(tiny_world, tmp_path, output_dir=str(folder))])
    assert "holds files train.py did not write (notes.txt)" in line


# ----------------------------------------------------------------------------------------------------------------
# Nonsense factors


def _factors_file(tmp_path: Path, long_factors: list[float], target: int = TARGET) -> Path:
    geometry = rope.RopeGeometry(10000.0, 32, 32, TINY_WORLD_ORIGINAL)
    payload = factors.to_dict(rope.longrope_scaling(geometry, TARGET, [1.0] * 16))
    payload.update(long_factors=long_factors, max_position_embeddings=target)
    path = tmp_path / "factors.json"
    path.write_text(json.dumps(payload))
    return path


def test_a_factors_file_for_a_window_below_the_original_is_refused(tiny_world, tmp_path, capsys):
    path = _factors_file(tmp_path, [0.5] * 16, target=TINY_WORLD_ORIGINAL // 2)
    config = _train_config(
        tiny_world, tmp_path, rope_method="longrope", rope_factors_path=str(path), target_length=None
    )
    line = user_error(capsys, train.main, ["--config", config])
    assert "max_position_embeddings 32 is below the original window 64" in line


def test_reversed_factors_are_refused_and_dips_are_reported(tiny_world, tmp_path, capsys):
    reversed_path = _factors_file(tmp_path, [4.0 - 0.2 * i for i in range(16)])
    config = _eval_config(tiny_world, tmp_path, methods=[str(reversed_path)])
    assert "the list looks reversed; reverse it" in user_error(capsys, evaluate.main, ["--config", config])
    dip = [1.0 + 0.2 * i for i in range(16)]
    dip[5] = dip[3]
    dipped_path = _factors_file(tmp_path, dip)
    results = evaluate.main(["--config", _eval_config(tiny_world, tmp_path, methods=[str(dipped_path)])])
    assert any("long_factors[5] = 1.6 is below long_factors[4] = 1.8" in w for w in results["methods"][0]["warnings"])


# ----------------------------------------------------------------------------------------------------------------
# One line, naming the right key, instead of a traceback or a misleading message


def test_a_folder_that_is_not_a_model(tiny_world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    config = _eval_config(tiny_world, tmp_path, model_name_or_path=str(tmp_path / "empty"))
    line = user_error(capsys, evaluate.main, ["--config", config])
    assert "model_name_or_path: " in line and "not a model folder (no config.json)" in line


def test_a_missing_local_model_path_is_not_answered_with_a_hub_error(tiny_world, tmp_path, capsys):
    for missing in ("models/tnyi", "./outputs/tiny/finetune-8x", str(tmp_path / "nothing")):
        line = user_error(
            capsys, evaluate.main, ["--config", _eval_config(tiny_world, tmp_path, model_name_or_path=missing)]
        )
        assert f"model_name_or_path: {missing} does not exist" in line, line


def test_export_without_a_model_or_with_the_old_flags(tmp_path, capsys):
    line = user_error(capsys, export.main, ["--rope_method", "pi", "--output_dir", str(tmp_path / "x")])
    assert "model_name_or_path: required by python -m longrope.export" in line
    line = user_error(capsys, export.main, ["--model", "models/tiny"])
    assert "--model: renamed to --model_name_or_path" in line
    line = user_error(capsys, factors.main, ["export", "--model", "models/tiny"])
    assert "export: moved to python -m longrope.export" in line


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--target_length", "0"], "target_length: 0 must be a positive integer"),
        (["--target_length", "many"], "target_length: invalid int value: 'many'"),
        (["--num_documents", "-3"], "num_documents: -3 must be a positive integer"),
    ],
)
def test_bad_values_are_one_line_without_the_usage(tiny_world, tmp_path, capsys, flags, expected):
    line = user_error(capsys, search.main, ["--config", _search_config(tiny_world, tmp_path), *flags])
    assert expected in line
    assert "usage:" not in capsys.readouterr().err


@pytest.mark.parametrize("entry", ["search", "evaluate", "train"])
def test_a_missing_factors_file_names_rope_factors_path(tiny_world, tmp_path, capsys, entry):
    missing = str(tmp_path / "nope.json")
    if entry == "search":
        call, config = search.main, _search_config(tiny_world, tmp_path, rope_factors_path=missing)
    elif entry == "evaluate":
        call, config = evaluate.main, _eval_config(tiny_world, tmp_path, methods=[{"rope_factors_path": missing}])
    else:
        config = _train_config(tiny_world, tmp_path, rope_method="longrope", rope_factors_path=missing)
        call = train.main
    line = user_error(capsys, call, ["--config", config])
    assert f"rope_factors_path: {missing} does not exist" in line, line


def test_unprepared_training_data_names_the_data_config_that_writes_it(tiny_world, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = _train_config(tiny_world, tmp_path, dataset_path="data/tiny/corpus/pretrain-2048-missing")
    line = user_error(capsys, train.main, ["--config", config])
    assert "--dataset_path data/tiny/corpus/pretrain-2048-missing" in line
    from longrope.data import prepare_hint

    assert prepare_hint("data/tiny/corpus/pretrain-2048").endswith("--config configs/tiny/data-2048.yaml")


@pytest.mark.distributed
def test_under_torchrun_the_error_is_printed_once(tiny_world, tmp_path):
    config = _eval_config(tiny_world, tmp_path, lengths=[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "evaluate.py",
        "--config",
        config,
    ]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert completed.stderr.count("evaluate.py: error: lengths: [0] must be token counts >= 2") == 1, completed.stderr


def test_rope_mscale_long_outside_the_short_stage(tiny_world, tmp_path, capsys):
    methods = [{"name": "pi-long", "rope_method": "pi", "rope_mscale": "long"}]
    line = user_error(capsys, evaluate.main, ["--config", _eval_config(tiny_world, tmp_path, methods=methods)])
    assert "rope_mscale: long is for search.py's short stage" in line, line
    line = user_error(capsys, search.main, ["--config", _search_config(tiny_world, tmp_path, rope_mscale="long")])
    assert "rope_mscale: long is for stage short" in line, line


def test_cpu_bf16_attention_needs_bf16_weights(tiny_world, tmp_path, capsys):
    config = _eval_config(tiny_world, tmp_path, attn_implementation="cpu_bf16", dtype="float32")
    line = user_error(capsys, evaluate.main, ["--config", config])
    assert "attn_implementation: cpu_bf16 runs bf16 models, not dtype float32; set dtype: bfloat16" in line, line
