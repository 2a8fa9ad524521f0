"""The factors file: JSON round trip, the official CSV, transformers conversion and model export."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from conftest import ORIGINAL_LENGTH, tiny_model

from longrope import factors, rope
from longrope.errors import LongRopeError

TARGET = 4 * ORIGINAL_LENGTH
GEOMETRY = rope.RopeGeometry(10000.0, 32, 32, ORIGINAL_LENGTH)


def sample_scaling(start_tokens: int = 0, short: bool = True) -> rope.RopeScaling:
    long_factors = [1.0 + 0.25 * i for i in range(GEOMETRY.num_pairs)]
    short_factors = [1.0 + 0.01 * i for i in range(GEOMETRY.num_pairs)] if short else None
    return rope.longrope_scaling(GEOMETRY, TARGET, long_factors, short_factors, start_tokens=start_tokens)


def test_json_round_trip_keeps_everything(tmp_path):
    scaling = sample_scaling(start_tokens=4)
    path = tmp_path / "out" / "factors.json"
    factors.save(path, scaling, {"model": "tiny", "fitness": 4.01})
    loaded = factors.load(path)
    assert factors.is_close(loaded.scaling, scaling)
    assert loaded.scaling.mscale_policy == "su"
    assert loaded.provenance == {"model": "tiny", "fitness": 4.01}
    assert len(loaded.sha256) == 64
    assert os.listdir(path.parent) == ["factors.json"], "no temporary file may be left behind"


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "factors.json"
    factors.save(path, sample_scaling())
    before = path.read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", explode)
    with pytest.raises(OSError):
        factors.save(path, sample_scaling(start_tokens=8))
    assert path.read_text() == before
    assert os.listdir(tmp_path) == ["factors.json"]


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "method": "longrope",\n  "rope_theta": 10000.0,,\n}\n')
    with pytest.raises(LongRopeError, match=r"broken.json:3:\d+: malformed JSON"):
        factors.load(path)


def test_missing_keys_and_bad_values_are_named(tmp_path):
    payload = factors.to_dict(sample_scaling())
    del payload["long_factors"], payload["head_dim"]
    path = tmp_path / "f.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(LongRopeError, match=r"missing key\(s\) head_dim, long_factors"):
        factors.load(path)
    payload = factors.to_dict(sample_scaling())
    payload["long_factors"][3] = -2.0
    path.write_text(json.dumps(payload))
    with pytest.raises(LongRopeError, match=r"f.json: long_factors\[3\] = -2.0"):
        factors.load(path)
    with pytest.raises(LongRopeError, match="does not exist"):
        factors.load(tmp_path / "nope.json")


def test_official_csv_one_per_line_and_one_row(tmp_path):
    values = [1.0 + 0.5 * i for i in range(GEOMETRY.num_pairs)]
    column = tmp_path / "result_final.csv"
    column.write_text("".join(f"{v}\n" for v in values))
    row = tmp_path / "row.csv"
    row.write_text(",".join(str(v) for v in values) + "\n")
    for path in (column, row):
        loaded = factors.load(path, geometry=GEOMETRY, target_length=TARGET)
        assert list(loaded.scaling.long_factors) == values
        assert loaded.scaling.start_tokens == 0
    written = tmp_path / "written.csv"
    factors.write_official_csv(written, loaded.scaling)
    assert list(factors.load(written, geometry=GEOMETRY, target_length=TARGET).scaling.long_factors) == values


def test_official_csv_with_start_token_gene(tmp_path):
    path = tmp_path / "dim_mono_n.csv"
    path.write_text("16\n" + "".join(f"{1.0 + i}\n" for i in range(GEOMETRY.num_pairs)))
    loaded = factors.load(path, geometry=GEOMETRY, target_length=TARGET)
    assert loaded.scaling.start_tokens == 16
    assert loaded.scaling.long_factors[0] == 1.0


def test_official_csv_errors_name_file_and_line(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("1.0\n1.5\nabc\n")
    with pytest.raises(LongRopeError, match=r"bad.csv:3: not a number"):
        factors.load(path, geometry=GEOMETRY, target_length=TARGET)
    path.write_text("".join(f"{1.0 + i}\n" for i in range(5)))
    with pytest.raises(LongRopeError, match=r"5 factors, but the model has 16 frequency pairs"):
        factors.load(path, geometry=GEOMETRY, target_length=TARGET)
    per_layer = tmp_path / "layers.csv"
    per_layer.write_text("\n".join(",".join(str(1.0 + i + layer) for i in range(16)) for layer in range(2)))
    with pytest.raises(LongRopeError, match="per-layer factors are not supported"):
        factors.load(per_layer, geometry=GEOMETRY, target_length=TARGET)


def test_rope_parameters_refuse_start_tokens_unless_asked():
    with pytest.raises(LongRopeError, match=r"start_tokens = 8: stock transformers cannot.*allow_start_tokens"):
        factors.to_rope_parameters(sample_scaling(start_tokens=8))
    parameters = factors.to_rope_parameters(sample_scaling(start_tokens=8), allow_start_tokens=True)
    assert parameters["rope_type"] == "longrope"
    assert parameters["original_max_position_embeddings"] == ORIGINAL_LENGTH
    assert parameters["attention_factor"] == pytest.approx(sample_scaling().mscale)
    with pytest.raises(LongRopeError, match="dynamic_ntk recomputes factors"):
        factors.to_rope_parameters(rope.dynamic_ntk_scaling(GEOMETRY, TARGET))


def _input_ids(length: int) -> torch.Tensor:
    return torch.randint(0, 97, (2, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("short", [True, False])
def test_export_round_trip_loads_in_stock_transformers(arch, tmp_path, short):
    model = tiny_model(arch)
    geometry = rope.RopeGeometry.from_config(model.config)
    long_factors = [1.0 + 0.3 * i for i in range(geometry.num_pairs)]
    short_factors = [1.0 + 0.02 * i for i in range(geometry.num_pairs)] if short else None
    scaling = rope.longrope_scaling(geometry, TARGET, long_factors, short_factors, mscale="su")
    rope.install(model, scaling)
    notes = factors.export_model(model, scaling, tmp_path / "exported", provenance={"model": arch})
    assert notes == []
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported", trust_remote_code=False).eval()
    assert not rope.installed_modules(stock), "the export must load without any of our code"
    assert stock.config.rope_parameters["rope_type"] == "longrope"
    for length in (ORIGINAL_LENGTH // 2, 3 * ORIGINAL_LENGTH):
        with torch.no_grad():
            ours = model(input_ids=_input_ids(length)).logits
            theirs = stock(input_ids=_input_ids(length)).logits
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert factors.is_close(factors.load(tmp_path / "exported" / "longrope_factors.json").scaling, scaling)
    assert model.config.rope_parameters["rope_type"] == "default", "export must not change the live model"


def test_export_with_start_tokens_says_what_is_lost(tmp_path):
    model = tiny_model("llama")
    scaling = rope.longrope_scaling(rope.RopeGeometry.from_config(model.config), TARGET, [2.0] * 16, start_tokens=4)
    with pytest.raises(LongRopeError, match="allow_start_tokens"):
        factors.export_model(model, scaling, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    assert [p for p in os.listdir(tmp_path) if not p.startswith(".")] == []
    notes = factors.export_model(model, scaling, tmp_path / "lossy", allow_start_tokens=True)
    assert len(notes) == 1 and "start_tokens = 4 dropped" in notes[0] and "positions 0..3" in notes[0]
    saved = factors.load(tmp_path / "lossy" / "longrope_factors.json")
    assert saved.scaling.start_tokens == 4, "the factors file inside keeps n̂ for our own loader"


def test_export_replaces_an_existing_directory_whole(tmp_path):
    model = tiny_model("llama")
    geometry = rope.RopeGeometry.from_config(model.config)
    target = tmp_path / "exported"
    factors.export_model(model, rope.pi_scaling(geometry, TARGET), target)
    (target / "stale.txt").write_text("from an earlier export")
    factors.export_model(model, rope.yarn_scaling(geometry, TARGET), target)
    assert not (target / "stale.txt").exists()
    assert factors.load(target / "longrope_factors.json").scaling.method == "yarn"


def test_factors_for_another_head_dim_are_refused(tmp_path):
    model = tiny_model("phi3")  # 8 frequency pairs
    path = tmp_path / "f.json"
    factors.save(path, sample_scaling())  # 16 pairs
    with pytest.raises(LongRopeError, match=r"head_dim 32 \(rotary_dim 32\) but the model has head_dim 32 \(rotary"):
        factors.load_for_model(path, model.config)


def _saved_base_and_factors(tmp_path, **scaling_options):
    """A tiny Llama saved to tmp_path/base and a factors file for it (all factors 2.0) at tmp_path/f.json."""
    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "base")
    path = tmp_path / "f.json"
    geometry = rope.RopeGeometry.from_config(model.config)
    factors.save(path, rope.longrope_scaling(geometry, TARGET, [2.0] * 16, **scaling_options))
    return model, path


def test_export_command_line(tmp_path, capsys):
    from longrope import export

    model, path = _saved_base_and_factors(tmp_path, start_tokens=2)
    args = [
        "--model_name_or_path",
        str(tmp_path / "base"),
        "--rope_factors_path",
        str(path),
        "--output_dir",
        str(tmp_path / "out"),
    ]
    with pytest.raises(SystemExit) as refused:
        export.main(args)
    assert refused.value.code == 2
    assert "allow_start_tokens" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    export.main([*args, "--allow_start_tokens", "true"])
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert stock.config.max_position_embeddings == TARGET
    assert factors.main(["show", str(path)]) == 0
    assert '"start_tokens": 2' in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# The short set's own mscale (short_mscale)


def test_short_mscale_round_trips_and_is_written_only_when_set(tmp_path, capsys):
    with_own = sample_scaling().replace(short_mscale=1.05)
    path = tmp_path / "own.json"
    factors.save(path, with_own)
    payload = json.loads(path.read_text())
    assert payload["short_mscale"] == {"policy": "constant", "value": 1.05}
    loaded = factors.load(path).scaling
    assert loaded.short_mscale == 1.05 and loaded.mscale == with_own.mscale and loaded.mscale_policy == "su"
    assert factors.is_close(loaded, with_own)
    assert not factors.is_close(loaded, sample_scaling())
    assert "short_mscale" not in factors.to_dict(sample_scaling())
    # An unset short mscale and one equal to the long mscale scale the short sequences alike.
    assert factors.is_close(sample_scaling().replace(short_mscale=sample_scaling().mscale), sample_scaling())
    assert factors.main(["show", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["short_mscale"]["value"] == 1.05 and shown["mscale"]["policy"] == "su"


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (1.05, r'short_mscale must be an object like \{"policy": "constant", "value": 1.12\}'),
        ({"policy": "constant"}, "short_mscale must be an object like"),
        ({"value": "high"}, "short_mscale must be an object like"),
        ({"value": True}, "short_mscale must be an object like"),
        ({"value": 1.1, "policy": 3}, r"short_mscale.policy must be a name"),
        ({"value": -1.0}, "f.json: short_mscale must be a finite number > 0, got -1.0"),
        ({"value": 0}, "short_mscale must be a finite number > 0"),
    ],
)
def test_bad_short_mscale_is_one_line(tmp_path, entry, message):
    payload = {**factors.to_dict(sample_scaling()), "short_mscale": entry}
    path = tmp_path / "f.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(LongRopeError, match=message) as raised:
        factors.load(path)
    assert "\n" not in str(raised.value)


def test_checkpoint_configs_with_phi3_small_style_mscales_are_read():
    config = transformers.LlamaConfig(
        hidden_size=32,
        num_attention_heads=1,
        head_dim=32,
        max_position_embeddings=TARGET,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    scaling = sample_scaling()
    config.rope_parameters = factors.to_rope_parameters(scaling)
    plain = factors.from_model_config(config, GEOMETRY)
    assert plain.mscale == pytest.approx(scaling.mscale) and plain.short_mscale is None
    config.rope_parameters = {**config.rope_parameters, "long_mscale": 1.19, "short_mscale": 1.0}
    both = factors.from_model_config(config, GEOMETRY)
    # Phi-3-small / PhiMoE apply these and ignore attention_factor.
    assert both.mscale == 1.19 and both.short_mscale == 1.0 and both.short_set_mscale == 1.0
    config.rope_parameters["short_mscale"] = "one"
    with pytest.raises(LongRopeError, match=r"rope_parameters.short_mscale = 'one' must be a number > 0"):
        factors.from_model_config(config, GEOMETRY)


def test_rope_parameters_refuse_an_own_short_mscale_unless_shared_mscale_is_allowed():
    scaling = sample_scaling().replace(short_mscale=1.0)
    with pytest.raises(
        LongRopeError,
        match=r"short_mscale = 1 differs from mscale = 1.1[0-9]*: .*allow_shared_mscale.* or rope_mscale: 1 ",
    ):
        factors.to_rope_parameters(scaling)
    # The other fix it names: the long set given the short set's factor (what the export's rope_mscale does).
    assert factors.to_rope_parameters(scaling.replace(mscale=1.0))["attention_factor"] == 1.0
    parameters = factors.to_rope_parameters(scaling, allow_shared_mscale=True)
    assert parameters["attention_factor"] == pytest.approx(scaling.mscale)
    assert not {"short_mscale", "long_mscale"} & set(parameters), "keys stock Llama would only warn about"
    # Equal to the long mscale, one attention_factor says it all: nothing to refuse.
    assert factors.to_rope_parameters(sample_scaling().replace(short_mscale=sample_scaling().mscale))


def test_export_with_an_own_short_mscale_says_what_is_lost(tmp_path):
    model = tiny_model("llama")
    geometry = rope.RopeGeometry.from_config(model.config)
    long_factors = [1.0 + 0.3 * i for i in range(geometry.num_pairs)]
    short_factors = [1.0 + 0.02 * i for i in range(geometry.num_pairs)]
    scaling = rope.longrope_scaling(geometry, TARGET, long_factors, short_factors, mscale="su", short_mscale=1.0)
    with pytest.raises(LongRopeError, match="allow_shared_mscale"):
        factors.export_model(model, scaling, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    notes = factors.export_model(model, scaling, tmp_path / "lossy", allow_shared_mscale=True)
    assert len(notes) == 1 and "short_mscale = 1 dropped" in notes[0] and f"at most {ORIGINAL_LENGTH}" in notes[0]
    assert factors.load(tmp_path / "lossy" / "longrope_factors.json").scaling.short_mscale == 1.0

    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lossy").eval()
    assert not rope.installed_modules(stock)
    rope.install(model, scaling)
    shared = tiny_model("llama")
    rope.install(shared, scaling.replace(short_mscale=None))
    x = torch.zeros(1, dtype=torch.float32)
    short_positions = torch.arange(ORIGINAL_LENGTH // 2)[None]
    # A stock loader's cos/sin of a short sequence are ours times long mscale / short mscale, exactly that ratio...
    stock_cos, _ = stock.model.rotary_emb(x, short_positions)
    our_cos, _ = rope.installed_modules(model)[0](x, short_positions)
    # (up to stock transformers' fp32 angles, ~2e-6 here)
    torch.testing.assert_close(stock_cos, our_cos * scaling.mscale / 1.0, atol=1e-5, rtol=0)
    with torch.no_grad():
        short_ids, long_ids = _input_ids(ORIGINAL_LENGTH // 2), _input_ids(3 * ORIGINAL_LENGTH)
        # ...so its short logits are those of the long mscale everywhere, not ours; long sequences are unchanged.
        torch.testing.assert_close(
            stock(input_ids=short_ids).logits, shared(input_ids=short_ids).logits, atol=1e-5, rtol=0
        )
        assert not torch.allclose(stock(input_ids=short_ids).logits, model(input_ids=short_ids).logits, atol=1e-3)
        torch.testing.assert_close(
            stock(input_ids=long_ids).logits, model(input_ids=long_ids).logits, atol=1e-5, rtol=0
        )


def test_export_command_line_names_and_takes_allow_shared_mscale(tmp_path, capsys):
    from longrope import export

    model, path = _saved_base_and_factors(tmp_path, short_mscale=1.0)
    args = ["--model_name_or_path", str(tmp_path / "base"), "--rope_factors_path", str(path)]
    args += ["--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as refused:
        export.main(args)
    assert refused.value.code == 2
    assert "--allow_shared_mscale" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    export.main([*args, "--allow_shared_mscale", "true"])
    assert "short_mscale = 1 dropped" in capsys.readouterr().err
    stock = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert stock.config.rope_parameters["attention_factor"] == pytest.approx(factors.load(path).scaling.mscale)
