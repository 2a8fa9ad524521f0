"""factors/: every published factors file is listed in its README with provenance that matches the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from longrope import factors

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "factors"
COLUMNS = ["file", "config", "seed", "stage", "evaluated tokens", "fitness", "sha256"]


def published_rows() -> list[dict[str, str]]:
    lines = (FOLDER / "README.md").read_text(encoding="utf-8").splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| file |"))
    assert [cell.strip() for cell in lines[header].strip("|").split("|")] == COLUMNS
    rows = []
    for line in lines[header + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(COLUMNS, (cell.strip() for cell in line.strip("|").split("|")), strict=True)))
    return rows


def test_every_factors_file_is_listed_once():
    listed = [row["file"] for row in published_rows()]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    assert sorted(listed) == sorted(path.name for path in FOLDER.glob("*.json"))


@pytest.mark.parametrize("row", published_rows(), ids=lambda row: row["file"])
def test_published_file_matches_its_row(row):
    path = FOLDER / row["file"]
    loaded = factors.load(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == row["sha256"] == loaded.sha256
    assert (ROOT / row["config"]).is_file(), f"{row['config']} is not in the repository"
    provenance = loaded.provenance
    assert provenance["stage"] == row["stage"]
    assert provenance["settings"]["seed"] == int(row["seed"])
    assert provenance["evaluated_tokens"] == int(row["evaluated tokens"])
    metric, value = row["fitness"].split()
    assert provenance["fitness_metric"] == metric
    assert provenance["fitness"] == pytest.approx(float(value), abs=5e-5)
    assert loaded.warnings == []
    if row["stage"] == "short":
        assert loaded.scaling.short_factors is not None, "a short stage's file holds a short set"
