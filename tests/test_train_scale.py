"""train.py for long-context fine-tuning: RoPE keys and their one-line errors, the saved rope config, sequence-parallel
checks, the dry run of every shipped recipe, real 2-process runs (DeepSpeed ZeRO-3 + Ulysses SP over gloo) checked
against a 1-process run on the same batch, LoRA, and runs killed with SIGKILL after a checkpoint whose resumed loss
trajectory must equal an uninterrupted run's (ZeRO-3, ZeRO-3 + SP, LoRA)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config, user_error

import train
from longrope import (
    architectures,
    corpus,
    factors,
    lora,
    loss,
    rope,
    rope_config,
    sequence_parallel,
    train_args,
    training,
)
from longrope.args import ExportArguments, RopeArguments
from longrope.distributed import free_port
from longrope.errors import LongRopeError

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL = 64
TARGET = 256
SEQ_LEN = 256


def _tiny_llama_config(vocab_size: int, **overrides):
    values = dict(
        vocab_size=vocab_size,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=128,
        max_position_embeddings=ORIGINAL,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    return tiny_config("llama", **{**values, **overrides})


def _searched_like_scaling(config) -> rope.RopeScaling:
    geometry = rope.RopeGeometry.from_config(config)
    # Monotone factors between extrapolation and 4x interpolation, as a search would produce; short factors 1.0.
    long_factors = [1.0 + 3.0 * i / (geometry.num_pairs - 1) for i in range(geometry.num_pairs)]
    return rope.longrope_scaling(geometry, TARGET, long_factors, [1.0] * geometry.num_pairs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random Llama with a byte tokenizer, a 4x factors file, and two prepared datasets of identical rows:
    one continuous 256-token sequence, and one row packing several documents with restarting position ids."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("scale")
    tokenizer = corpus.build_byte_tokenizer()
    # initializer_range 0.2: sharp enough attention that the RoPE factors visibly change the loss of a random model.
    config = _tiny_llama_config(
        len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    factors.save(root / "factors.json", _searched_like_scaling(config), {"note": "test factors"})

    text = "".join(document.text for document in corpus.stdlib_documents(max_files=3))
    ids = [tokenizer.bos_token_id] + list(text.encode("utf-8")[: SEQ_LEN - 2]) + [tokenizer.eos_token_id]
    ids = [min(token, len(tokenizer) - 1) for token in ids]
    rows = 16
    continuous = {"input_ids": [ids] * rows, "position_ids": [list(range(SEQ_LEN))] * rows}
    DatasetDict({"train": Dataset.from_dict(continuous)}).save_to_disk(str(root / "continuous"))
    data_bytes = [min(token, len(tokenizer) - 1) for token in text.encode("utf-8")]
    varied_ids = [[tokenizer.bos_token_id] + data_bytes[i * 200 : i * 200 + SEQ_LEN - 1] for i in range(rows)]
    varied = {"input_ids": varied_ids, "position_ids": [list(range(SEQ_LEN))] * rows}
    DatasetDict({"train": Dataset.from_dict(varied)}).save_to_disk(str(root / "varied"))
    lengths = [40, 100, 56, 60]  # documents shorter and longer than the 64-token original window
    packed_positions = [p for length in lengths for p in range(length)]
    packed = {"input_ids": [ids] * rows, "position_ids": [packed_positions] * rows}
    DatasetDict({"train": Dataset.from_dict(packed)}).save_to_disk(str(root / "packed"))
    return root


def _config(world: Path, dataset: str, output_dir: Path, **overrides) -> Path:
    values = {
        "model_name_or_path": str(world / "model"),
        "attn_implementation": "sdpa",
        "rope_method": "longrope",
        "rope_factors_path": str(world / "factors.json"),
        "dataset_path": str(world / dataset),
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }
    values.update(overrides)
    path = output_dir.with_suffix(".yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values))
    return path


def _torchrun(config: Path, *extra: str, script: str | Path = "train.py", **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(script), "--config", str(config), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", **env}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _losses(output_dir: Path) -> list[float]:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(output_dir / "model.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# Keys and their errors (fast, in process)


def test_rope_keys_are_checked_before_any_work(world, tmp_path, capsys):
    cases = [
        ({"rope_method": "lineer"}, "rope_method: 'lineer' is not a RoPE method; use one of none, pi"),
        (
            {"rope_method": "longrope", "rope_factors_path": None},
            "rope_factors_path: required by rope_method longrope",
        ),
        ({"rope_method": "pi", "rope_factors_path": None}, "target_length: required with rope_method pi"),
        ({"rope_method": "yarn", "target_length": 256}, "rope_factors_path: only read by rope_method longrope"),
        ({"rope_method": "dynamic_ntk", "rope_factors_path": None, "target_length": 256}, "has no fixed factor set"),
        ({"sp_size": 0}, "sp_size: 0 must be a positive integer"),
        ({"rope_mscale": "huge"}, "rope_mscale: 'huge' is not a number"),
        (
            {"rope_factors_path": str(tmp_path / "missing.json")},
            "rope_factors_path: " + str(tmp_path / "missing.json"),
        ),
    ]
    for overrides, expected in cases:
        config = _config(world, "continuous", tmp_path / "out", **overrides)
        line = user_error(capsys, train.main, ["--config", str(config)])
        assert expected in line, (overrides, line)
        assert not (tmp_path / "out").exists()


def test_a_factors_file_for_another_model_is_a_one_line_error(world, tmp_path, capsys):
    other = _tiny_llama_config(300, head_dim=16)
    factors.save(tmp_path / "other.json", _searched_like_scaling(other))
    other_theta = _tiny_llama_config(300, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    factors.save(tmp_path / "theta.json", _searched_like_scaling(other_theta))
    for name, expected in (("other.json", "head_dim 16"), ("theta.json", "rope_theta 500000")):
        config = _config(world, "continuous", tmp_path / "out", rope_factors_path=str(tmp_path / name))
        assert expected in user_error(capsys, train.main, ["--config", str(config)])


def test_start_tokens_are_refused_unless_allowed(world, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(world / "model")
    scaling = dataclasses.replace(factors.load(world / "factors.json").scaling, start_tokens=4)
    factors.save(tmp_path / "start.json", scaling)
    resolved = rope_config.resolve_rope(RopeArguments(rope_factors_path=str(tmp_path / "start.json")), config)
    args = train_args.LongRopeTrainingArguments(output_dir=str(tmp_path))
    with pytest.raises(LongRopeError, match="allow_start_tokens: true"):
        training.check_trainable_rope(resolved, ExportArguments(), args)
    training.check_trainable_rope(resolved, ExportArguments(allow_start_tokens=True), args)
    assert resolved.scaling.start_tokens == 4


def test_an_own_short_mscale_is_refused_unless_shared_mscale_is_allowed(world, tmp_path, capsys):
    scaling = factors.load(world / "factors.json").scaling.replace(short_mscale=1.0)
    factors.save(tmp_path / "own.json", scaling)
    refused = _config(world, "continuous", tmp_path / "refused", rope_factors_path=str(tmp_path / "own.json"))
    line = user_error(capsys, train.main, ["--config", str(refused)])
    assert "short set mscale 1 but the long set 1.1" in line and "allow_shared_mscale: true" in line
    assert not (tmp_path / "refused").exists(), "refused before any work"
    output_dir = tmp_path / "shared"
    allowed = _config(
        world, "continuous", output_dir, rope_factors_path=str(tmp_path / "own.json"), allow_shared_mscale=True
    )
    train.main(["--config", str(allowed)])
    saved = json.loads((output_dir / "config.json").read_text())["rope_parameters"]
    # Stock loaders get the long set's attention factor; the factors file beside it keeps the short one.
    assert saved["attention_factor"] == pytest.approx(scaling.mscale) and "short_mscale" not in saved
    assert factors.load(output_dir / factors.FACTORS_FILE_NAME).scaling.short_mscale == 1.0


@pytest.mark.parametrize(
    "heads, kv_heads, seq_len, world_size, expected",
    [
        (2, 2, 256, 3, "does not divide the 3 launched process(es)"),
        (3, 3, 256, 2, "num_attention_heads (3)"),
        (6, 3, 256, 2, "num_key_value_heads (3) must divide one another"),
        (2, 2, 255, 2, "sequence length 255"),
    ],
)
def test_sequence_parallel_mismatches_are_one_line_errors(heads, kv_heads, seq_len, world_size, expected):
    config = _tiny_llama_config(100, hidden_size=32 * heads, num_attention_heads=heads, num_key_value_heads=kv_heads)
    with pytest.raises(LongRopeError) as raised:
        sequence_parallel.validate(config, 2, seq_len, world_size)
    assert expected in str(raised.value) and str(raised.value).startswith("sp_size: 2")
    sequence_parallel.validate(_tiny_llama_config(100), 2, 256, 2)  # a fitting setup passes
    # Fewer KV heads than ranks is fine when they divide sp_size: DeepSpeed replicates them (GQA, e.g. 8 KV heads, sp 16).
    gqa = _tiny_llama_config(100, hidden_size=128, num_attention_heads=4, num_key_value_heads=1)
    sequence_parallel.validate(gqa, 2, 256, 2)


def test_sp_size_above_one_sets_the_deepspeed_parallelism_config(tmp_path):
    args = train_args.LongRopeTrainingArguments(
        output_dir=str(tmp_path), sp_size=2, deepspeed=str(ROOT / "configs/deepspeed/zero3.json")
    )
    assert args.parallelism_config.sp_backend == "deepspeed" and args.parallelism_config.sp_size == 2
    assert args.deepspeed["sequence_parallel_size"] == 2 and "train_batch_size" not in args.deepspeed
    assert args.deepspeed_config_path.endswith("zero3.json")
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # the deepspeed key registered ZeRO-3 for this process; later tests build plain models


def test_installed_rope_is_saved_as_a_stock_longrope_config_with_equal_logits(world, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world / "model", attn_implementation="sdpa")
    rope_args = RopeArguments(rope_method="longrope", rope_factors_path=str(world / "factors.json"))
    resolved = rope_config.resolve_rope(rope_args, AutoConfig.from_pretrained(world / "model"))
    rope_config.install_rope(model, resolved)
    model.save_pretrained(tmp_path / "saved")

    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "longrope"
    assert saved["max_position_embeddings"] == TARGET
    assert saved[rope_config.SHA256_CONFIG_KEY] == factors.sha256_file(world / "factors.json")

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="sdpa").eval()
    assert not rope.installed_modules(stock)
    input_ids = torch.randint(0, 200, (1, 200))
    with torch.no_grad():
        expected = model.eval()(input_ids).logits
        got = stock(input_ids).logits
    # Stock transformers forms frequencies and angles in fp32 (ours: float64, test_rope.py checks them against a float64
    # reference): up to ~2e-5 rad apart at these 200 positions, which this sharp random model (initializer_range 0.2)
    # turns into logit differences below 1e-4.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


def test_single_process_fine_tune_carries_the_factors_into_output_and_checkpoints(world, tmp_path):
    output_dir = tmp_path / "single"
    config = _config(
        world, "continuous", output_dir, save_strategy="steps", save_steps=1, save_total_limit=2, peak_flops=1e12
    )
    train.main(["--config", str(config)])
    saved = json.loads((output_dir / "config.json").read_text())
    digest = factors.sha256_file(world / "factors.json")
    assert saved[rope_config.SHA256_CONFIG_KEY] == digest
    assert factors.sha256_file(output_dir / factors.FACTORS_FILE_NAME) == digest
    checkpoints = sorted(output_dir.glob("checkpoint-*"))
    assert [c.name for c in checkpoints] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in checkpoints:
        assert factors.sha256_file(checkpoint / factors.FACTORS_FILE_NAME) == digest
        assert json.loads((checkpoint / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"
    inputs = json.loads((output_dir / "inputs.json").read_text())
    assert inputs["rope_factors_sha256"] == digest
    logged = [entry for entry in json.loads((output_dir / "trainer_state.json").read_text())["log_history"]]
    assert all(entry["tokens_per_second"] > 0 and entry["peak_memory_gib"] > 0 for entry in logged if "loss" in entry)
    assert all(entry["mfu"] > 0 for entry in logged if "loss" in entry)  # peak_flops is set in this run


def test_mixed_context_windows_train_short_sequences_with_the_original_rope(world, tmp_path):
    from transformers import AutoConfig

    resolved = rope_config.with_original_short_factors(
        rope_config.resolve_rope(
            RopeArguments(rope_method="yarn", target_length=TARGET), AutoConfig.from_pretrained(world / "model")
        )
    )
    assert resolved.scaling.short_factors == (1.0,) * 16 and resolved.scaling.long_factors != (1.0,) * 16
    module = rope.ScaledRotaryEmbedding(resolved.scaling)
    base = rope.ScaledRotaryEmbedding(rope.none_scaling(resolved.scaling.geometry))
    x = torch.zeros(1, 1, 8)
    # A packed row whose documents all fit the 64-token window rotates exactly as the original model...
    short_row = torch.cat([torch.arange(40), torch.arange(60)])[None]
    torch.testing.assert_close(module(x, short_row)[0], base(x, short_row)[0] * resolved.scaling.mscale)
    # ...and a row holding a longer document uses the long factors.
    long_row = torch.arange(100)[None]
    assert not torch.allclose(module(x, long_row)[0], base(x, long_row)[0] * resolved.scaling.mscale)
    with pytest.raises(LongRopeError, match="mixed_context_windows: needs a rope_method"):
        training.check_trainable_rope(
            rope_config.resolve_rope(RopeArguments(), AutoConfig.from_pretrained(world / "model")),
            ExportArguments(),
            train_args.LongRopeTrainingArguments(output_dir=str(tmp_path), mixed_context_windows=True),
        )


def test_a_dataset_smaller_than_one_global_batch_is_a_one_line_error(world, tmp_path, capsys):
    config = _config(world, "continuous", tmp_path / "out", per_device_train_batch_size=32)
    line = user_error(capsys, train.main, ["--config", str(config)])
    assert "holds 16 training rows, fewer than one global batch" in line


# ----------------------------------------------------------------------------------------------------------------
# Dry run of every shipped fine-tuning recipe


FINETUNE_CONFIGS = sorted(ROOT.glob("configs/*/finetune-*.yaml"))


@pytest.mark.parametrize("path", FINETUNE_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_finetune_recipe_dry_runs(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    metrics = train.main(["--config", str(path.relative_to(ROOT)), "--dry_run", "true"])
    assert torch.isfinite(torch.tensor(metrics["dry_run_loss"]))
    raw = yaml.safe_load(path.read_text())
    expected = raw.get("rope_method") or ("longrope" if raw.get("rope_factors_path") else "none")
    assert metrics["rope"] == expected
    assert metrics["num_attention_heads"] % raw.get("sp_size", 1) == 0


def test_dry_run_knows_the_paper_architectures_offline():
    config = architectures.dry_run_config("mistralai/Mistral-7B-v0.1", overrides={"sliding_window": None})
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (32, 8, 128)
    assert config.sliding_window is None and config.num_hidden_layers == 2
    with pytest.raises(LongRopeError, match="no architecture known offline for 'org/unknown'"):
        architectures.dry_run_config("org/unknown")


# ----------------------------------------------------------------------------------------------------------------
# Real processes: 2 ranks (ZeRO-3 + Ulysses SP=2) against 1 process on the same batch


@pytest.fixture(scope="module")
def two_rank_runs(world):
    """The 2-rank runs, launched once: continuous rows and packed multi-document rows, both with the factors; the
    packed run also scores its loss in uneven loss_chunk_size chunks (each rank's 128 tokens as 48 + 48 + 32), so its
    equality with the plain 1-process loss covers the chunked loss under ZeRO-3 + SP."""
    results = {}
    for dataset in ("continuous", "packed"):
        output_dir = world / f"sp2-{dataset}"
        config = _config(world, dataset, output_dir, **({"loss_chunk_size": 48} if dataset == "packed" else {}))
        completed = _torchrun(config, "--sp_size", "2", "--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"))
        assert completed.returncode == 0, completed.stderr[-3000:]
        # DeepSpeed prints this line whenever it builds or loads the inference-only op that train.py skips on CPU.
        assert "deepspeed_shm_comm_op built" not in completed.stdout + completed.stderr
        results[dataset] = output_dir
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("dataset", ["continuous", "packed"])
def test_zero3_sequence_parallel_matches_one_process(world, two_rank_runs, dataset, tmp_path):
    single_dir = tmp_path / "single"
    train.main(["--config", str(_config(world, dataset, single_dir))])
    sp_dir = two_rank_runs[dataset]

    single_losses, sp_losses = _losses(single_dir), _losses(sp_dir)
    assert len(single_losses) == len(sp_losses) == 2
    torch.testing.assert_close(torch.tensor(sp_losses), torch.tensor(single_losses), rtol=1e-4, atol=0)

    # The Trainer gathers the ZeRO-3 shards into full weights on save (stage3_gather_16bit_weights_on_model_save).
    single_weights, sp_weights = _weights(single_dir), _weights(sp_dir)
    assert set(single_weights) == set(sp_weights)
    initial = _weights(world / "model")
    moved = max((single_weights[k] - initial[k]).abs().max().item() for k in single_weights)
    assert moved > 1e-4  # the two steps changed the weights, so equality below is about the updates
    for key in single_weights:
        torch.testing.assert_close(sp_weights[key], single_weights[key], rtol=1e-4, atol=1e-5, msg=key)

    saved = json.loads((sp_dir / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "longrope"
    assert saved[rope_config.SHA256_CONFIG_KEY] == factors.sha256_file(world / "factors.json")


@pytest.mark.distributed
def test_the_factors_change_the_loss_so_every_rank_applied_them(world, two_rank_runs, tmp_path):
    without = tmp_path / "none"
    train.main(["--config", str(_config(world, "continuous", without, rope_method="none", rope_factors_path=None))])
    # The 2-rank loss equals the 1-process loss with factors (test above) and differs from the loss without them.
    assert abs(_losses(without)[0] - _losses(two_rank_runs["continuous"])[0]) > 1e-3


@pytest.mark.distributed
def test_zero3_sequence_parallel_trains_in_bf16_on_cpu_like_one_bf16_process(world, tmp_path):
    """Trainer bf16 (autocast on the CPU) under ZeRO-3 + Ulysses SP=2 over gloo, against one bf16 process."""
    sp_dir, single_dir = tmp_path / "sp2-bf16", tmp_path / "single-bf16"
    # bf16: true as a GPU recipe writes it (no use_cpu): the CPU's bf16 autocast, on both ranks together.
    config = _config(world, "continuous", sp_dir, bf16=True)
    completed = _torchrun(config, "--sp_size", "2", "--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "processes: 2 (sequence parallel 2 x data parallel 1), precision bf16" in completed.stderr
    train.main(["--config", str(_config(world, "continuous", single_dir, bf16=True))])
    sp_losses, single_losses = _losses(sp_dir), _losses(single_dir)
    assert len(sp_losses) == len(single_losses) == 2
    # bf16 products: the two shardings round differently, so agreement to bf16 precision, not to 1e-4.
    torch.testing.assert_close(torch.tensor(sp_losses), torch.tensor(single_losses), rtol=2e-2, atol=0)
    fp32 = _losses(world / "sp2-continuous") if (world / "sp2-continuous").exists() else None
    if fp32 is not None:
        assert sp_losses != fp32  # bf16 really ran: its losses differ from the fp32 run's in the last digits
    assert json.loads((sp_dir / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"


@pytest.mark.distributed
def test_sp_size_not_dividing_the_launch_is_one_line_before_any_work(world, tmp_path):
    config = _config(world, "continuous", tmp_path / "out")
    completed = _torchrun(config, "--sp_size", "4", "--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"))
    assert completed.returncode != 0
    assert "train.py: error: sp_size: 4 does not divide the 2 launched process(es)" in completed.stderr
    assert "Traceback (most recent call last)" not in completed.stderr.split("train.py: error")[0]
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# Memory-linear loss


def test_chunked_loss_and_gradients_equal_the_plain_loss():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    labels = torch.randint(0, 50, (2, 37))
    labels[0, :5] = -100
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)

    plain = torch.nn.functional.cross_entropy(
        lm_head(hidden).reshape(-1, 50), shift_labels.reshape(-1), ignore_index=-100
    )
    plain.backward()
    expected_grads = hidden.grad.clone(), lm_head.weight.grad.clone()
    hidden.grad = None
    lm_head.weight.grad = None

    nll_sum, tokens = loss.chunked_nll(hidden, lm_head, shift_labels, 8, recompute=True)
    chunked = nll_sum / tokens
    chunked.backward()
    assert tokens.item() == 2 * 36 - 4  # labels 1..4 of row 0 are masked (label 0 is never a target)
    torch.testing.assert_close(chunked, plain)
    torch.testing.assert_close(hidden.grad, expected_grads[0])
    torch.testing.assert_close(lm_head.weight.grad, expected_grads[1])


def test_trainer_with_loss_chunk_size_trains_like_the_plain_loss(world, tmp_path):
    plain_dir, chunked_dir = tmp_path / "plain", tmp_path / "chunked"
    train.main(["--config", str(_config(world, "continuous", plain_dir, gradient_accumulation_steps=2))])
    chunked = _config(world, "continuous", chunked_dir, gradient_accumulation_steps=2, loss_chunk_size=48)
    train.main(["--config", str(chunked)])
    torch.testing.assert_close(torch.tensor(_losses(chunked_dir)), torch.tensor(_losses(plain_dir)), rtol=1e-5, atol=0)
    for key, value in _weights(plain_dir).items():
        torch.testing.assert_close(_weights(chunked_dir)[key], value, rtol=1e-4, atol=1e-6, msg=key)


# ----------------------------------------------------------------------------------------------------------------
# Resume after a SIGKILL: the resumed run must follow the uninterrupted run's loss trajectory and end at its weights


KILL_AFTER_CHECKPOINT = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import torch.distributed as dist
from transformers import Trainer
import train

save_checkpoint = Trainer._save_checkpoint


def save_checkpoint_then_die(self, *args, **kwargs):
    save_checkpoint(self, *args, **kwargs)
    if self.state.global_step == int(os.environ["KILL_AFTER_STEP"]):
        if dist.is_initialized():
            dist.barrier()  # every rank's share of the checkpoint is on disk
        os.kill(os.getpid(), signal.SIGKILL)


Trainer._save_checkpoint = save_checkpoint_then_die
train.main(sys.argv[1:])
"""


def _run_killed_after_checkpoint(config: Path, step: int, *extra: str, processes: int = 2) -> None:
    """Run train.py with ``config`` and SIGKILL every process right after checkpoint-``step`` is written: the kill
    lands at a known step, so the resume point (and what it must skip) is fixed, not a race."""
    driver = config.with_name(config.stem + "-driver.py")
    driver.write_text(KILL_AFTER_CHECKPOINT)
    env = {"KILL_AFTER_STEP": str(step)}
    if processes == 2:
        completed = _torchrun(config, *extra, script=driver, **env)
        assert completed.returncode != 0 and "Signal 9 (SIGKILL)" in completed.stderr, completed.stderr[-3000:]
    else:
        command = [sys.executable, str(driver), "--config", str(config), *extra]
        # The threads of this process: the uninterrupted run it is compared with trains in process.
        env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "WANDB_MODE": "disabled", **env}
        completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == -9, completed.stderr[-3000:]
    output_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
    assert training.last_complete_checkpoint(output_dir) == str(output_dir / f"checkpoint-{step}")
    assert not (output_dir / "model.safetensors").exists()  # killed mid-run, not after it


