"""Every shipped config parses into the dataclasses of the script its header launches, and says how to launch it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import evaluate
import search
import train
from data import prepare
from longrope.config_parser import parse_config, resolved_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# The pipeline files are no script's config: they list a pipeline's stages and claims (tests/test_pipeline.py).
PIPELINE_CONFIGS = (Path("tiny/demo.yaml"), Path("smollm2-135m/pipeline.yaml"))
SCRIPT_CONFIGS = sorted(
    p
    for p in CONFIGS.rglob("*.yaml")
    if p.parent.name not in ("accelerate", "lm_eval_tasks", "tiny_python")
    and p.relative_to(CONFIGS) not in PIPELINE_CONFIGS
)


def launched_script(path: Path) -> str:
    """The script the config's opening comment launches (every config opens with its launch command)."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header)
    for script in ("search.py", "evaluate.py", "train.py", "data.prepare"):
        if re.search(
            rf"(python|torchrun|accelerate launch)[^\n]*\b{re.escape(script)}[^\n]*{re.escape(path.name)}", text
        ):
            return script
    raise AssertionError(f"{path.relative_to(ROOT)}: the opening comment must hold its launch command")


SCRIPT_KEYS = {
    "search.py": search.CONFIG_KEYS,
    "evaluate.py": evaluate.CONFIG_KEYS,
    "train.py": train.CONFIG_KEYS,
    "data.prepare": prepare.CONFIG_KEYS,
}


@pytest.mark.parametrize("path", SCRIPT_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_for_its_script(path):
    script = launched_script(path)
    # --dry_run turns off bf16/fp16 at parse time, which a CPU machine would refuse for the 7B recipes.
    extra = ["--dry_run", "true"] if script == "train.py" else []
    parsed = parse_config(SCRIPT_KEYS[script], ["--config", str(path), *extra])
    raw = yaml.safe_load(path.read_text())
    resolved = resolved_config(*parsed)
    for key, value in raw.items():
        # Every key lands in the script's keys with the value written (deepspeed: a path becomes its settings;
        # bf16/fp16: the dry run turns them off on a CPU).
        if isinstance(value, (str, int, float, bool)) and key not in ("deepspeed", "bf16", "fp16"):
            # (transformers keeps report_to as a list, "none" as an empty one)
            expected = (value, [value], []) if key == "report_to" and value == "none" else (value, [value])
            assert resolved[key] in expected, f"{path.name}: {key} parsed as {resolved[key]!r}, not {value!r}"
    for key in ("output_dir", "dataset_path", "documents_path"):
        if key in raw:
            assert not Path(raw[key]).is_absolute(), f"{path.name}: {key} must be relative to the repository"


def test_every_accelerate_topology_points_at_a_committed_deepspeed_config():
    topologies = sorted((CONFIGS / "accelerate").glob("*.yaml"))
    assert topologies
    for path in topologies:
        config = yaml.safe_load(path.read_text())
        assert config["num_processes"] >= 1 and config["compute_environment"] == "LOCAL_MACHINE"
        assert "accelerate launch --config_file configs/accelerate/" + path.name in path.read_text()
        if config["distributed_type"] == "DEEPSPEED":
            deepspeed_file = ROOT / config["deepspeed_config"]["deepspeed_config_file"]
            deepspeed = json.loads(deepspeed_file.read_text())
            assert deepspeed["zero_optimization"]["stage"] == 3
            # One source of truth: every value the Trainer knows is left to it.
            for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
                assert deepspeed[key] == "auto", f"{deepspeed_file.name}: {key} must be auto"


def test_the_lm_eval_task_data_ships_with_the_repository():
    task = yaml.safe_load((CONFIGS / "lm_eval_tasks" / "tiny_python" / "tiny_python.yaml").read_text())
    data = ROOT / task["dataset_kwargs"]["data_files"]["test"]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(rows) >= 20 and all(0 <= row["label"] < len(row["choices"]) for row in rows)
