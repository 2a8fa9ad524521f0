"""train.py's memory options in process: DeepSpeed's TiledMLP and checkpoint offload leave the loss and gradients
unchanged and are really used; the per-GPU memory estimate against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from longrope import memory_estimate, memory_options, train_args, training
from longrope.errors import LongRopeError
from longrope.trainer import LongContextTrainer

LAYERS = 3
HIDDEN = 64
INTERMEDIATE = 128
VOCAB = 256


def _tiny_config(**overrides):
    values = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return tiny_config("llama", **{**values, **overrides})


@pytest.fixture
def no_zero3_afterwards():
    """Arguments with a deepspeed key register ZeRO-3 globally in transformers; later tests must not inherit it."""
    yield
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def _one_training_step(tmp_path, **options) -> tuple[float, dict[str, torch.Tensor], LongContextTrainer]:
    """Loss and gradients of one Trainer step (activation checkpointing on) of the same model on the same batch."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(), attn_implementation="sdpa")
    args = train_args.LongRopeTrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", activation_checkpointing=True, **options
    )
    if args.tiled_mlp:
        memory_options.enable_tiled_mlp(model, args.tiled_mlp_shards)
    model.activation_checkpointing_enable()  # Trainer.train() does it; this test calls training_step directly
    trainer = LongContextTrainer(model=model, args=args)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train()
    input_ids = torch.randint(0, VOCAB, (2, 256), generator=torch.Generator().manual_seed(1))
    loss = trainer.training_step(model, {"input_ids": input_ids, "labels": input_ids})
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.item(), grads, trainer


