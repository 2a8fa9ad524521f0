"""RoPE core: every method against transformers' own implementation, on every supported architecture."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import transformers
from conftest import BASELINE_ARCHITECTURES, ORIGINAL_LENGTH, tiny_config, tiny_model

from longrope import rope
from longrope.errors import LongRopeError

TARGET = 4 * ORIGINAL_LENGTH


def logits(model, length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def stock_twin(model, arch: str, rope_parameters: dict, max_position_embeddings: int):
    """A stock transformers model with the same weights, configured with ``rope_parameters``."""
    config = tiny_config(arch, rope_parameters=rope_parameters, max_position_embeddings=max_position_embeddings)
    twin = transformers.AutoModelForCausalLM.from_config(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def random_factors(geometry: rope.RopeGeometry, high: float, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    values = 1.0 + (high - 1.0) * torch.rand(geometry.num_pairs, generator=generator, dtype=torch.float64)
    return sorted(values.tolist())


def test_identity_factors_leave_the_model_unchanged(arch):
    model = tiny_model(arch)
    before = logits(model, 3 * ORIGINAL_LENGTH)
    geometry = rope.RopeGeometry.from_config(model.config)
    scaling = rope.longrope_scaling(geometry, TARGET, [1.0] * geometry.num_pairs, mscale=1.0)
    rope.install(model, scaling)
    identity = logits(model, 3 * ORIGINAL_LENGTH)
    # The installed angles are float64 (stock: fp32, off by ~1e-5 rad at these positions), so equal up to that.
    torch.testing.assert_close(identity, before, atol=1e-5, rtol=0)
    rope.install(model, rope.none_scaling(geometry))
    assert torch.equal(logits(model, 3 * ORIGINAL_LENGTH), identity)


@pytest.mark.parametrize("length", [ORIGINAL_LENGTH // 2, ORIGINAL_LENGTH, 3 * ORIGINAL_LENGTH])
def test_longrope_matches_stock_transformers(arch, length):
    model = tiny_model(arch)
    geometry = rope.RopeGeometry.from_config(model.config)
    long_factors = random_factors(geometry, 6.0, seed=2)
    short_factors = random_factors(geometry, 1.5, seed=3)
    scaling = rope.longrope_scaling(geometry, TARGET, long_factors, short_factors, mscale="su")
    twin = stock_twin(
        model,
        arch,
        {
            "rope_type": "longrope",
            "long_factor": long_factors,
            "short_factor": short_factors,
            "original_max_position_embeddings": ORIGINAL_LENGTH,
        },
        TARGET,
    )
    expected = logits(twin, length)
    rope.install(model, scaling)
    torch.testing.assert_close(logits(model, length), expected, atol=1e-5, rtol=0)
    # The attention factor of both is the `su` policy.
    assert math.isclose(scaling.mscale, math.sqrt(1 + math.log(4) / math.log(ORIGINAL_LENGTH)))


@pytest.mark.parametrize(
    ("method", "rope_parameters", "stock_max_positions"),
    [
        ("pi", {"rope_type": "linear", "factor": 4.0}, TARGET),
        ("yarn", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_LENGTH}, TARGET),
        ("dynamic_ntk", {"rope_type": "dynamic", "factor": 4.0}, ORIGINAL_LENGTH),
    ],
)
@pytest.mark.parametrize("length", [ORIGINAL_LENGTH, 3 * ORIGINAL_LENGTH])
@pytest.mark.parametrize("arch", BASELINE_ARCHITECTURES)
def test_baselines_match_stock_transformers(arch, method, rope_parameters, stock_max_positions, length):
    model = tiny_model(arch)
    twin = stock_twin(model, arch, rope_parameters, stock_max_positions)
    expected = logits(twin, length)
    geometry = rope.RopeGeometry.from_config(model.config)
    mscale = "yarn" if method == "yarn" else None
    rope.install(model, rope.build_scaling(method, geometry, TARGET, mscale=mscale))
    torch.testing.assert_close(logits(model, length), expected, atol=1e-5, rtol=0)


def test_ntk_is_the_ntk_aware_base_change():
    geometry = rope.RopeGeometry(10000.0, 32, 32, 64)
    scaling = rope.ntk_scaling(geometry, 512)
    new_base = 10000.0 * 8 ** (32 / 30)
    expected = [(new_base / 10000.0) ** (2 * i / 32) for i in range(16)]
    assert scaling.long_factors[0] == pytest.approx(1.0)
    assert list(scaling.long_factors) == pytest.approx(expected, rel=1e-5)


def test_pi_and_yarn_factor_shapes():
    geometry = rope.RopeGeometry(10000.0, 64, 64, 256)
    pi = rope.pi_scaling(geometry, 2048)
    assert pi.long_factors == pytest.approx((8.0,) * 32)
    yarn = rope.yarn_scaling(geometry, 2048)
    # YaRN extrapolates the fastest pairs, interpolates the slowest, and is monotone in between.
    assert yarn.long_factors[0] == pytest.approx(1.0)
    assert yarn.long_factors[-1] == pytest.approx(8.0)
    assert all(a <= b + 1e-9 for a, b in zip(yarn.long_factors, yarn.long_factors[1:]))
    assert yarn.mscale == pytest.approx(0.1 * math.log(8) + 1)


def eq3_cos_sin(geometry, factors, start_tokens, mscale, positions):
    """Eq. 3 of the paper, written directly: angle = n θ_i for n < n̂, n θ_i / λ_i otherwise."""
    cos_rows, sin_rows = [], []
    for n in positions:
        angles = []
        for i in range(geometry.num_pairs):
            theta = geometry.rope_theta ** (-2 * i / geometry.rotary_dim)
            angles.append(n * theta if n < start_tokens else n * theta / factors[i])
        angles = angles + angles
        scale = 1.0 if n < start_tokens else mscale
        cos_rows.append([scale * math.cos(a) for a in angles])
        sin_rows.append([scale * math.sin(a) for a in angles])
    return torch.tensor(cos_rows, dtype=torch.float64), torch.tensor(sin_rows, dtype=torch.float64)


@pytest.mark.parametrize("start_tokens", [0, 4, 16])
def test_start_tokens_follow_equation_3(start_tokens):
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    factors = random_factors(geometry, 8.0, seed=5)
    scaling = rope.longrope_scaling(geometry, TARGET, factors, start_tokens=start_tokens, mscale="su")
    module = rope.ScaledRotaryEmbedding(scaling)
    positions = list(range(3 * ORIGINAL_LENGTH))
    cos, sin = module(torch.zeros(1, dtype=torch.float32), torch.tensor([positions]))
    expected_cos, expected_sin = eq3_cos_sin(geometry, factors, start_tokens, scaling.mscale, positions)
    torch.testing.assert_close(cos[0].double(), expected_cos, atol=2e-5, rtol=0)
    torch.testing.assert_close(sin[0].double(), expected_sin, atol=2e-5, rtol=0)


def test_start_tokens_change_the_model_only_when_nonzero():
    model = tiny_model("llama")
    geometry = rope.RopeGeometry.from_config(model.config)
    factors = random_factors(geometry, 8.0, seed=6)
    rope.install(model, rope.longrope_scaling(geometry, TARGET, factors, start_tokens=0))
    without = logits(model, 2 * ORIGINAL_LENGTH)
    rope.install(model, rope.longrope_scaling(geometry, TARGET, factors, start_tokens=8))
    with_start = logits(model, 2 * ORIGINAL_LENGTH)
    assert not torch.allclose(without, with_start)


def test_switching_factors_100_times_leaves_no_stale_state():
    model = tiny_model("qwen3")
    geometry = rope.RopeGeometry.from_config(model.config)
    modules_before = None
    for step in range(100):
        factors = random_factors(geometry, 2.0 + step % 7, seed=step)
        short = random_factors(geometry, 1.2, seed=1000 + step) if step % 2 else None
        scaling = rope.longrope_scaling(geometry, TARGET, factors, short, start_tokens=step % 3, mscale="su")
        installed = rope.install(model, scaling, selection=("auto", "long")[step % 2])
        if step % 10 == 0:
            logits(model, 2 * ORIGINAL_LENGTH)  # exercise the caches between switches
        if modules_before is None:
            modules_before = [id(m) for m in installed]
        assert [id(m) for m in installed] == modules_before, "switching must reuse the installed modules"
    final = logits(model, 2 * ORIGINAL_LENGTH)
    fresh = tiny_model("qwen3")
    rope.install(fresh, scaling)
    assert torch.equal(final, logits(fresh, 2 * ORIGINAL_LENGTH))


def test_selection_per_sequence_and_forced():
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    long_factors = [4.0] * 16
    short_factors = [1.0] * 16
    module = rope.ScaledRotaryEmbedding(
        rope.longrope_scaling(geometry, TARGET, long_factors, short_factors, mscale=1.0)
    )
    x = torch.zeros(1)
    # Two packed sequences in one batch: one short, one long. Each gets its own factor set.
    position_ids = torch.stack(
        [torch.arange(2 * ORIGINAL_LENGTH) % ORIGINAL_LENGTH, torch.arange(2 * ORIGINAL_LENGTH)]
    )
    cos, _ = module(x, position_ids)
    plain = rope.ScaledRotaryEmbedding(rope.none_scaling(geometry))
    long_only = rope.ScaledRotaryEmbedding(rope.longrope_scaling(geometry, TARGET, long_factors, mscale=1.0))
    torch.testing.assert_close(cos[0], plain(x, position_ids[:1])[0][0])
    torch.testing.assert_close(cos[1], long_only(x, position_ids[1:])[0][0])
    module.selection = "long"
    torch.testing.assert_close(module(x, position_ids)[0][0], long_only(x, position_ids[:1])[0][0])


def test_short_mscale_scales_the_short_rows_only():
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    long_factors, short_factors = [4.0] * 16, [1.0] * 16
    scaling = rope.longrope_scaling(geometry, TARGET, long_factors, short_factors, mscale=1.3, short_mscale=1.1)
    module = rope.ScaledRotaryEmbedding(scaling)
    x = torch.zeros(1, dtype=torch.float64)
    position_ids = torch.stack(
        [torch.arange(2 * ORIGINAL_LENGTH) % ORIGINAL_LENGTH, torch.arange(2 * ORIGINAL_LENGTH)]
    )
    plain_cos, plain_sin = rope.ScaledRotaryEmbedding(rope.none_scaling(geometry))(x, position_ids)
    long_cos, long_sin = rope.ScaledRotaryEmbedding(rope.longrope_scaling(geometry, TARGET, long_factors))(
        x, position_ids
    )
    long_unit = long_cos / rope.resolve_mscale("su", TARGET / ORIGINAL_LENGTH, ORIGINAL_LENGTH)[0]
    cos, sin = module(x, position_ids)
    torch.testing.assert_close(cos[0], 1.1 * plain_cos[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(sin[0], 1.1 * plain_sin[0], rtol=1e-12, atol=0)
    torch.testing.assert_close(cos[1], 1.3 * long_unit[1], rtol=1e-12, atol=1e-15)
    # Forced sets bring their own mscale to every row.
    module.selection = "short"
    torch.testing.assert_close(module(x, position_ids)[0], 1.1 * plain_cos, rtol=1e-12, atol=0)
    module.selection = "long"
    torch.testing.assert_close(module(x, position_ids)[0], 1.3 * long_unit, rtol=1e-12, atol=1e-15)
    # Without a short set the rows share the factors and differ by the mscale alone.
    shared = rope.ScaledRotaryEmbedding(rope.longrope_scaling(geometry, TARGET, long_factors, None, 0, 1.3, 1.1))
    shared_cos, _ = shared(x, position_ids)
    short_row = position_ids[:1]
    torch.testing.assert_close(shared_cos[0], 1.1 * long_unit[0], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(shared_cos[1], 1.3 * long_unit[1], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(shared(x, short_row)[0][0], shared_cos[0])  # a row alone gets what it got in a batch


@pytest.mark.parametrize("short_mscale", [None, 1.05])
def test_start_tokens_keep_no_mscale_in_short_and_long_rows(short_mscale):
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    long_factors, short_factors = random_factors(geometry, 8.0, seed=8), random_factors(geometry, 1.5, seed=9)
    scaling = rope.longrope_scaling(
        geometry, TARGET, long_factors, short_factors, start_tokens=4, mscale="su", short_mscale=short_mscale
    )
    module = rope.ScaledRotaryEmbedding(scaling)
    short_positions, long_positions = list(range(ORIGINAL_LENGTH)), list(range(2 * ORIGINAL_LENGTH))
    # A short sequence padded after its end by repeating its last position keeps its length in a batch.
    padded = short_positions + [ORIGINAL_LENGTH - 1] * ORIGINAL_LENGTH
    cos, _ = module(torch.zeros(1, dtype=torch.float64), torch.tensor([padded, long_positions]))
    short_mscale = scaling.mscale if short_mscale is None else short_mscale
    expected_short, _ = eq3_cos_sin(geometry, short_factors, 4, short_mscale, short_positions)
    expected_long, _ = eq3_cos_sin(geometry, long_factors, 4, scaling.mscale, long_positions)
    # Eq. 3 takes θ_i in float64, the module transformers' fp32 θ_i: they differ by ~1e-7 relative.
    torch.testing.assert_close(cos[0, :ORIGINAL_LENGTH], expected_short, atol=2e-6, rtol=0)
    torch.testing.assert_close(cos[1], expected_long, atol=2e-6, rtol=0)


def test_short_mscale_must_be_a_positive_number_and_not_dynamic():
    geometry = rope.RopeGeometry(10000.0, 8, 8, ORIGINAL_LENGTH)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LongRopeError, match="short_mscale must be a finite number > 0"):
            rope.longrope_scaling(geometry, TARGET, [1.0] * 4, short_mscale=bad)
    with pytest.raises(LongRopeError, match="short_mscale: dynamic NTK .* drop short_mscale"):
        rope.dynamic_ntk_scaling(geometry, TARGET).replace(short_mscale=1.0)


def test_precision_stays_fp32_after_casting_the_model():
    model = tiny_model("llama")
    geometry = rope.RopeGeometry.from_config(model.config)
    rope.install(model, rope.pi_scaling(geometry, TARGET))
    module = rope.installed_modules(model)[0]
    reference, _ = module(torch.zeros(1), torch.arange(TARGET)[None])
    model.to(torch.bfloat16)
    cos, _ = module(torch.zeros(1, dtype=torch.bfloat16), torch.arange(TARGET)[None])
    assert cos.dtype == torch.bfloat16
    # Only the final cast rounds: the angles themselves were computed in float64.
    torch.testing.assert_close(cos.float(), reference, atol=8e-3, rtol=0)


def test_rope_installs_under_a_default_device_context():
    """A GPU run creates its weights on the GPU (``with torch.device("cuda")``, as benchmarks/gpu_check.py builds
    through prepare_model); the float64 tables stay on the CPU and forward moves them. The meta device stands in for
    the GPU: a default device that is not the CPU (the gpu test below is the real one)."""
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    scaling = rope.longrope_scaling(geometry, TARGET, random_factors(geometry, 4.0, seed=3), [1.0] * 16)
    with torch.device("meta"):
        module = rope.ScaledRotaryEmbedding(scaling)
    reference = rope.ScaledRotaryEmbedding(scaling)
    for length in (ORIGINAL_LENGTH, TARGET):  # the short and the long set
        positions = torch.arange(length)[None]
        torch.testing.assert_close(module(torch.zeros(1), positions), reference(torch.zeros(1), positions))


def _sharded_worker(rank: int, world_size: int, port: int, results):
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    scaling = rope.longrope_scaling(geometry, TARGET, [4.0] * 16, [1.0] * 16, mscale="su", short_mscale=1.05)
    module = rope.ScaledRotaryEmbedding(scaling)
    # As the Trainer sets it once the group exists (rope.set_sequence_parallel_group).
    module.sequence_parallel_group = torch.distributed.group.WORLD
    # A sequence of 1.5x the original window split in two shards: rank 0 alone would look "short".
    full = torch.arange(ORIGINAL_LENGTH * 3 // 2)[None]
    shard = full.chunk(world_size, dim=-1)[rank]
    cos, _ = module(torch.zeros(1), shard)
    results[rank] = cos
    torch.distributed.destroy_process_group()


def test_sequence_parallel_shards_choose_the_same_factors():
    import torch.multiprocessing as mp

    from longrope.distributed import free_port

    port = free_port()
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_sharded_worker, args=(2, port, results), nprocs=2, join=True)
    geometry = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    reference = rope.ScaledRotaryEmbedding(
        rope.longrope_scaling(geometry, TARGET, [4.0] * 16, [1.0] * 16, short_mscale=1.05)
    )
    full_cos, _ = reference(torch.zeros(1), torch.arange(ORIGINAL_LENGTH * 3 // 2)[None])
    torch.testing.assert_close(torch.cat([results[0], results[1]], dim=1), full_cos)
    # Without the group, rank 0's shard (positions < original length) would have picked the short factors and mscale.
    local = copy.deepcopy(reference)
    local_cos, _ = local(torch.zeros(1), torch.arange(ORIGINAL_LENGTH * 3 // 4)[None])
    assert not torch.allclose(local_cos, results[0])


# ------------------------------------------------------------------------------------------------------------------
# Exact angles at the paper's lengths (LLaMA2-7B's RoPE: theta 1e4, head_dim 128, 4k window, extended to 2048k)

PAPER_GEOMETRY = rope.RopeGeometry(10000.0, 128, 128, 4096)
PAPER_TARGET = 2048 * 1024
PAPER_POSITIONS = [2047, 128 * 1024 - 1, PAPER_TARGET - 1]


def transformers_inv_freq(method: str, sequence_length: int) -> torch.Tensor:
    """transformers' own fp32 frequencies for ``method`` (float64 copies of them), from ROPE_INIT_FUNCTIONS."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    original, scale = PAPER_GEOMETRY.original_max_position_embeddings, PAPER_TARGET / 4096
    parameters, max_positions, seq_len = {
        "none": ({"rope_type": "linear", "factor": 1.0}, original, None),
        "pi": ({"rope_type": "linear", "factor": scale}, original, None),
        "ntk": ({"rope_type": "dynamic", "factor": 1.0}, original, PAPER_TARGET),
        "dynamic_ntk": ({"rope_type": "dynamic", "factor": scale}, original, sequence_length),
        "yarn": (
            {"rope_type": "yarn", "factor": scale, "beta_fast": 32.0, "beta_slow": 1.0,
             "original_max_position_embeddings": original},
            PAPER_TARGET,
            None,
        ),
    }[method]  # fmt: skip
    config = transformers.LlamaConfig(
        hidden_size=128,
        num_attention_heads=1,
        head_dim=128,
        max_position_embeddings=max_positions,
        rope_parameters={"rope_theta": 10000.0, **parameters},
    )
    inv_freq, _ = ROPE_INIT_FUNCTIONS[parameters["rope_type"]](config, "cpu", seq_len=seq_len)
    return inv_freq.double()


