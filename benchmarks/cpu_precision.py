"""bf16 against fp32 for a real model on this CPU: SmolLM2-135M forwards at 8k / 16k / 32k, where their time goes, and
what bf16 does to every method's perplexity.

    python -m benchmarks.cpu_precision                      # about 25 minutes on 2 cores
    python -m benchmarks.cpu_precision --forwards fp32-sdpa@8192 bf16-cpu_bf16@8192 --method_lengths 8192

Needs the converted model (python -m longrope.gguf --output_dir models/smollm2-135m-instruct) and the held-out test
documents (prepared when missing, configs/smollm2-135m/data-test.yaml). Measured in one process, one after another,
so every ratio compares numbers of the same run:

1. the machine's matmul rate: a 4096 x 4096 x 4096 product in fp32 and bf16 (the bf16 rate is the peak the forwards
   are held against);
2. one layer's causal attention (9 query heads, 3 KV heads of 64, SmolLM2's shape): sdpa in fp32 and bf16, and the
   project's cpu_bf16 kernel (longrope/cpu_attention.py);
3. whole-model forwards (the chunked perplexity of evaluate.py, YaRN set up for 32k, the first held-out document) per
   precision: fp32 + sdpa, bf16 + sdpa, bf16 + cpu_bf16. torch.profiler splits each into attention (sdpa's op, or
   the kernel's named range) and matmuls (aten::mm / addmm / bmm); FLOPs are counted from the shapes (2 x parameters
   per token for the matmuls incl. the output head, 2 x L^2 x head_dim x query heads x layers for causal attention);
4. every method's perplexity (none, PI, NTK, dynamic NTK and YaRN set up for 32k, and the factors files given) in
   fp32 and in bf16 + cpu_bf16 on the same document: relative difference, and whether the ranking changes.

On a CPU without native bf16 (no avx512_bf16 or amx_bf16: longrope/cpu_features.py) a bf16 matmul runs in PyTorch's
scalar fallback, hundreds of times slower than fp32, so the defaults change there: the bf16 matmul is timed at
1024^3, the bf16 forward at 256 tokens only (against fp32 at 256), fp32 forwards at 8k and 16k, no bf16 method
table, and cpu_bf16 (which needs avx512_bf16) is refused; the verdict says so.

Writes benchmarks/results/cpu_precision.{json,md} (atomically, after every measurement, so an interrupted run keeps
what it measured; --resume reuses those cells).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from longrope import cpu_features

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "models/smollm2-135m-instruct"
DOCUMENTS = "data/smollm2/test-32k"
DOCUMENTS_CONFIG = "configs/smollm2-135m/data-test.yaml"
TARGET_LENGTH = 32768
# name -> (dtype, attn_implementation)
PRECISIONS = {
    "fp32-sdpa": ("float32", "sdpa"),
    "bf16-sdpa": ("bfloat16", "sdpa"),
    "bf16-cpu_bf16": ("bfloat16", "cpu_bf16"),
}
# bf16 + sdpa at 32k is left out by default: it costs 4 minutes and the one-layer attention row already shows that
# sdpa's CPU kernel runs bf16 no faster than fp32.
DEFAULT_FORWARDS = [
    "fp32-sdpa@8192",
    "fp32-sdpa@16384",
    "fp32-sdpa@32768",
    "bf16-sdpa@8192",
    "bf16-sdpa@16384",
    "bf16-cpu_bf16@8192",
    "bf16-cpu_bf16@16384",
    "bf16-cpu_bf16@32768",
]
# Where bf16 is emulated: one short forward in each precision, enough for the ratio (a bf16 8k forward would take hours).
# The fp32 32k forward is left out there (8 minutes; configs/smollm2-135m/eval-32k.yaml times it per method).
EMULATED_FORWARDS = ["fp32-sdpa@256", "bf16-sdpa@256", "fp32-sdpa@8192", "fp32-sdpa@16384"]
BASELINES = ["none", "pi", "ntk", "dynamic_ntk", "yarn"]
DEFAULT_FACTORS = [
    "longrope-32k=outputs/smollm2/search-32k/factors.json",
    "longrope-32k-short=outputs/smollm2/search-short-8k/factors.json",
]
METHOD_PRECISIONS = ("fp32-sdpa", "bf16-cpu_bf16")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm"}
ATTENTION_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
# Goals of the issue (README "A real model on a CPU"): the 32k forward's speed-up over fp32, and perplexity drift.
GOAL_SPEEDUP, GOAL_PERPLEXITY_PERCENT = 2.5, 0.3


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up: thread pool, kernel build, first-call allocations
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def matmul_rates(size: int = 4096, bf16_size: int = 4096) -> dict[str, float]:
    rates = {}
    for name, dtype, n in (("fp32", torch.float32, size), ("bf16", torch.bfloat16, bf16_size)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        seconds = _timed(lambda a=a, b=b: a @ b, repeats=5 if n >= 2048 else 2)
        rates[name] = 2 * n**3 / seconds / 1e9
    return rates


def attention_flops(length: int, layers: int = 1) -> float:
    """Causal QK^T and PV: 2 products x 2 FLOPs x L^2 / 2 (the causal half) x head_dim x query heads."""
    return 2.0 * length * length * HEAD_DIM * ATTENTION_HEADS * layers


def one_layer_attention(length: int) -> dict[str, float]:
    from longrope import cpu_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, ATTENTION_HEADS, length, HEAD_DIM, generator=generator)
    key = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator)
    value = torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator)
    scale = HEAD_DIM**-0.5
    seconds = {}
    for name, dtype in (("sdpa-fp32", torch.float32), ("sdpa-bf16", torch.bfloat16)):
        q, k, v = (t.to(dtype) for t in (query, key, value))
        seconds[name] = _timed(
            lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            ),
            1,
        )
    if cpu_attention.unavailable_reason() is None:
        q, k, v = (t.to(torch.bfloat16) for t in (query, key, value))
        seconds["cpu_bf16"] = _timed(lambda: cpu_attention.causal_attention(q, k, v, scale), 1)
    return seconds


def load_model(precision: str) -> Any:
    from longrope.args import ModelArguments
    from longrope.modeling import load_for_evaluation

    dtype, attention = PRECISIONS[precision]
    return load_for_evaluation(ModelArguments(model_name_or_path=MODEL, dtype=dtype, attn_implementation=attention))


def install_method(model: Any, method: dict[str, Any]) -> None:
    from longrope import rope
    from longrope.args import RopeArguments
    from longrope.rope_config import resolve_rope

    args = RopeArguments.from_mapping(method, "method")
    rope.install(model, resolve_rope(args, model.config, default_target=TARGET_LENGTH).scaling)


def perplexity(model: Any, ids: list[int]) -> float:
    from longrope.perplexity import sequence_nll

    with torch.inference_mode():
        result = sequence_nll(model, ids)
    return math.exp(result.nll_sum / result.scored_tokens)


def profiled_forward(model: Any, ids: list[int], num_parameters: int, layers: int) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    from longrope.cpu_attention import PROFILER_LABEL

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        started = time.perf_counter()
        value = perplexity(model, ids)
        seconds = time.perf_counter() - started
    events = profiler.key_averages()
    attention_us = sum(
        e.cpu_time_total for e in events if e.key in ("aten::scaled_dot_product_attention", PROFILER_LABEL)
    )
    matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    length = len(ids)
    matmul_flops, attn_flops = 2.0 * num_parameters * length, attention_flops(length, layers)
    attention_s, matmul_s = attention_us / 1e6, matmul_us / 1e6
    return {
        "seconds": seconds,
        "tokens_per_second": length / seconds,
        "perplexity": value,
        "attention_seconds": attention_s,
        "matmul_seconds": matmul_s,
        "attention_share": attention_s / seconds,
        "matmul_share": matmul_s / seconds,
        "gflops": (matmul_flops + attn_flops) / seconds / 1e9,
        "attention_gflops": attn_flops / attention_s / 1e9 if attention_s else None,
        "matmul_gflops": matmul_flops / matmul_s / 1e9 if matmul_s else None,
    }


def _ranking(values: dict[str, float]) -> list[str]:
    return sorted(values, key=lambda name: values[name])


def summarize(payload: dict[str, Any]) -> dict[str, Any]:
    """Speed-ups over fp32 at each length, perplexity drift, and the ranking check."""
    forwards = payload["forwards"]
    summary: dict[str, Any] = {"speedup_over_fp32": {}, "perplexity_percent_vs_fp32": {}}
    for cell, row in forwards.items():
        precision, length = cell.split("@")
        base = forwards.get(f"fp32-sdpa@{length}")
        if base is None or precision == "fp32-sdpa":
            continue
        summary["speedup_over_fp32"][cell] = base["seconds"] / row["seconds"]
        summary["perplexity_percent_vs_fp32"][cell] = 100 * (row["perplexity"] / base["perplexity"] - 1)
    methods = payload["methods"]
    for length in sorted({int(cell.split("@")[1]) for cell in methods}):
        by_precision = {p: methods.get(f"{p}@{length}") for p in METHOD_PRECISIONS}
        if all(by_precision.values()):
            fp32, bf16 = by_precision["fp32-sdpa"], by_precision["bf16-cpu_bf16"]
            common = [m for m in fp32 if m in bf16]
            summary.setdefault("methods", {})[str(length)] = {
                "percent_vs_fp32": {m: 100 * (bf16[m] / fp32[m] - 1) for m in common},
                "ranking_fp32": _ranking({m: fp32[m] for m in common}),
                "ranking_bf16": _ranking({m: bf16[m] for m in common}),
            }
    speedup = summary["speedup_over_fp32"].get(f"bf16-cpu_bf16@{TARGET_LENGTH}")
    # Drift per bf16 path: the goal is judged on the one the speed goal times (bf16 + cpu_bf16, which also scores
    # the method table); bf16 + sdpa is reported beside it.
    drift: dict[str, list[float]] = {}
    for cell, value in summary["perplexity_percent_vs_fp32"].items():
        drift.setdefault(cell.split("@")[0], []).append(abs(value))
    for table in summary.get("methods", {}).values():
        drift.setdefault("bf16-cpu_bf16", []).extend(
            abs(v) for m, v in table["percent_vs_fp32"].items() if m != "none"
        )
    rates = payload["matmul_gflops"]
    emulated = ""
    if not payload.get("native_bf16", True):
        short = {c: r for c, r in summary["speedup_over_fp32"].items() if c.startswith("bf16-")}
        emulated = (
            f"this CPU has no native bf16 ({' or '.join(cpu_features.NATIVE_BF16_FLAGS)}): a bf16 matmul runs at "
            f"{rates['bf16']:.2f} GFLOP/s against {rates['fp32']:.0f} in fp32"
            + "".join(f", the {c} forward takes {1 / r:.1f}x the fp32 time" for c, r in short.items())
            + f"; the {GOAL_SPEEDUP}x goal needs a CPU with native bf16 (or a GPU). "
        )
    goal_path = "bf16-cpu_bf16" if "bf16-cpu_bf16" in drift else next(iter(drift), None)
    goal_drift = drift.get(goal_path, [])
    summary["verdict"] = (
        emulated
        + (
            f"32k forward in bf16 + cpu_bf16: {speedup:.2f}x fp32 (goal >= {GOAL_SPEEDUP}x: "
            f"{'MET' if speedup >= GOAL_SPEEDUP else 'NOT MET'}; this CPU's bf16 / fp32 matmul rate, the ceiling of "
            f"the ratio for a forward of matmuls and attention, is {rates['bf16'] / rates['fp32']:.2f}x); "
            if speedup is not None
            else "32k forward speed-up not measured in this run; "
        )
        + (
            f"largest perplexity difference to fp32 {max(goal_drift):.3f}% (goal <= {GOAL_PERPLEXITY_PERCENT}%: "
            f"{'MET' if max(goal_drift) <= GOAL_PERPLEXITY_PERCENT else 'NOT MET'}; plain RoPE past its window "
            "excluded)"
            + "".join(f", {name} {max(values):.3f}%" for name, values in drift.items() if name != goal_path)
            if goal_drift
            else "perplexity difference not measured"
        )
    )
    return summary


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_markdown(payload: dict[str, Any]) -> str:
    rates, summary = payload["matmul_gflops"], payload["summary"]
    lines = [
        "# bf16 against fp32 on this CPU: SmolLM2-135M",
        "",
        f"{payload['cpu']}, {payload['threads']} threads, torch {payload['torch']}; `python -m "
        f"benchmarks.cpu_precision` (one process, measured one after another). Model: {MODEL} (YaRN set up for "
        f"{TARGET_LENGTH}, the first held-out document of {DOCUMENTS}).",
        "",
        f"Matmul: fp32 {_f(rates['fp32'], 0)} GFLOP/s (4096^3), bf16 {_f(rates['bf16'], 2)} GFLOP/s "
        f"({payload.get('bf16_matmul_size', 4096)}^3); the faster of the two is the peak below. Native bf16 (avx512_bf16 or amx_bf16): "
        f"{'yes' if payload.get('native_bf16', True) else 'NO, bf16 is emulated'}.",
        "",
        "One layer's causal attention (9 query heads, 3 KV heads of 64), seconds:",
        "",
        "| length | sdpa fp32 | sdpa bf16 | cpu_bf16 | cpu_bf16 GFLOP/s | sdpa fp32 / cpu_bf16 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for length, row in payload["attention"].items():
        kernel = row.get("cpu_bf16")
        lines.append(
            f"| {length} | {_f(row['sdpa-fp32'], 3)} | {_f(row['sdpa-bf16'], 3)} | {_f(kernel, 3)} | "
            f"{_f(attention_flops(int(length)) / kernel / 1e9 if kernel else None, 0)} | "
            f"{_f(row['sdpa-fp32'] / kernel if kernel else None)}x |"
        )
    lines += [
        "",
        "Whole-model forwards (chunked perplexity, no KV cache):",
        "",
        "| precision | length | seconds | tokens/s | speed-up vs fp32 | attention share | matmul share | "
        "GFLOP/s (of the faster matmul's peak) | attention GFLOP/s | matmul GFLOP/s | perplexity | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for cell, row in payload["forwards"].items():
        precision, length = cell.split("@")
        speedup = summary["speedup_over_fp32"].get(cell)
        drift = summary["perplexity_percent_vs_fp32"].get(cell)
        lines.append(
            f"| {precision} | {length} | {_f(row['seconds'], 1)} | {_f(row['tokens_per_second'], 0)} | "
            f"{_f(speedup) + 'x' if speedup else '-'} | {100 * row['attention_share']:.0f}% | "
            f"{100 * row['matmul_share']:.0f}% | {_f(row['gflops'], 0)} ({100 * row['gflops'] / max(rates.values()):.0f}%) | "
            f"{_f(row['attention_gflops'], 0)} | {_f(row['matmul_gflops'], 0)} | {row['perplexity']:.4f} | "
            f"{'-' if drift is None else f'{drift:+.3f}%'} |"
        )
    for length, table in summary.get("methods", {}).items():
        fp32, bf16 = payload["methods"][f"fp32-sdpa@{length}"], payload["methods"][f"bf16-cpu_bf16@{length}"]
        lines += [
            "",
            f"Every method at {length} tokens, fp32 + sdpa against bf16 + cpu_bf16:",
            "",
            "| method | fp32 | bf16 | difference |",
            "|---|---:|---:|---:|",
        ]
        for method, percent in table["percent_vs_fp32"].items():
            lines.append(f"| {method} | {fp32[method]:.4f} | {bf16[method]:.4f} | {percent:+.3f}% |")
        same = table["ranking_fp32"] == table["ranking_bf16"]
        lines += [
            "",
            f"Ranking fp32: {' < '.join(table['ranking_fp32'])}; bf16: {' < '.join(table['ranking_bf16'])} "
            f"({'unchanged' if same else 'CHANGED'}).",
        ]
    lines += ["", summary["verdict"], ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forwards", nargs="+", help="precision@length cells (default: see the module doc)")
    parser.add_argument("--attention_lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--method_lengths", type=int, nargs="*", help="default 8192 (none where bf16 is emulated)")
    parser.add_argument("--factors", nargs="*", default=DEFAULT_FACTORS, help="name=factors.json methods")
    parser.add_argument("--output_dir", default=str(RESULTS))
    parser.add_argument("--resume", action="store_true", help="keep the cells an earlier run wrote")
    args = parser.parse_args(argv)

    from longrope import cpu_attention
    from longrope.documents import ensure_prepared, select_documents
    from longrope.errors import LongRopeError
    from longrope.io import atomic_write_json, atomic_write_text

    native_bf16 = not cpu_features.lacks_native_bf16()
    if args.forwards is None:
        args.forwards = DEFAULT_FORWARDS if native_bf16 else EMULATED_FORWARDS
    if args.method_lengths is None:
        args.method_lengths = [8192] if native_bf16 else []
    for cell in args.forwards:
        precision, _, length = cell.partition("@")
        if precision not in PRECISIONS or not length.isdigit():
            raise SystemExit(f"--forwards: {cell!r} must be PRECISION@LENGTH with PRECISION one of {list(PRECISIONS)}")
        if PRECISIONS[precision][1] == "cpu_bf16" and cpu_attention.unavailable_reason() is not None:
            raise SystemExit(f"--forwards: {cell}: cpu_bf16 {cpu_attention.unavailable_reason()}; drop the cell")
    factors = {}
    for item in args.factors if args.method_lengths else []:
        name, _, path = item.partition("=")
        if not (ROOT / path).is_file():
            raise SystemExit(f"--factors: {path} does not exist; run its search stage first or drop it ({item})")
        factors[name] = str(ROOT / path)
    os.chdir(ROOT)
    output = Path(args.output_dir)
    json_path = output / "cpu_precision.json"
    payload: dict[str, Any] = {"forwards": {}, "methods": {}, "attention": {}}
    if args.resume and json_path.is_file():
        import json

        payload.update({k: v for k, v in json.loads(json_path.read_text()).items() if k in payload})
    payload.update(
        cpu=cpu_features.cpu_description(),
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        native_bf16=native_bf16,
    )

    def save() -> None:
        payload["summary"] = summarize(payload)
        atomic_write_json(json_path, payload)
        atomic_write_text(output / "cpu_precision.md", render_markdown(payload))

    payload["bf16_matmul_size"] = 4096 if native_bf16 else 1024
    payload["matmul_gflops"] = matmul_rates(bf16_size=payload["bf16_matmul_size"])
    print(f"matmul GFLOP/s: {payload['matmul_gflops']}", flush=True)
    for length in args.attention_lengths:
        if str(length) not in payload["attention"]:
            payload["attention"][str(length)] = one_layer_attention(length)
            print(f"one-layer attention @{length}: {payload['attention'][str(length)]}", flush=True)
    save()

    longest = max([int(c.split("@")[1]) for c in args.forwards] + args.method_lengths)
    ensure_prepared(DOCUMENTS, DOCUMENTS_CONFIG)
    try:
        (document,), _ = select_documents(DOCUMENTS, longest, 1, 0)
    except LongRopeError as error:
        raise SystemExit(str(error)) from None
    methods = {name: {"rope_method": name, "target_length": TARGET_LENGTH} for name in BASELINES}
    methods.update({name: {"rope_factors_path": path} for name, path in factors.items()})
    for precision in PRECISIONS:
        cells = [c for c in args.forwards if c.startswith(precision + "@") and c not in payload["forwards"]]
        method_cells = [
            f"{precision}@{n}"
            for n in args.method_lengths
            if precision in METHOD_PRECISIONS and set(methods) - set(payload["methods"].get(f"{precision}@{n}", {}))
        ]
        if not cells and not method_cells:
            continue
        model = load_model(precision)
        num_parameters = sum(p.numel() for p in model.parameters())
        layers = model.config.num_hidden_layers
        install_method(model, methods["yarn"])
        perplexity(model, document[:64])  # warm-up (threads, the kernel build); short: emulated bf16 is slow
        for cell in cells:
            length = int(cell.split("@")[1])
            payload["forwards"][cell] = profiled_forward(model, document[:length], num_parameters, layers)
            print(f"forward {cell}: {payload['forwards'][cell]}", flush=True)
            save()
        for cell in method_cells:
            length = int(cell.split("@")[1])
            values = payload["methods"].setdefault(cell, {})
            for name, method in methods.items():
                if name in values:
                    continue
                install_method(model, method)
                values[name] = perplexity(model, document[:length])
                print(f"perplexity {cell} {name}: {values[name]:.4f}", flush=True)
                save()
        del model
    save()
    print(render_markdown(payload))
    return payload


if __name__ == "__main__":
    main()
