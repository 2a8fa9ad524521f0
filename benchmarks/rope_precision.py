"""What forming RoPE angles in float64 buys (exact angles at the paper's lengths) and what it costs.

Launch from the repository root:

    python -m benchmarks.rope_precision

1. Precision: for every registered method at the LLaMA2-7B geometry (rope_theta 1e4, head_dim 128, 4k window)
   extended to 2048k, the largest cos error at positions 2k, 128k and 2048k against a float64 reference built on
   transformers' own frequencies, for the installed module (float64 angles), for the same frequencies with fp32
   angles (what stock transformers forms, so what an exported checkpoint computes), and for the factors rounded to 6
   significant digits with fp32 angles (the previous installation).
2. Cost: the installed module's forward (float64 angles) against the same computation in fp32, at 4k..128k positions,
   and the module's share of a whole forward of the tiny model (3 layers, hidden 128) at 16k tokens. The rotary
   tables are computed once per forward and shared by every layer, so a larger model's share is smaller still.

Writes benchmarks/results/rope_precision.json and .md (atomically) and prints the tables.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from longrope import rope
from longrope.io import atomic_write_json, atomic_write_text

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "results"
GEOMETRY = rope.RopeGeometry(10000.0, 128, 128, 4096)
TARGET = 2048 * 1024
POSITIONS = [2047, 128 * 1024 - 1, TARGET - 1]


def reference_inv_freq(method: str, scaling: rope.RopeScaling) -> torch.Tensor:
    """transformers' own frequencies for the baselines (float64 copies of its fp32 values); for longrope, transformers'
    default frequencies divided by the factors in float64."""
    if method in ("none", "longrope"):
        return GEOMETRY.base_inv_freq().double() / torch.tensor(scaling.long_factors, dtype=torch.float64)
    original, scale = GEOMETRY.original_max_position_embeddings, TARGET / GEOMETRY.original_max_position_embeddings
    parameters, max_positions, seq_len = {
        "pi": ({"rope_type": "linear", "factor": scale}, original, None),
        "ntk": ({"rope_type": "dynamic", "factor": 1.0}, original, TARGET),
        "dynamic_ntk": ({"rope_type": "dynamic", "factor": scale}, original, TARGET),
        "yarn": (
            {"rope_type": "yarn", "factor": scale, "beta_fast": 32.0, "beta_slow": 1.0,
             "original_max_position_embeddings": original},
            TARGET,
            None,
        ),
    }[method]  # fmt: skip
    inv_freq, _ = rope._transformers_inv_freq(GEOMETRY, parameters, max_positions, seq_len)
    return inv_freq.double()


def cos_table(inv_freq: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    angles = torch.tensor(POSITIONS, dtype=dtype)[:, None] * inv_freq.to(dtype)[None, :]
    return angles.double().cos()


def precision() -> list[dict]:
    rows = []
    for method in rope.method_names():
        if method == "longrope":
            generator = torch.Generator().manual_seed(0)
            factors = sorted((1.0 + 639.0 * torch.rand(GEOMETRY.num_pairs, generator=generator)).tolist())
            scaling = rope.longrope_scaling(GEOMETRY, TARGET, [1.0, *factors[1:]])
        else:
            scaling = rope.build_scaling(method, GEOMETRY, TARGET)
        reference = cos_table(reference_inv_freq(method, scaling), torch.float64)
        module = rope.ScaledRotaryEmbedding(scaling)
        installed = module(torch.zeros(1, dtype=torch.float64), torch.tensor([POSITIONS]))[0][0] / scaling.mscale
        installed = installed[:, : GEOMETRY.num_pairs]
        rounded = [float(f"{value:.6g}") for value in scaling.long_factors]
        previous = GEOMETRY.base_inv_freq() / torch.tensor(rounded, dtype=torch.float32)
        errors = {
            "installed (float64 angles)": (installed - reference).abs().amax(dim=-1),
            "stock transformers (fp32 angles)": (cos_table(reference_inv_freq(method, scaling), torch.float32) - reference).abs().amax(dim=-1),  # noqa: E501
            "previous (6 digits, fp32 angles)": (cos_table(previous.double(), torch.float32) - reference).abs().amax(dim=-1),  # noqa: E501
        }  # fmt: skip
        for variant, values in errors.items():
            rows.append(
                {"method": method, "variant": variant, **{str(p): float(v) for p, v in zip(POSITIONS, values)}}
            )
    return rows


def _time(function, repeats: int) -> float:
    function()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def cost(lengths: list[int], repeats: int) -> list[dict]:
    scaling = rope.yarn_scaling(GEOMETRY, TARGET)
    module = rope.ScaledRotaryEmbedding(scaling)
    inv32 = (GEOMETRY.base_inv_freq().double() / torch.tensor(scaling.long_factors, dtype=torch.float64)).float()
    x = torch.zeros(1, dtype=torch.bfloat16)
    rows = []
    for length in lengths:
        positions = torch.arange(length)[None]

        def fp32(positions: torch.Tensor = positions) -> None:
            freqs = positions.float()[..., None] * inv32[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            (emb.cos() * scaling.mscale).to(x.dtype), (emb.sin() * scaling.mscale).to(x.dtype)

        float64 = _time(lambda positions=positions: module(x, positions), repeats)
        float32 = _time(fp32, repeats)
        rows.append(
            {"length": length, "float64_ms": 1e3 * float64, "fp32_ms": 1e3 * float32, "ratio": float64 / float32}
        )
    return rows


def share_of_forward(length: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(REPO_ROOT / "models" / "tiny", attn_implementation="sdpa").eval()
    rope.install(model, rope.yarn_scaling(rope.RopeGeometry.from_config(model.config), length))
    module = rope.installed_modules(model)[0]
    input_ids = torch.randint(0, 256, (1, length))
    positions = torch.arange(length)[None]
    with torch.inference_mode():
        forward = _time(lambda: model.model(input_ids=input_ids, position_ids=positions), repeats)
        rotary = _time(lambda: module(torch.zeros(1), positions), repeats)
    return {"length": length, "forward_ms": 1e3 * forward, "rotary_ms": 1e3 * rotary, "share": rotary / forward}


def markdown(report: dict) -> str:
    lines = [
        f"RoPE precision and cost ({report['machine']}, torch {report['torch']}, {report['threads']} threads).",
        "",
        "Largest |cos error| against the float64 reference (LLaMA2-7B RoPE extended to 2048k):",
        "",
        "| method | angles | 2k | 128k | 2048k |",
        "|---|---|---|---|---|",
    ]
    for row in report["precision"]:
        cells = " | ".join(f"{row[str(p)]:.1e}" for p in POSITIONS)
        lines.append(f"| {row['method']} | {row['variant']} | {cells} |")
    lines += ["", "Rotary tables, float64 angles against fp32 (median of repeats):", ""]
    lines += ["| positions | float64 ms | fp32 ms | ratio |", "|---|---|---|---|"]
    for row in report["cost"]:
        lines.append(f"| {row['length']:,} | {row['float64_ms']:.2f} | {row['fp32_ms']:.2f} | {row['ratio']:.2f} |")
    share = report["share_of_forward"]
    lines += [
        "",
        f"Share of a whole forward of the tiny model at {share['length']:,} tokens: {share['rotary_ms']:.1f} ms of "
        f"{share['forward_ms']:.0f} ms ({100 * share['share']:.1f}%).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 32768, 131072])
    parser.add_argument("--forward_length", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    report = {
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": precision(),
        "cost": cost(args.lengths, args.repeats),
        "share_of_forward": share_of_forward(args.forward_length, max(2, args.repeats // 2)),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(RESULTS / "rope_precision.json", report)
    text = markdown(report)
    atomic_write_text(RESULTS / "rope_precision.md", text)
    print(text)
    return report


if __name__ == "__main__":
    main()