def reference_cos(inv_freq: torch.Tensor, positions: list[int], mscale: float) -> torch.Tensor:
    angles = torch.tensor(positions, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat([angles, angles], dim=-1).cos() * mscale


@pytest.mark.parametrize("method", ["none", "pi", "ntk", "dynamic_ntk", "yarn", "longrope", "longrope_short_mscale"])
def test_angles_are_exact_at_2048k_positions(method):
    """cos tables of every method against a float64 reference built on transformers' own frequencies (longrope:
    transformers' default frequencies divided by the factors), at 2k, 128k and 2048k positions. With a short set of
    its own mscale the rows' mscales are a tensor, which must not cost the long row any precision."""
    if method.startswith("longrope"):
        factors = [1.0] + random_factors(PAPER_GEOMETRY, 600.0, seed=7)[1:]  # the fastest pair extrapolates
        short = ([1.0] * PAPER_GEOMETRY.num_pairs, 1.0) if method == "longrope_short_mscale" else (None, None)
        scaling = rope.longrope_scaling(PAPER_GEOMETRY, PAPER_TARGET, factors, short[0], short_mscale=short[1])
        inv_freq = PAPER_GEOMETRY.base_inv_freq().double() / torch.tensor(factors, dtype=torch.float64)
    else:
        scaling = rope.build_scaling(method, PAPER_GEOMETRY, PAPER_TARGET)
        inv_freq = transformers_inv_freq(method, PAPER_TARGET)
    module = rope.ScaledRotaryEmbedding(scaling)
    cos, _ = module(torch.zeros(1, dtype=torch.float64), torch.tensor([PAPER_POSITIONS]))
    expected = reference_cos(inv_freq, PAPER_POSITIONS, scaling.mscale)
    errors = (cos[0] - expected).abs().amax(dim=-1)
    assert errors.max().item() < 1e-8, errors.tolist()
    # The check can fail: angles in fp32, as stock transformers forms them, miss the reference at 2048k by > 1e-5.
    fp32 = torch.tensor(PAPER_POSITIONS, dtype=torch.float32)[:, None] * inv_freq.float()[None, :]
    fp32_cos = torch.cat([fp32, fp32], dim=-1).double().cos() * scaling.mscale
    assert (fp32_cos[-1] - expected[-1]).abs().max().item() > 1e-5, "the fp32 baseline should miss"


def test_baseline_factors_reproduce_transformers_frequencies_exactly():
    """θ_i / λ_i gives back transformers' fp32 frequencies to float64 rounding (the 6-digit rounding this replaced
    moved YaRN's pair frequencies by up to 5e-6 relative)."""
    base = PAPER_GEOMETRY.base_inv_freq().double()
    for method in ("pi", "ntk", "yarn"):
        scaling = rope.build_scaling(method, PAPER_GEOMETRY, PAPER_TARGET)
        ours = base / torch.tensor(scaling.long_factors, dtype=torch.float64)
        torch.testing.assert_close(ours, transformers_inv_freq(method, PAPER_TARGET), rtol=1e-15, atol=0)


# ------------------------------------------------------------------------------------------------------------------
# Bad input: one line, naming the field and the fix


def test_wrong_number_of_factors_names_both_numbers():
    model = tiny_model("phi3")
    geometry = rope.RopeGeometry.from_config(model.config)
    assert geometry.num_pairs == 8  # head_dim 32, partial_rotary_factor 0.5
    wrong = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)
    with pytest.raises(LongRopeError, match=r"16 frequency pairs.*has 8"):
        rope.install(model, rope.longrope_scaling(wrong, TARGET, [2.0] * 16))
    with pytest.raises(LongRopeError, match=r"long_factors has 3 values.*8 frequency pairs"):
        rope.longrope_scaling(geometry, TARGET, [2.0] * 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0, -1.0])
