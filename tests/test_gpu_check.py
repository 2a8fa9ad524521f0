"""benchmarks/gpu_check.py on CPU: the tiny run writes every section with finite numbers; an OOM in one cell is a line,
its memory is freed and the next cells run; a small budget skips the largest cells first. The GPU run itself is the
gpu-marked test at the end, whose CPU twin is the tiny run here."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import weakref

import pytest
import torch

from benchmarks import gpu_check
from longrope.throughput import peak_flops_for

SECTIONS = ("environment", "numerics", "training", "evaluation", "search_projection")
HEADINGS = (
    "## 1. RoPE numerics",
    "## 2. Training throughput, MFU and memory",
    "## 3. Evaluation and one search candidate",
    "## 4. Projected search cost, LLaMA2-7B",
    "## Cells and budget",
)
TINY_VOCAB = 512  # the dry-run shrink's vocabulary


def _strict_json(path):
    """The file parsed with NaN and Infinity refused (json.dumps writes them, no JSON reader accepts them)."""

    def refuse(constant):
        raise AssertionError(f"{path.name} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _run(tmp_path, *extra):
    return gpu_check.main(["--device", "cpu", "--tiny", "--output_dir", str(tmp_path), *extra])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("gpu-check")
    return output_dir, _run(output_dir)


def test_the_tiny_run_writes_every_section_with_finite_numbers(tiny_run):
    output_dir, report = tiny_run
    written = _strict_json(output_dir / "gpu_check.json")
    assert written["elapsed_s"] == report["elapsed_s"]  # the last write is the final state
    assert all(section in written for section in SECTIONS)
    text = (output_dir / "gpu_check.md").read_text()
    assert all(heading in text for heading in HEADINGS)

    # numerics: every bf16 sdpa cell against its fp32 reference; flash_attention_2 skipped with its reason
    rows = [row for row in written["numerics"]["cells"] if "method" in row]
    sdpa = [row for row in rows if row["attention"] == "sdpa"]
    assert len(sdpa) == len(gpu_check.NUMERICS_METHODS) * len(gpu_check.TINY.numerics_lengths)
    for row in sdpa:
        assert row["status"] == "ok" and row["reference_status"] == "ok", row
        # bf16 differs from fp32, but only by bf16 rounding (8 bits of mantissa)
        assert 0 < row["max_rel_error"] < 0.05, row
        assert row["top1_agreement"] >= 0.5, row
    for row in rows:
        if row["attention"] == "flash_attention_2":
            assert row["status"] == "skipped" and "needs a CUDA device" in row["line"], row
    # The short + long set serves the short factors up to the 64-token window and the long ones beyond it.
    served = {row["length"]: row["factors_served"] for row in sdpa if row["method"] == "longrope_short_long"}
    assert served == {32: "short", 64: "short", 128: "long", 256: "long"}
    probe = next(row for row in written["numerics"]["cells"] if "probe" in row)
    assert probe["status"] == "ok" and isinstance(probe["flash_kernel"], bool)

    # training: every cell trained (TiledMLP where DeepSpeed is importable) with finite throughput and memory
    cells = written["training"]["cells"]
    assert len(cells) == 2 * len(gpu_check.TINY.train_lengths) + len(gpu_check.TINY.tiled_lengths)
    for cell in cells:
        if cell["tiled_mlp"] and gpu_check.tiled_mlp_ready():
            assert cell["status"] == "skipped" and "DeepSpeed" in cell["line"]
            continue
        assert cell["status"] == "ok", cell
        assert abs(cell["loss"] - math.log(TINY_VOCAB)) < 1.0  # random init: about uniform
        assert cell["tokens_per_second"] > 0 and 0 < cell["mfu"] and 0 < cell["mfu_6n"] < cell["mfu"]
        memory = cell["memory"]
        assert memory["estimate_total_gib"] > memory["estimate_rows_gib"]["overhead"]
        # On CPU the measured side is the process's resident set (noisy at this size); the estimate is exact.
        assert memory["step"]["estimate_gib"] > 0 and memory["step"]["measured_gib"] >= 0
        assert memory["states"]["estimate_gib"] > 0
        assert cell["logged_by_train_py"]["tokens_per_second"] > 0

    # evaluation and the search candidate: scored, finite, random-init NLL about ln(vocab)
    cells = written["evaluation"]["cells"]
    assert [c["what"] for c in cells] == ["sequence_nll"] * len(gpu_check.TINY.eval_lengths) + ["search_candidate"]
    for cell in cells:
        assert cell["status"] == "ok", cell
        assert abs(cell["nll_per_token"] - math.log(TINY_VOCAB)) < 1.0
        assert cell["tokens_per_second"] > 0 and cell["peak_allocated_gib"] > 0

    # the projection: one row per shipped LLaMA2-7B search config, with the paper's population arithmetic
    projection = written["search_projection"]
    rows = {row["target_length"]: row for row in projection["rows"]}
    assert set(rows) == {131072, 262144, 2097152}
    assert rows[131072]["candidates_paper_mode"] == 64 + 40 * (16 + 16)
    assert rows[2097152]["candidates_paper_mode"] == 32 + 10 * (8 + 8)
    assert rows[2097152]["gpus_per_evaluator"] == 8 and rows[131072]["gpus_per_evaluator"] == 1
    for row in rows.values():
        assert 0 < row["fast_mode_gpu_hours"] < row["paper_mode_gpu_hours"]
    assert rows[131072]["sample_s"] < rows[262144]["sample_s"] < rows[2097152]["sample_s"]


def test_an_oom_in_one_cell_is_a_line_its_memory_is_freed_and_the_next_cells_run(tmp_path, monkeypatch, capsys):
    train = gpu_check.GpuCheck._train
    held = []

    def out_of_memory_at_the_first_length(self, name, layers, config, length, tiled):
        if name == gpu_check.SHAPE_1B and length == gpu_check.TINY.train_lengths[0] and not tiled:
            activations = torch.empty(8 * 2**20, dtype=torch.uint8)  # what the failed step held
            held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return train(self, name, layers, config, length, tiled)

    monkeypatch.setattr(gpu_check.GpuCheck, "_train", out_of_memory_at_the_first_length)
    report = _run(tmp_path, "--sections", "training")
    cells = report["training"]["cells"]  # in the order they ran
    first_length = gpu_check.TINY.train_lengths[0]
    failed = next(i for i, c in enumerate(cells) if c["model"].startswith("Llama-3.2") and c["length"] == first_length)
    oom = cells[failed]
    assert oom["status"] == "oom"
    assert oom["line"].startswith("OOM: OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB")
    assert "memory freed" in oom["line"]
    gc.collect()
    assert held and held[0]() is None  # nothing (no traceback frame) keeps the failed cell's tensors
    later = [c for c in cells[failed + 1 :] if not (c["tiled_mlp"] and gpu_check.tiled_mlp_ready())]
    assert len(later) >= 3 and all(c["status"] == "ok" for c in later), later
    assert sum(c["status"] == "oom" for c in cells) == 1
    assert oom["line"] in capsys.readouterr().out
    assert oom["line"] in (tmp_path / "gpu_check.md").read_text()
    assert set(report["sections"]) == {"training"} and report["numerics"]["cells"] == []


def test_a_section_whose_set_up_fails_is_a_note_and_the_others_run(tmp_path, monkeypatch):
    def missing_feature(self):
        raise TypeError("from_config() got an unexpected keyword argument 'dtype'")

    monkeypatch.setattr(gpu_check.GpuCheck, "prepare_numerics", missing_feature)
    report = _run(tmp_path, "--sections", "numerics", "evaluation")
    assert any(note.startswith("numerics: not run, its set-up failed: TypeError") for note in report["notes"])
    assert report["numerics"]["cells"] == [] and report["numerics"]["reference_cells"] == []
    assert [cell["status"] for cell in report["evaluation"]["cells"]] == ["ok"] * 3


def test_out_of_memory_errors_are_told_from_other_failures():
    assert gpu_check.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert gpu_check.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 1 TB"))
    assert not gpu_check.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not gpu_check.is_out_of_memory(ValueError("out of memory"))


def _cells(flops):
    return [gpu_check.Cell("test", f"{value} FLOPs", "kind", float(value), lambda: {}) for value in flops]


def test_a_small_budget_skips_the_largest_cells_first():
    """Each fake cell takes exactly its FLOPs in seconds, which the cost model learns from the first one: with 10 s,
    whatever the order, the cells of 1, 2 and 4 s run and the 8 and 16 s ones are skipped."""
    now = [0.0]
    ran = []

    def run(cell, device):
        now[0] += cell.flops
        cell.status, cell.seconds, cell.result = "ok", cell.flops, {"setup_s": 0.0}
        ran.append(cell.flops)

    cells = _cells([4, 16, 1, 8, 2])
    costs = gpu_check.CostModel(0.0, 1.0)
    gpu_check.run_cells(cells, 10.0, costs, torch.device("cpu"), clock=lambda: now[0], run=run)
    assert ran == [4, 1, 2]
    skipped = [cell for cell in cells if cell.status == "skipped: budget"]
    assert sorted(cell.flops for cell in skipped) == [8, 16]
    assert all(cell.line.startswith("skipped: budget (estimated") for cell in skipped)
    assert now[0] <= 10.0

    # Cells of a later section count too: a big cell now gives way to the small ones still to come.
    now[0] = 0.0
    ran.clear()
    first, later = _cells([8]), _cells([1, 2, 4])
    gpu_check.run_cells(first, 10.0, costs, torch.device("cpu"), later, clock=lambda: now[0], run=run)
    assert first[0].status == "skipped: budget" and ran == []


def test_choose_takes_the_smallest_estimates_that_fit():
    cells = _cells([5, 1, 3, 2])
    assert gpu_check.choose(cells, 6.0, lambda cell: cell.flops) == {1, 2, 3}
    assert gpu_check.choose(cells, 0.5, lambda cell: cell.flops) == set()
    assert gpu_check.choose(cells, 11.0, lambda cell: cell.flops) == {0, 1, 2, 3}


def test_a_zero_budget_skips_every_cell_and_still_writes_every_section(tmp_path):
    report = _run(tmp_path, "--budget_s", "0")
    written = _strict_json(tmp_path / "gpu_check.json")
    assert all(section in written for section in SECTIONS)
    cells = written["numerics"]["cells"] + written["numerics"]["reference_cells"]
    cells += written["training"]["cells"] + written["evaluation"]["cells"]
    assert cells and all(cell["status"] in ("skipped: budget", "skipped") for cell in cells)
    assert any(cell["status"] == "skipped: budget" for cell in written["numerics"]["reference_cells"])
    assert report["search_projection"]["rows"] == [] and "nothing to project" in report["search_projection"]["line"]


def test_the_peak_flops_table_matches_device_names():
    assert peak_flops_for("NVIDIA H200") == 989e12
    assert peak_flops_for("NVIDIA GH200 480GB") == 989e12
    assert peak_flops_for("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for("NVIDIA L40S") == 362e12  # not the L4's, whose key it contains
    assert peak_flops_for("NVIDIA L4") == 121e12
    assert peak_flops_for("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for("Quadro P1000") is None


def test_the_1b_shape_is_llama_3_2_1b_offline():
    from transformers import AutoModelForCausalLM

    from longrope import rope
    from longrope.architectures import architecture_config

    config = architecture_config(gpu_check.SHAPE_1B)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400  # tied embeddings: the published 1.24B
    # Its llama3 rope_scaling keeps the 8k pre-training window: the numerics' 4k and 8k use the short factors.
    assert rope.RopeGeometry.from_config(config) == rope.RopeGeometry(500000.0, 64, 64, 8192)


def test_the_flop_count_of_a_shape():
    from longrope.architectures import architecture_config

    flops = gpu_check.Flops.of(architecture_config("meta-llama/Llama-2-7b-hf"))
    # LLaMA2-7B: 6.48B weights in its 32 layers, 131M in its output head
    assert flops.layers * flops.layer_weights == pytest.approx(6.476e9, rel=1e-3)
    assert flops.head_weights == 32000 * 4096
    one_token = flops.forward(1)
    assert one_token == pytest.approx(2 * (6.476e9 + 32000 * 4096) + 2 * 32 * 4096, rel=1e-3)
    # At 128k tokens causal attention is most of the work; training is three forwards.
    length = 131072
    attention = 2 * 32 * 4096 * length**2
    assert flops.forward(length) == pytest.approx(2 * (6.476e9 + 32000 * 4096) * length + attention, rel=1e-3)
    assert flops.training(length) == 3 * flops.forward(length)
    assert dataclasses.replace(flops, layers=4).forward(length) < flops.forward(length) / 7


@pytest.mark.gpu
def test_the_gpu_check_runs_on_cuda(tmp_path):
    """CPU twin: test_the_tiny_run_writes_every_section_with_finite_numbers (the same code with --device cpu)."""
    report = gpu_check.main(["--device", "cuda", "--tiny", "--output_dir", str(tmp_path)])
    environment = report["environment"]
    assert environment["device"] == "cuda" and environment["matmul"]["flops_per_s"] > 0
    numerics = [row for row in report["numerics"]["cells"] if "method" in row]
    for row in numerics:
        if row["status"] == "skipped":
            assert row["attention"] == "flash_attention_2" and "flash" in row["line"]
            continue
        assert row["status"] == "ok" and 0 < row["max_rel_error"] < 0.05, row
    for cell in report["training"]["cells"] + report["evaluation"]["cells"]:
        if cell["status"] == "skipped":
            assert "DeepSpeed" in cell["line"]
            continue
        assert cell["status"] == "ok", cell
    training = [cell for cell in report["training"]["cells"] if cell["status"] == "ok"]
    assert all(cell["memory"]["measured_peak_reserved_gib"] > 0 for cell in training)
    assert all(cell["attention"] in ("sdpa", "flash_attention_2") for cell in training)


@pytest.mark.gpu
@pytest.mark.slow
def test_the_full_size_evaluation_keeps_to_a_short_budget_on_cuda(tmp_path):
    """The real sizes (the LLaMA2-7B shape at 64k-256k) within 90 s: every cell ran or was skipped for the budget,
    and the projection has its three rows when one sequence_nll cell ran. CPU twins: the budget tests above."""
    budget = 90.0
    report = gpu_check.main(
        ["--device", "cuda", "--budget_s", str(budget), "--sections", "evaluation", "--output_dir", str(tmp_path)]
    )
    cells = report["evaluation"]["cells"]
    assert all(cell["status"] in ("ok", "skipped: budget") for cell in cells), cells
    assert report["elapsed_s"] < budget + 30
    ran = [cell for cell in cells if cell["status"] == "ok"]
    skipped = [cell for cell in cells if cell["status"] != "ok"]
    assert not ran or not skipped or max(c["estimate_s"] for c in ran) <= max(c["estimate_s"] for c in skipped)
    if any(cell["what"] == "sequence_nll" for cell in ran):
        assert len(report["search_projection"]["rows"]) == 3