def _assert_same_trajectory(resumed_dir: Path, whole_dir: Path, steps: int, rtol: float) -> None:
    whole_losses = _losses(whole_dir)
    assert len(set(whole_losses)) == len(whole_losses) == steps  # every step's batch leaves its own mark
    torch.testing.assert_close(torch.tensor(_losses(resumed_dir)), torch.tensor(whole_losses), rtol=rtol, atol=0)
    whole_weights, resumed_weights = _weights(whole_dir), _weights(resumed_dir)
    assert set(resumed_weights) == set(whole_weights)
    for key, value in whole_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=rtol, atol=1e-6, msg=key)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_two_rank_zero3_run_resumes_to_the_uninterrupted_loss_trajectory(world, tmp_path):
    zero3 = str(ROOT / "configs/deepspeed/zero3.json")
    # Distinct rows, so a resume that replayed or skipped the wrong data would change the losses.
    settings = dict(max_steps=8, save_strategy="steps", save_steps=1, lr_scheduler_type="linear")
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    completed = _torchrun(_config(world, "varied", whole_dir, **settings), "--deepspeed", zero3)
    assert completed.returncode == 0, completed.stderr[-3000:]

    killed_config = _config(world, "varied", killed_dir, **settings)
    _run_killed_after_checkpoint(killed_config, 2, "--deepspeed", zero3)
    completed = _torchrun(killed_config, "--deepspeed", zero3)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resuming from" in completed.stderr
    _assert_same_trajectory(killed_dir, whole_dir, steps=8, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_a_killed_zero3_sequence_parallel_run_resumes_to_the_uninterrupted_loss_trajectory(world, tmp_path):
    from datasets import load_from_disk

    # 6 distinct rows: each rank's loader holds 3 of them, and each loader batch is 2 SP micro-batches (one optimizer
    # step each), so an epoch is 6 steps. Killed after step 9, the resume starts in epoch 1 (reshuffled) with 3
    # micro-batches trained: one whole loader batch to skip, and one micro-batch of the next to drop. The uninterrupted
    # run must also train all 12 steps across the epoch boundary (DeepSpeed's adapter alone loses one there).
    six = load_from_disk(str(world / "varied"))
    six["train"] = six["train"].select(range(6))
    six.save_to_disk(str(tmp_path / "six"))
    launch = ("--sp_size", "2", "--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"))
    settings = dict(max_steps=12, save_strategy="steps", save_steps=3, lr_scheduler_type="linear")
    settings["dataset_path"] = str(tmp_path / "six")
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    completed = _torchrun(_config(world, "varied", whole_dir, **settings), *launch)
    assert completed.returncode == 0, completed.stderr[-3000:]

    killed_config = _config(world, "varied", killed_dir, **settings)
    _run_killed_after_checkpoint(killed_config, 9, *launch)
    completed = _torchrun(killed_config, *launch)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "resuming from" in completed.stderr
    _assert_same_trajectory(killed_dir, whole_dir, steps=12, rtol=1e-5)


