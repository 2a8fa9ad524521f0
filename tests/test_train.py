"""train.py in process: a few pretraining steps of a tiny random Llama, metrics and resolved config on disk, then a
fine-tuning step from the saved checkpoint; configuration mistakes exit with one line."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import user_error

import train
from longrope import corpus, data, modeling, tracking
from longrope.args import DataArguments, ModelArguments
from longrope.config_parser import parse_config
from longrope.errors import LongRopeError

TINY_MODEL = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A byte tokenizer and a packed 32-token dataset (train + validation) from a few stdlib files."""
    root = tmp_path_factory.mktemp("prepared")
    tokenizer = corpus.build_byte_tokenizer()
    tokenizer.save_pretrained(root / "tok")
    texts = root / "texts"
    texts.mkdir()
    for i, document in enumerate(corpus.stdlib_documents(max_files=12)):
        (texts / f"{i:02d}.txt").write_text(document.text)
    settings = DataArguments(
        sources=[str(texts)],
        max_seq_len=32,
        validation_fraction=0.2,
        dataset_path=str(root / "dataset"),
        dataset_cache_dir=str(root / "cache"),
    )
    dataset, summary = data.prepare_dataset(settings, tokenizer)
    data.save_dataset_atomically(dataset, settings.dataset_path, summary)
    return root


def _write_config(path: Path, prepared: Path, output_dir: Path, **overrides) -> Path:
    config = {
        "model_config": TINY_MODEL,
        "tokenizer_name_or_path": str(prepared / "tok"),
        "dataset_path": str(prepared / "dataset"),
        "output_dir": str(output_dir),
        "max_steps": 4,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "learning_rate": 1.0e-2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    config.update(overrides)
    path.write_text(yaml.safe_dump(config))
    return path


def test_pretraining_runs_writes_metrics_and_a_loadable_model_then_fine_tunes(tmp_path, prepared):
    from transformers import AutoModelForCausalLM, LlamaConfig, set_seed

    output = tmp_path / "pretrain"
    config = _write_config(tmp_path / "pretrain.yaml", prepared, output)
    metrics = train.main(["--config", str(config), "--learning_rate", "5e-3"])

    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))
    assert metrics["seq_len"] == 32 and metrics["train_tokens_per_second"] > 0
    saved = json.loads((output / "all_results.json").read_text())
    assert saved["train_loss"] == pytest.approx(metrics["train_loss"]) and "eval_loss" in saved
    assert json.loads((output / "trainer_state.json").read_text())["global_step"] == 4

    resolved = yaml.safe_load((output / "config.yaml").read_text())
    assert resolved["learning_rate"] == 5e-3 and resolved["model_config"] == TINY_MODEL
    assert not any(key.endswith("_token") for key in resolved)
    assert json.loads((output / "inputs.json").read_text())["dataset_path"] == str(prepared / "dataset")

    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.config.vocab_size == 259 and model.config.bos_token_id == 256 and model.config.use_cache
    set_seed(0)
    initial = AutoModelForCausalLM.from_config(
        LlamaConfig(**{k: v for k, v in TINY_MODEL.items() if k != "model_type"}, vocab_size=259)
    )
    assert not torch.allclose(model.model.embed_tokens.weight, initial.model.embed_tokens.weight)

    # The resolved config repeats the run, and a checkpoint fine-tunes through model_name_or_path.
    parsed = parse_config(train.CONFIG_KEYS, ["--config", str(output / "config.yaml")])
    assert parsed[-1].learning_rate == 5e-3 and parsed[0].model_config == TINY_MODEL
    finetune = _write_config(
        tmp_path / "finetune.yaml",
        prepared,
        tmp_path / "finetune",
        model_config=None,
        model_name_or_path=str(output),
        tokenizer_name_or_path=None,
        max_steps=1,
    )
    tuned = train.main(["--config", str(finetune)])
    assert math.isfinite(tuned["train_loss"])
    assert (tmp_path / "finetune" / "model.safetensors").is_file()


@pytest.fixture
def refused(capsys):
    """train.main on argv that must be refused: its one error line (exit status 2)."""

    def run(argv: list[str]) -> str:
        line = user_error(capsys, train.main, argv)
        assert line.startswith("train.py: error: ")
        return line

    return run


def test_unknown_yaml_key_is_a_one_line_error(tmp_path, prepared, refused):
    config = _write_config(tmp_path / "c.yaml", prepared, tmp_path / "out", lerning_rate=1e-3)
    message = refused(["--config", str(config)])
    assert "unknown key 'lerning_rate' (did you mean 'learning_rate'?)" in message
    assert not (tmp_path / "out").exists()


def test_unknown_command_line_argument_is_a_one_line_error(tmp_path, prepared, refused):
    config = _write_config(tmp_path / "c.yaml", prepared, tmp_path / "out")
    assert "--max_stpes" in refused(["--config", str(config), "--max_stpes", "3"])