def _assert_same(result, reference):
    assert result[0] == pytest.approx(reference[0], rel=1e-6)
    assert set(result[1]) == set(reference[1])
    for name, grad in reference[1].items():
        torch.testing.assert_close(result[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_tiled_mlp_gives_the_same_loss_and_gradients_and_tiles_every_mlp(tmp_path, monkeypatch):
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    reference = _one_training_step(tmp_path)
    calls = []
    original_forward = TiledMLP.forward

    def counting_forward(ctx, fn, module, x, shards, compute_params):
        calls.append((x.shape[-2], shards))
        return original_forward(ctx, fn, module, x, shards, compute_params)

    monkeypatch.setattr(TiledMLP, "forward", staticmethod(counting_forward))
    _assert_same(_one_training_step(tmp_path, tiled_mlp=True), reference)
    # Every layer's MLP, in forward and in the checkpoint recompute; default tiles: ceil(256 / hidden 64) = 4.
    assert calls == [(256, 4)] * (2 * LAYERS)

    calls.clear()
    _assert_same(_one_training_step(tmp_path, tiled_mlp=True, tiled_mlp_shards=3), reference)
    assert calls == [(256, 3)] * (2 * LAYERS)


def test_activation_offload_gives_the_same_loss_and_gradients_and_marks_every_checkpointed_layer(tmp_path):
    reference = _one_training_step(tmp_path)
    loss, grads, trainer = _one_training_step(tmp_path, offload_activations=True)
    _assert_same((loss, grads), reference)
    totals = trainer.activation_offload_totals
    # One checkpointed hidden state per decoder layer is handed to the offload engine; on a CPU-only machine it has
    # nowhere to move them (DeepSpeed's CPU accelerator is synchronous) and keeps them.
    assert totals["marked_tensors"] == LAYERS
    assert totals["skipped_marked_tensors"] + totals["offloaded_tensors"] + totals["kept_last_tensors"] >= LAYERS


def test_activation_offload_really_moves_and_restores_the_hidden_states(tmp_path, monkeypatch):
    # Let the engine treat CPU tensors as device tensors: the whole offload path (copy out, restore in backward) runs.
    from deepspeed.runtime.activation_checkpointing import offload_activations

    monkeypatch.setattr(
        offload_activations._ActivationOffloadEngine,
        "_should_skip",
        lambda self, tensor: self._num_bytes(tensor) < self.min_offload_bytes,
    )
    reference = _one_training_step(tmp_path)
    loss, grads, trainer = _one_training_step(tmp_path, offload_activations=True)
    _assert_same((loss, grads), reference)
    totals = trainer.activation_offload_totals
    # DeepSpeed keeps the newest input where it is (backward needs it first) and moves the others.
    assert totals["offloaded_tensors"] == LAYERS - 1 and totals["restored_tensors"] == LAYERS - 1
    assert totals["offloaded_bytes"] == (LAYERS - 1) * 2 * 256 * HIDDEN * 4


def test_memory_options_are_one_line_errors(tmp_path):
    with pytest.raises(LongRopeError, match="offload_activations: .* set activation_checkpointing: true"):
        train_args.LongRopeTrainingArguments(output_dir=str(tmp_path), use_cpu=True, offload_activations=True)
    with pytest.raises(LongRopeError, match="tiled_mlp_shards: 0 must be a positive integer"):
        train_args.LongRopeTrainingArguments(output_dir=str(tmp_path), use_cpu=True, tiled_mlp_shards=0)
    with pytest.raises(LongRopeError, match="lora_r: -1 must be an integer >= 0"):
        train_args.LongRopeTrainingArguments(output_dir=str(tmp_path), use_cpu=True, lora_r=-1)
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(LongRopeError, match="tiled_mlp: the model has no gated MLP"):
        memory_options.enable_tiled_mlp(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))


# ----------------------------------------------------------------------------------------------------------------
# Memory estimate


def _estimate_args(tmp_path, **overrides) -> train_args.LongRopeTrainingArguments:
    values = dict(
        output_dir=str(tmp_path),
        estimate_memory=True,
        bf16=True,
        per_device_train_batch_size=1,
        activation_checkpointing=True,
        deepspeed="configs/deepspeed/zero3.json",
    )
    values.update(overrides)
    return train_args.LongRopeTrainingArguments(**values)


def _row(estimate, name: str) -> float:
    return next(gpu for component, gpu, _, _ in estimate.rows if component == name) * 2**30


def test_memory_estimate_matches_the_hand_computed_formula(tmp_path, no_zero3_afterwards, monkeypatch):
    monkeypatch.chdir(training.Path(__file__).resolve().parents[1])
    config = _tiny_config()
    estimate = memory_estimate.estimate_memory(config, _estimate_args(tmp_path), seq_len=1024, world_size=4)
    q = kv = 2 * 32
    layer = 4 * HIDDEN * q + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN  # q, k, v, o; gate, up, down; two norms
    parameters = 2 * VOCAB * HIDDEN + LAYERS * layer + HIDDEN
    assert estimate.num_parameters == parameters == estimate.trainable_parameters
    assert _row(estimate, "model states (weights, grads, Adam)") == 16 * parameters / 4
    assert _row(estimate, "ZeRO-3 gathered weights") == 2 * 2 * max(layer, VOCAB * HIDDEN)
    assert _row(estimate, "checkpointed hidden states") == LAYERS * 1024 * HIDDEN * 2
    attention = 1024 * (2 * HIDDEN + 2 * q + 3 * kv) * 2 * 2 + 1024 * 2 * 4
    assert _row(estimate, "layer recompute: attention") == attention
    assert _row(estimate, "layer recompute: MLP") == 1024 * (2 * HIDDEN + 4 * INTERMEDIATE) * 2 * 2
    assert _row(estimate, "logits and loss") == 1024 * VOCAB * (2 + 8)
    assert estimate.gpu_gib == pytest.approx(sum(row[1] for row in estimate.rows))
    assert "**total per GPU**" in estimate.table()


def test_memory_estimate_scales_with_sp_size_loss_chunks_tiles_lora_and_offload(
    tmp_path, no_zero3_afterwards, monkeypatch
):
    monkeypatch.chdir(training.Path(__file__).resolve().parents[1])
    config = _tiny_config()
    activations = ("checkpointed hidden states", "layer recompute: attention", "layer recompute: MLP")
    base = memory_estimate.estimate_memory(config, _estimate_args(tmp_path), seq_len=2048, world_size=4)
    sp2 = memory_estimate.estimate_memory(config, _estimate_args(tmp_path, sp_size=2), seq_len=2048, world_size=4)
    for name in activations + ("logits and loss",):
        assert _row(sp2, name) == _row(base, name) / 2, name
    assert _row(sp2, "model states (weights, grads, Adam)") == _row(base, "model states (weights, grads, Adam)")

    chunked = memory_estimate.estimate_memory(
        config, _estimate_args(tmp_path, loss_chunk_size=256), seq_len=2048, world_size=4
    )
    assert _row(chunked, "logits and loss") == _row(base, "logits and loss") / 8

    tiled = memory_estimate.estimate_memory(
        config, _estimate_args(tmp_path, tiled_mlp=True), seq_len=2048, world_size=4
    )
    tiles = 2048 // HIDDEN
    assert _row(tiled, "layer recompute: MLP") == (2048 * 2 * HIDDEN + 2048 // tiles * 4 * INTERMEDIATE) * 2 * 2

    lora = memory_estimate.estimate_memory(
        config, _estimate_args(tmp_path, lora_r=8, lora_target_modules=["q_proj"]), seq_len=2048, world_size=4
    )
    unfrozen = 2 * VOCAB * HIDDEN - VOCAB * HIDDEN + (2 * LAYERS + 1) * HIDDEN  # embed_tokens and the norms
    assert lora.trainable_parameters == LAYERS * 8 * (HIDDEN + 2 * 32) + unfrozen
    frozen = lora.num_parameters - lora.trainable_parameters
    expected_states = (16 * lora.trainable_parameters + 2 * frozen) / 4
    assert _row(lora, "model states (weights, grads, Adam)") == expected_states

    offload = _estimate_args(tmp_path, deepspeed="configs/deepspeed/zero3_offload.json", offload_activations=True)
    moved = memory_estimate.estimate_memory(config, offload, seq_len=2048, world_size=4)
    assert moved.cpu_gib > 0 and moved.gpu_gib < base.gpu_gib
    assert _row(moved, "model states (weights, grads, Adam)") == 2 * base.num_parameters / 4  # gradients only