def test_each_sequence_parallel_epoch_restarts_the_data_loader_shuffled_for_it_and_skips_in_its_sampler():
    from accelerate.data_loader import prepare_data_loader
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPDataLoaderAdapter

    loader = prepare_data_loader(
        torch.utils.data.DataLoader(list(range(12)), batch_size=2, shuffle=True),
        num_processes=1,
        process_index=0,
        use_seedable_sampler=True,
        data_seed=0,
    )
    orders = []
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        orders.append([batch.tolist() for batch in loader])
    assert orders[0] != orders[1]  # the shuffle depends on the epoch

    adapter = UlyssesSPDataLoaderAdapter(loader, sp_rank=0, sp_group=None, sp_world_size=2, device="cpu")
    loader.set_epoch(0)
    adapter.iter = iter(loader)
    assert [next(adapter.iter).tolist() for _ in range(6)] == orders[0]  # epoch 0 ends on a suspended iterator
    adapter.micro_batches.append({"input_ids": None})
    sequence_parallel.restart_epoch(adapter, 1)
    assert not adapter.micro_batches
    assert [batch.tolist() for batch in adapter.iter] == orders[1]

    sequence_parallel.restart_epoch(adapter, 1)
    # 4 micro-batches trained = 2 loader batches of 2 SP micro-batches each, skipped in the sampler (no row is read).
    skipped = sequence_parallel.skip_first_batches(adapter, 4)
    assert isinstance(skipped, UlyssesSPDataLoaderAdapter) and skipped.sp_world_size == 2
    assert [batch.tolist() for batch in skipped.dl] == orders[1][2:]
    assert [batch.tolist() for batch in adapter.dl] == orders[1]  # later epochs iterate the whole loader again


