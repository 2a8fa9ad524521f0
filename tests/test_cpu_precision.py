"""The bf16-vs-fp32 benchmark's verdict (benchmarks/cpu_precision.py) from measured cells, without a model."""

from __future__ import annotations

from benchmarks import cpu_precision


def _payload(cpu_bf16_seconds: float, cpu_bf16_perplexity: float) -> dict:
    def cell(seconds: float, perplexity: float) -> dict:
        return {"seconds": seconds, "perplexity": perplexity}

    return {
        "matmul_gflops": {"fp32": 100.0, "bf16": 250.0},
        "native_bf16": True,
        "forwards": {
            "fp32-sdpa@32768": cell(10.0, 7.0),
            "bf16-sdpa@32768": cell(8.0, 7.05),
            "bf16-cpu_bf16@32768": cell(cpu_bf16_seconds, cpu_bf16_perplexity),
        },
        "methods": {
            "fp32-sdpa@8192": {"none": 6.0, "yarn": 7.0},
            "bf16-cpu_bf16@8192": {"none": 9.0, "yarn": 7.007},
        },
    }


def test_the_goals_are_judged_on_the_cpu_bf16_path_and_the_sdpa_drift_is_reported_beside_it():
    verdict = cpu_precision.summarize(_payload(4.0, 7.01))["verdict"]
    assert "2.50x fp32 (goal >= 2.5x: MET" in verdict
    assert "matmul rate, the ceiling of the ratio for a forward of matmuls and attention, is 2.50x" in verdict
    # bf16 + sdpa drifts 0.714%, but the timed path (and the method table, plain RoPE excluded) stays within 0.3%.
    assert "largest perplexity difference to fp32 0.143% (goal <= 0.3%: MET" in verdict
    assert "bf16-sdpa 0.714%" in verdict


def test_a_slower_or_drifting_cpu_bf16_forward_is_not_met():
    summary = cpu_precision.summarize(_payload(5.0, 7.03))
    assert summary["speedup_over_fp32"]["bf16-cpu_bf16@32768"] == 2.0
    assert "2.00x fp32 (goal >= 2.5x: NOT MET" in summary["verdict"]
    assert "largest perplexity difference to fp32 0.429% (goal <= 0.3%: NOT MET" in summary["verdict"]
    # Plain RoPE moved from first to last in bf16: a changed ranking is reported, even where drift skips it.
    assert summary["methods"]["8192"]["ranking_fp32"] == ["none", "yarn"]
    assert summary["methods"]["8192"]["ranking_bf16"] == ["yarn", "none"]
