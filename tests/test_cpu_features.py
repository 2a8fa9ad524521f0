"""longrope/cpu_features.py: which CPUs compute bf16 natively, and the one warning where bf16 would be emulated."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_train import TINY_MODEL

from longrope import corpus, cpu_attention, cpu_features, modeling, train_args
from longrope.args import ModelArguments

AVX2_EPYC = frozenset({"fpu", "sse4_2", "avx", "avx2", "fma"})
ZEN4 = AVX2_EPYC | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}
SAPPHIRE_RAPIDS = AVX2_EPYC | {"amx_bf16", "amx_tile"}


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be a CPU with the given flags (x86-64), with the warning not yet given."""

    def become(flags):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda: flags)
        monkeypatch.setattr(cpu_features.platform, "machine", lambda: "x86_64")
        monkeypatch.setattr(cpu_features, "_warned", False)

    return become


@pytest.mark.parametrize(
    ("flags", "emulated"), [(AVX2_EPYC, True), (ZEN4, False), (SAPPHIRE_RAPIDS, False), (frozenset(), False)]
)
def test_native_bf16_needs_avx512_bf16_or_amx_and_an_unknown_cpu_is_not_accused(cpu, flags, emulated):
    cpu(flags)
    assert cpu_features.lacks_native_bf16() is emulated


def test_the_warning_names_the_key_and_the_fix_once_per_process(cpu):
    cpu(AVX2_EPYC)
    with pytest.warns(UserWarning) as caught:
        cpu_features.warn_if_bf16_is_emulated("dtype")
        cpu_features.warn_if_bf16_is_emulated("dtype")
    assert len(caught) == 1
    message = str(caught[0].message)
    assert (
        message.startswith("dtype: bfloat16 on this CPU (no avx512_bf16 or amx_bf16)") and "dtype: float32" in message
    )


def test_only_rank_zero_warns(cpu, monkeypatch):
    cpu(AVX2_EPYC)
    monkeypatch.setenv("RANK", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cpu_features.warn_if_bf16_is_emulated("dtype")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a bf16 model goes to the GPU there")
def test_a_bf16_model_or_bf16_training_on_an_emulating_cpu_warns_and_a_native_one_does_not(cpu, tmp_path):
    tokenizer = corpus.build_byte_tokenizer()
    args = ModelArguments(model_config=dict(TINY_MODEL), dtype="bfloat16")
    cpu(AVX2_EPYC)
    with pytest.warns(UserWarning, match="^dtype: bfloat16 on this CPU"):
        model = modeling.build_model(args, tokenizer)
    assert model.dtype == torch.bfloat16  # a warning, not a change of what was asked
    cpu(AVX2_EPYC)
    with pytest.warns(UserWarning, match="^bf16: bfloat16 on this CPU.*bf16: false for training"):
        assert train_args.LongRopeTrainingArguments(output_dir=str(tmp_path), bf16=True).use_cpu
    cpu(ZEN4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modeling.build_model(args, tokenizer)


def test_the_kernel_reads_the_same_flags(cpu):
    cpu(AVX2_EPYC)
    assert cpu_attention.unavailable_reason() == "this CPU lacks avx512f, avx512bw, avx512vl, avx512_bf16"
    cpu(ZEN4)
    assert "lacks" not in (cpu_attention.unavailable_reason() or "")


def test_the_cpu_is_named_with_its_family_because_a_virtual_machine_may_say_only_amd_epyc():
    block = "processor\t: {n}\ncpu family\t: {family}\nmodel\t\t: 2\nmodel name\t: AMD EPYC\nflags\t: fpu avx2\n\n"
    fields = cpu_features.parse_cpuinfo(block.format(n=0, family=26) + block.format(n=1, family=25))
    assert fields["flags"] == "fpu avx2"  # what cpu_flags() splits
    assert cpu_features.cpu_description(fields) == "AMD EPYC (cpu family 26, model 2)"
    assert cpu_features.cpu_description(cpu_features.parse_cpuinfo("processor\t: 0\nmodel name\t: Some\n")) == "Some"
