"""The cpu_bf16 attention kernel (longrope/cpu_attention.py): against an fp32 reference and sdpa, inside real models
(prefill and cached decoding), and every call it hands to sdpa. The kernel needs AVX512-BF16; on a CPU without it
those tests skip with the reason, and the fallback tests (which need no kernel) still run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from longrope import cpu_attention
from longrope.errors import LongRopeError

REASON = cpu_attention.unavailable_reason()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"cpu_bf16 kernel: {REASON}")


def reference(query, key, value, scale):
    """fp32 causal attention, bottom-right aligned (query i at position Lk - Lq + i), as [B, Lq, Hq, D]."""
    q_len, k_len = query.shape[2], key.shape[2]
    group = query.shape[1] // key.shape[1]
    keys = key.float().repeat_interleave(group, 1)
    values = value.float().repeat_interleave(group, 1)
    scores = query.float() @ keys.transpose(-1, -2) * scale
    allowed = torch.arange(k_len)[None, :] <= torch.arange(q_len)[:, None] + (k_len - q_len)
    return (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ values).transpose(1, 2)


def _inputs(batch, q_heads, kv_heads, q_len, k_len, dim, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = ((batch, q_heads, q_len, dim), (batch, kv_heads, k_len, dim), (batch, kv_heads, k_len, dim))
    return [torch.randn(*shape, generator=generator).bfloat16() for shape in shapes]


@needs_kernel
@pytest.mark.parametrize(
    "shape",
    [
        (1, 9, 3, 300, 300, 64),  # SmolLM2's heads: 3 query heads per key/value head
        (2, 4, 4, 37, 37, 32),  # no grouping, a length that fills no tile
        (1, 8, 2, 1, 777, 128),  # one decoding step against a cache
        (1, 6, 3, 70, 300, 64),  # a chunk of queries after a cached prefix
        (1, 2, 1, 513, 513, 256),  # the largest head size, a length one past a key block
    ],
)
def test_kernel_matches_fp32_attention_as_closely_as_sdpa(shape):
    query, key, value = _inputs(*shape)
    scale = shape[-1] ** -0.5
    expected = reference(query, key, value, scale)
    ours = cpu_attention.causal_attention(query, key, value, scale)
    assert ours.shape == expected.shape and ours.dtype == torch.bfloat16
    error = (ours.float() - expected).abs().max().item()
    # bf16 output rounding is 2^-8 relative; outputs here are below 1 in magnitude.
    assert error < 8e-3, error
    if shape[3] == shape[4]:
        sdpa = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
        assert error <= 1.5 * (sdpa.float() - expected).abs().max().item() + 1e-3


@needs_kernel
def test_kernel_reads_a_strided_query_and_is_causal():
    query, key, value = _inputs(1, 4, 2, 96, 96, 64, seed=1)
    strided = query.transpose(1, 2).contiguous().transpose(1, 2)  # [B, H, L, D] view of [B, L, H, D] memory
    assert not strided.is_contiguous()
    first = cpu_attention.causal_attention(strided, key, value, 0.125)
    assert torch.equal(first, cpu_attention.causal_attention(query, key, value, 0.125))
    # Changing the last key changes only the last query's output.
    changed = key.clone()
    changed[:, :, -1] += 3.0
    second = cpu_attention.causal_attention(query, changed, value, 0.125)
    assert torch.equal(first[:, :-1], second[:, :-1]) and not torch.equal(first[:, -1], second[:, -1])


def _model(attention: str, dtype=torch.bfloat16, **overrides):
    import transformers

    if attention == cpu_attention.NAME:
        cpu_attention.register()
    config = tiny_config("llama", attn_implementation=attention, **overrides)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()


@needs_kernel
def test_a_model_with_the_kernel_matches_sdpa_in_prefill_and_cached_generation():
    # SmolLM2's grouping and head size (9 query heads, 3 key/value heads of 64) at a small width.
    shape = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=128)
    ours, sdpa = _model(cpu_attention.NAME, **shape), _model("sdpa", **shape)
    sdpa.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        a, b = ours(ids).logits.float(), sdpa(ids).logits.float()
        assert (a - b).abs().max().item() < 0.05 * b.abs().max().item()
        generated = ours.generate(ids, max_new_tokens=8, do_sample=False)
        expected = sdpa.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, 208)
    # Greedy decoding through the KV cache (query length 1 against a growing cache) picks sdpa's tokens.
    assert torch.equal(generated, expected)


@pytest.mark.parametrize("case", ["gradient", "mask", "float32"])
def test_calls_the_kernel_does_not_cover_run_sdpa_and_say_why_once(case, caplog, monkeypatch):
    """No kernel needed: the reason is found before the kernel would be called."""
    import transformers

    monkeypatch.setattr(cpu_attention, "_reported", set())
    monkeypatch.setattr(cpu_attention, "library", lambda: pytest.fail("the kernel must not be called"))
    transformers.AttentionInterface.register(cpu_attention.NAME, cpu_attention.attention_forward)
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionMaskInterface.register(cpu_attention.NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    dtype = torch.float32 if case == "float32" else torch.bfloat16
    config_ours = tiny_config("llama", attn_implementation=cpu_attention.NAME)
    config_sdpa = tiny_config("llama", attn_implementation="sdpa")
    torch.manual_seed(0)
    ours = transformers.AutoModelForCausalLM.from_config(config_ours).to(dtype)
    sdpa = transformers.AutoModelForCausalLM.from_config(config_sdpa).to(dtype)
    sdpa.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if case == "mask":
        mask[1, :5] = 0  # left padding
    expected_reason = {"gradient": "a gradient is needed", "mask": "attention mask", "float32": "bf16 CPU tensors"}
    with caplog.at_level(logging.WARNING, logger="longrope.cpu_attention"):
        for _ in range(2):
            if case == "gradient":
                ours.train()
                sdpa.train()
                a, b = ours(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
                a.sum().backward()
                assert ours.model.layers[0].self_attn.q_proj.weight.grad is not None
            else:
                ours.eval()
                sdpa.eval()
                with torch.inference_mode():
                    a, b = ours(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits
            assert torch.equal(a, b)
    said = [r.getMessage() for r in caplog.records if "runs sdpa" in r.getMessage()]
    assert len(said) == 1 and expected_reason[case] in said[0], said


def test_an_unavailable_kernel_falls_back_to_sdpa_with_a_warning(monkeypatch):
    from longrope import modeling

    monkeypatch.setattr(cpu_attention, "unavailable_reason", lambda: "this CPU lacks avx512_bf16")
    with pytest.warns(UserWarning, match="cpu_bf16 this CPU lacks avx512_bf16; falling back to sdpa"):
        assert modeling.resolve_attn_implementation("cpu_bf16") == "sdpa"


@needs_kernel
def test_a_failed_build_is_one_line_and_leaves_no_library(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGROPE_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    cpu_attention.library.cache_clear()
    try:
        with pytest.raises(LongRopeError, match=r"^attn_implementation: cpu_bf16 failed to compile .*; use sdpa$"):
            cpu_attention.library()
        assert not list((tmp_path / "cache").glob("*.so"))
    finally:
        cpu_attention.library.cache_clear()


@needs_kernel
def test_the_library_is_built_once_per_source_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGROPE_KERNEL_CACHE", str(tmp_path))
    cpu_attention.library.cache_clear()
    try:
        cpu_attention.library()
        built = list(tmp_path.glob("cpu_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        cpu_attention.library.cache_clear()
        cpu_attention.library()
        assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt
    finally:
        cpu_attention.library.cache_clear()