def test_deepspeed_without_a_launcher_is_a_one_line_error(tmp_path, prepared, refused, monkeypatch):
    # Without a launcher's environment DeepSpeed would try MPI (mpi4py) deep inside the model's loading.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    config = _write_config(tmp_path / "c.yaml", prepared, tmp_path / "out", deepspeed="configs/deepspeed/zero3.json")
    message = refused(["--config", str(config)])
    assert "deepspeed: a DeepSpeed run needs a launcher" in message and "--nproc_per_node N" in message
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"dataset_path": "/nonexistent/prepared"}, "dataset_path: '/nonexistent/prepared' holds no prepared dataset"),
        ({"model_name_or_path": "models/tiny"}, "model_name_or_path / model_config: set one"),
        ({"model_config": {**TINY_MODEL, "hiden_size": 8}}, "model_config.hiden_size: not a LlamaConfig key"),
        ({"model_config": {"hidden_size": 8}}, "model_config: add 'model_type'"),
        ({"tokenizer_name_or_path": None}, "tokenizer_name_or_path: required"),
        ({"bookend": "both"}, "bookend: 'both' is not one of segment, document"),
        ({"max_seq_len": 64}, "max_seq_len: 64, but the rows of"),
        ({"max_eval_samples": 0}, "max_eval_samples: 0 must be an integer >= 1"),
    ],
)
def test_bad_configuration_is_a_one_line_error_naming_the_key(tmp_path, prepared, refused, overrides, expected):
    config = _write_config(tmp_path / "c.yaml", prepared, tmp_path / "out", **overrides)
    assert expected in refused(["--config", str(config)])


def test_max_eval_samples_evaluates_the_first_rows_of_the_validation_split(tmp_path, prepared, monkeypatch):
    from transformers import Trainer

    rows = len(data.load_prepared_dataset(prepared / "dataset")["validation"])
    assert rows > 2
    evaluated = []
    evaluate = Trainer.evaluate

    def counting_evaluate(self, *args, **kwargs):
        evaluated.append(list(self.eval_dataset["input_ids"]))
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "evaluate", counting_evaluate)
    for limit in (2, rows + 5):
        config = _write_config(tmp_path / f"c{limit}.yaml", prepared, tmp_path / f"out{limit}", max_steps=1)
        metrics = train.main(["--config", str(config), "--max_eval_samples", str(limit)])
        assert math.isfinite(metrics["eval_loss"])
    first, everything = evaluated
    assert len(first) == 2 and len(everything) == rows and first == everything[:2]


def test_missing_validation_split_with_evaluation_enabled(tmp_path, prepared, refused):
    dataset = data.load_prepared_dataset(prepared / "dataset")
    del dataset["validation"]
    dataset.save_to_disk(str(tmp_path / "train_only"))
    config = _write_config(
        tmp_path / "c.yaml",
        prepared,
        tmp_path / "out",
        dataset_path=str(tmp_path / "train_only"),
        eval_strategy="steps",
        eval_steps=2,
    )
    assert "eval_strategy: steps needs a validation split" in refused(["--config", str(config)])


def test_wandb_goes_offline_without_credentials(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    tracking.configure_wandb(["wandb"], str(tmp_path / "out"))
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str(tmp_path / "out")

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    tracking.configure_wandb(["wandb"], str(tmp_path / "out"))
    assert "WANDB_MODE" not in os.environ


def test_attention_implementation_resolution():
    expected = "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    if torch.cuda.is_available():
        pytest.skip("CPU twin: the CUDA branch depends on flash-attn being installed")
    assert modeling.resolve_attn_implementation("auto") == expected
    assert modeling.resolve_attn_implementation("eager") == "eager"
    with pytest.warns(UserWarning, match="flash_attention_2 needs a CUDA device and flash-attn; falling back to sdpa"):
        assert modeling.resolve_attn_implementation("flash_attention_2") == "sdpa"


def test_model_config_accepts_a_mapping_a_json_string_or_a_config_path(tmp_path):
    from transformers import LlamaConfig

    tokenizer = corpus.build_byte_tokenizer()
    LlamaConfig(**{k: v for k, v in TINY_MODEL.items() if k != "model_type"}, vocab_size=300).save_pretrained(tmp_path)
    from_mapping = modeling.build_model(ModelArguments(model_config=dict(TINY_MODEL)), tokenizer)
    from_json = modeling.build_model(ModelArguments(model_config=json.dumps(TINY_MODEL)), tokenizer)
    from_path = modeling.build_model(ModelArguments(model_config=str(tmp_path / "config.json")), tokenizer)
    assert from_mapping.config.vocab_size == from_json.config.vocab_size == len(tokenizer)  # filled from the tokenizer
    assert from_mapping.config.eos_token_id == tokenizer.eos_token_id
    assert from_path.config.vocab_size == 300 and from_path.config.hidden_size == TINY_MODEL["hidden_size"]
    assert from_mapping.config._attn_implementation == "sdpa" and from_mapping.dtype == torch.float32
    with pytest.raises(LongRopeError, match="model_config: not valid JSON"):
        ModelArguments(model_config="{not json")