def test_non_finite_or_non_positive_factors(bad):
    geometry = rope.RopeGeometry(10000.0, 8, 8, ORIGINAL_LENGTH)
    with pytest.raises(LongRopeError, match=r"long_factors\[2\].*finite number > 0"):
        rope.longrope_scaling(geometry, TARGET, [1.0, 1.0, bad, 2.0])


def test_negative_start_tokens_and_short_target():
    geometry = rope.RopeGeometry(10000.0, 8, 8, ORIGINAL_LENGTH)
    with pytest.raises(LongRopeError, match="start_tokens must be an integer >= 0"):
        rope.longrope_scaling(geometry, TARGET, [1.0] * 4, start_tokens=-1)
    with pytest.raises(LongRopeError, match=r"target_length: 64 must be larger than the original window 64"):
        rope.pi_scaling(geometry, ORIGINAL_LENGTH)


def test_unknown_method_lists_known_ones():
    geometry = rope.RopeGeometry(10000.0, 8, 8, ORIGINAL_LENGTH)
    with pytest.raises(LongRopeError, match=r"'su' is not a RoPE method; use one of none, pi, ntk, dynamic_ntk, yarn"):
        rope.build_scaling("su", geometry, TARGET)
    with pytest.raises(LongRopeError, match="mscale: 'cold' is not a number or one of su, yarn, none"):
        rope.pi_scaling(geometry, TARGET, mscale="cold")