def test_resume_passes_over_a_checkpoint_killed_while_it_was_written(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        (tmp_path / f"checkpoint-{step}").mkdir()
        if complete:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert training.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-4")
    assert training.last_complete_checkpoint(tmp_path / "missing") is None


THREAD_REPORT = """
import json, os, sys
sys.path.insert(0, os.getcwd())
import train

train.main(sys.argv[1:])
names = []
for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/comm") as handle:
        names.append(handle.read().strip())
with open(os.path.join(os.environ["THREAD_REPORT_DIR"], os.environ["RANK"] + ".json"), "w") as handle:
    json.dump(names, handle)
"""


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads native thread names from /proc (Linux)")
def test_a_zero3_sequence_parallel_run_frees_its_process_groups_before_exit(world, tmp_path):
    # Process groups left to interpreter teardown aborted a finished rank now and then (SIGABRT, "terminate called
    # without an active exception"); every gloo thread must be gone when main() returns.
    driver = tmp_path / "driver.py"
    driver.write_text(THREAD_REPORT)
    config = _config(world, "continuous", tmp_path / "run", max_steps=1)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
    command += [str(free_port()), str(driver), "--config", str(config), "--sp_size", "2"]
    command += ["--deepspeed", str(ROOT / "configs/deepspeed/zero3.json")]
    reports = tmp_path / "threads"
    reports.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "THREAD_REPORT_DIR": str(reports)}
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert sorted(path.name for path in reports.iterdir()) == ["0.json", "1.json"]
    for path in reports.iterdir():
        names = json.loads(path.read_text())
        assert not [name for name in names if "gloo" in name], f"rank {path.stem} still runs {names}"


# ----------------------------------------------------------------------------------------------------------------
# LoRA (PEFT): adapters on q_proj and v_proj, embeddings and norms in full, the merged model saved


LORA = {"lora_r": 4, "lora_alpha": 8, "lora_target_modules": ["q_proj", "v_proj"], "learning_rate": 1.0e-2}


def test_lora_fine_tune_trains_only_adapters_embeddings_and_norms_and_saves_a_merged_stock_model(world, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    output_dir = tmp_path / "lora"
    config = _config(world, "continuous", output_dir, save_strategy="steps", save_steps=2, **LORA)
    train.main(["--config", str(config)])
    initial, merged = _weights(world / "model"), _weights(output_dir)
    assert set(merged) == set(initial)  # a plain model: no lora_ or base_layer keys
    trained = {key for key in initial if not torch.equal(merged[key], initial[key])}
    expected = {key for key in initial if any(part in key for part in ("q_proj", "v_proj", "embed_tokens", "norm"))}
    assert trained == expected  # k_proj, o_proj, the MLPs and lm_head are bit-identical to the start

    # The merge is PEFT's W + B A alpha / r with the adapters of the last checkpoint (step 2 = the last step).
    checkpoint = output_dir / "checkpoint-2"
    adapters = load_file(str(checkpoint / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    delta = adapters[f"{prefix}.lora_B.weight"] @ adapters[f"{prefix}.lora_A.weight"] * (8 / 4)
    key = "model.layers.0.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[key], initial[key] + delta, rtol=1e-5, atol=1e-6)
    # The checkpoint also holds what PEFT's adapter files leave out: the embeddings and norms trained in full.
    extra = load_file(str(checkpoint / lora.LORA_TRAINABLE_FILE_NAME))
    assert {name.split("model.model.", 1)[1] for name in extra} == {
        key for key in expected if "q_proj" not in key and "v_proj" not in key
    }
    torch.testing.assert_close(
        extra["base_model.model.model.embed_tokens.weight"], merged["model.embed_tokens.weight"]
    )

    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "longrope" and saved["use_cache"]
    assert saved[rope_config.SHA256_CONFIG_KEY] == factors.sha256_file(world / "factors.json")
    stock = AutoModelForCausalLM.from_pretrained(output_dir, attn_implementation="sdpa")
    assert not rope.installed_modules(stock)
    assert type(stock).__name__ == "LlamaForCausalLM" and stock.config.rope_parameters["rope_type"] == "longrope"
    assert (output_dir / "tokenizer.json").is_file()


def test_a_killed_lora_fine_tune_resumes_to_the_uninterrupted_loss_trajectory(world, tmp_path):
    # The adapters come back from PEFT's adapter files and the embeddings and norms from the checkpoint's extra file;
    # a resume that lost either (or the optimizer state of either) would bend the trajectory after step 3.
    settings = dict(**LORA, max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear")
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    train.main(["--config", str(_config(world, "varied", whole_dir, **settings))])
    killed_config = _config(world, "varied", killed_dir, **settings)
    _run_killed_after_checkpoint(killed_config, 3, processes=1)
    train.main(["--config", str(killed_config)])
    _assert_same_trajectory(killed_dir, whole_dir, steps=6, rtol=1e-5)


def test_lora_keys_are_checked(world, tmp_path, capsys):
    config = _config(world, "continuous", tmp_path / "out", lora_r=4, lora_trainable_modules=["embedings"])
    line = user_error(capsys, train.main, ["--config", str(config)])
    assert "lora_trainable_modules: no parameter name contains 'embedings'" in line
    config = _config(world, "continuous", tmp_path / "out", lora_r=4, lora_target_modules=["qproj"])
    assert "lora_target_modules: " in user_error(capsys, train.main, ["--config", str(config)])


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_with_tiled_mlp_and_offload_under_zero3_and_sequence_parallelism_matches_one_process(world, tmp_path):
    single_dir, sp_dir = tmp_path / "single", tmp_path / "sp2"
    train.main(["--config", str(_config(world, "continuous", single_dir, **LORA))])
    # The memory options ride along: TiledMLP (its per-slice ZeRO-3 gathers and delayed gradient reduction) and the
    # checkpoint offload change nothing numerically, so the run must still equal the plain 1-process one.
    memory = {"activation_checkpointing": True, "tiled_mlp": True, "offload_activations": True}
    config = _config(world, "continuous", sp_dir, **LORA, **memory)
    completed = _torchrun(config, "--sp_size", "2", "--deepspeed", str(ROOT / "configs/deepspeed/zero3.json"))
    assert completed.returncode == 0, completed.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(_losses(sp_dir)), torch.tensor(_losses(single_dir)), rtol=1e-4, atol=0)
    single, sharded = _weights(single_dir), _weights(sp_dir)
    assert set(single) == set(sharded)
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((sp_dir / "config.json").read_text())["rope_parameters"]["rope_type"] == "longrope"


# ----------------------------------------------------------------------------------------------------------------
# W&B: the factors file as an artifact of the (offline) run


def test_the_factors_file_is_logged_as_a_wandb_artifact(world, tmp_path):
    # A process of its own: W&B and accelerate keep process-wide singletons that other tests in the same (xdist
    # worker) process may have set up differently, and a launched run is what users get.
    wandb_dir = tmp_path / "wandb-dir"
    wandb_dir.mkdir()
    env = {name: value for name, value in os.environ.items() if name not in ("WANDB_API_KEY", "WANDB_BASE_URL")}
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(wandb_dir),
        WANDB_DATA_DIR=str(tmp_path / "wandb-data"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
        WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"),
        WANDB_INIT_TIMEOUT="600",  # a loaded CI machine can take longer than the default 90 s; W&B speaks on stderr
        OMP_NUM_THREADS="1",
    )
    config = _config(world, "continuous", tmp_path / "out", max_steps=1, report_to="wandb", run_name="artifact-test")
    command = [sys.executable, "train.py", "--config", str(config)]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    runs = sorted(wandb_dir.glob("wandb/offline-run-*"))
    assert len(runs) == 1, (runs, result.stderr[-4000:])  # once seen empty under load: keep what W&B said
    records = list(_wandb_records(next(runs[0].glob("*.wandb"))))
    artifacts = [record.artifact for record in records if record.WhichOneof("record_type") == "artifact"]
    factor_artifacts = [artifact for artifact in artifacts if artifact.type == "longrope-factors"]
    assert len(factor_artifacts) == 1, [artifact.type for artifact in artifacts]
    artifact = factor_artifacts[0]
    digest = factors.sha256_file(world / "factors.json")
    assert artifact.name == f"factors-{digest[:12]}"
    entries = {entry.path: entry for entry in artifact.manifest.contents}
    assert set(entries) == {factors.FACTORS_FILE_NAME}
    staged = Path(entries[factors.FACTORS_FILE_NAME].local_path)
    assert factors.sha256_file(staged) == digest  # the very file the run trained with


def _wandb_records(path: Path):
    """The protobuf records of an offline run's .wandb file: a 7-byte W&B header, then LevelDB-log blocks of 32 KiB
    holding (crc32, length, type) framed chunks; wandb 0.31's Go core has no Python reader for it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block, position, pending = path.read_bytes(), 32768, 7, b""
    assert data.startswith(b":W&B")
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate against a real run


@pytest.mark.slow
def test_the_memory_estimate_tracks_a_real_run_between_two_lengths(tmp_path):
    """The peak RSS of a CPU process holds the interpreter, libraries and model, so only the growth between two
    lengths is compared: the estimate's activation and logits rows against the difference of the training peaks
    ThroughputCallback logs (peak RSS since the first step began)."""
    from datasets import Dataset, DatasetDict
    from transformers import AutoModelForCausalLM

    tokenizer = corpus.build_byte_tokenizer()
    config = _tiny_llama_config(
        len(tokenizer),
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=64,
        max_position_embeddings=8192,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    lengths, peaks, estimates = (2048, 8192), [], []
    for length in lengths:
        rows = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(0)).tolist()
        DatasetDict({"train": Dataset.from_dict({"input_ids": rows})}).save_to_disk(str(tmp_path / f"data-{length}"))
        settings = dict(
            rope_method="none",
            rope_factors_path=None,
            dataset_path=str(tmp_path / f"data-{length}"),
            max_steps=1,
            activation_checkpointing=True,
            loss_chunk_size=512,
            use_cpu=True,
        )
        path = _config(tmp_path, "unused", tmp_path / f"run-{length}", **settings)
        completed = subprocess.run(
            [sys.executable, "train.py", "--config", str(path)],
            cwd=ROOT,
            # A fixed mmap threshold returns freed tensors to the OS, so RSS follows the live tensors (no heap holes).
            env={**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled", "MALLOC_MMAP_THRESHOLD_": "65536"},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        state = json.loads((tmp_path / f"run-{length}" / "trainer_state.json").read_text())
        peaks.append(next(entry["peak_memory_gib"] for entry in state["log_history"] if "loss" in entry))
        estimate = train.main(["--config", str(path), "--estimate_memory", "true"])
        estimates.append(sum(row["gpu_gib"] for row in estimate["rows"]))
    measured, estimated = peaks[1] - peaks[0], estimates[1] - estimates[0]
    assert measured > 0 and estimated > 0
    # The estimate counts every saved tensor's gradient as live at once: it is an upper bound, within 2x.
    assert 0.5 <= measured / estimated <= 1.2, (measured, estimated)