def test_model_without_rope_is_refused():
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=64)
    model = transformers.GPT2LMHeadModel(config)
    geometry = rope.RopeGeometry(10000.0, 16, 16, 64)
    with pytest.raises(LongRopeError, match="no rotary embedding module"):
        rope.install(model, rope.pi_scaling(geometry, 256))


def test_error_messages_are_one_line():
    geometry = rope.RopeGeometry(10000.0, 8, 8, ORIGINAL_LENGTH)
    for call in (
        lambda: rope.longrope_scaling(geometry, TARGET, [1.0] * 3),
        lambda: rope.build_scaling("nope", geometry, TARGET),
        lambda: rope.pi_scaling(geometry, 10),
    ):
        with pytest.raises(LongRopeError) as info:
            call()
        assert os.linesep not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["pi", "yarn", "longrope"])
def test_cuda_angles_match_the_float64_reference(method):
    """CPU twin: test_angles_are_exact_at_2048k_positions (the same module, on the CPU)."""
    if method == "longrope":
        factors = [1.0] + random_factors(PAPER_GEOMETRY, 600.0, seed=7)[1:]
        scaling = rope.longrope_scaling(PAPER_GEOMETRY, PAPER_TARGET, factors)
        inv_freq = PAPER_GEOMETRY.base_inv_freq().double() / torch.tensor(factors, dtype=torch.float64)
    else:
        scaling = rope.build_scaling(method, PAPER_GEOMETRY, PAPER_TARGET)
        inv_freq = transformers_inv_freq(method, PAPER_TARGET)
    module = rope.ScaledRotaryEmbedding(scaling)
    x = torch.zeros(1, dtype=torch.bfloat16, device="cuda")
    cos, _ = module(x, torch.tensor([PAPER_POSITIONS], device="cuda"))
    assert cos.dtype == torch.bfloat16 and cos.device.type == "cuda"
    expected = reference_cos(inv_freq, PAPER_POSITIONS, scaling.mscale)
    # Only the final bf16 cast rounds (8 mantissa bits: at most 2^-8 relative, mscale <= 1.7).
    assert (cos[0].double().cpu() - expected).abs().max().item() < 1e-2


@pytest.mark.gpu
def test_rope_installs_into_a_model_built_on_the_gpu():
    """CPU twin: test_rope_installs_under_a_default_device_context (the meta device stands in for the GPU)."""
    config = tiny_config("llama", attn_implementation="sdpa")
    geometry = rope.RopeGeometry.from_config(config)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        rope.install(model, rope.yarn_scaling(geometry, TARGET))
    on_cpu = copy.deepcopy(model).cpu()
    input_ids = torch.randint(0, config.vocab_size, (1, TARGET))
    with torch.no_grad():
        expected = on_cpu(input_ids=input_ids).logits
        got = model(input_ids=input_ids.cuda()).logits.cpu()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_a_generation_past_the_window_keeps_one_factor_set_for_prompt_and_answer():
    model = tiny_model(max_position_embeddings=64, initializer_range=0.3)  # sharp attention: the set shows
    geometry = rope.RopeGeometry.from_config(model.config)
    pairs = geometry.num_pairs
    scaling = rope.longrope_scaling(geometry, 256, [4.0] * pairs, short_factors=[1.0] * pairs)
    rope.install(model, scaling)
    # A prompt filling the window: choosing per forward, it is rotated with the short set and the answer with the long.
    prompt = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    new_tokens = 10
    with torch.no_grad():
        mixed = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    with torch.no_grad(), rope.factors_for_generation(model, prompt.shape[1] + new_tokens):
        assert {m.selection for m in rope.installed_modules(model)} == {"long"}
        cached = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    assert {m.selection for m in rope.installed_modules(model)} == {"auto"}
    # The reference: the set of the final length (74 > 64: long) forced on every forward, prompt and answer.
    rope.select_factors(model, "long")
    with torch.no_grad():
        sequence = model.generate(input_ids=prompt, do_sample=False, max_new_tokens=new_tokens, pad_token_id=0)
    assert cached.tolist() == sequence.tolist() != mixed.tolist()
    with rope.factors_for_generation(model, 64):  # a forced selection is the caller's and stays
        assert {m.selection for m in rope.installed_modules(model)} == {"long"}
    rope.select_factors(model, "auto")
    with rope.factors_for_generation(model, 64):
        assert {m.selection for m in rope.installed_modules(model)} == {"short"}
