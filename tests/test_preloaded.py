"""longrope/preloaded.py: a script run in a forked child behaves as `python script.py` would (output, exit code,
environment, working directory, atexit)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from longrope import preloaded

pytestmark = pytest.mark.skipif(not preloaded.can_fork(), reason="needs os.fork (Linux)")

SCRIPT = """
import atexit, os, sys
atexit.register(lambda: print("atexit ran"))
print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("STAGE_VALUE"), "main", __name__)
print("to stderr", file=sys.stderr)
if sys.argv[1] == "fail":
    raise RuntimeError("a deep error")
if sys.argv[1] == "message":
    sys.exit("script: error: one line")
sys.exit(int(sys.argv[1]))
"""


def _run(tmp_path: Path, argument: str) -> tuple[int, str]:
    (tmp_path / "stage.py").write_text(SCRIPT)
    log = tmp_path / "stage.log"
    env = {**os.environ, "STAGE_VALUE": "from-env"}
    code = preloaded.run_forked(["stage.py", argument], env, tmp_path, log)
    return code, log.read_text()


def test_a_forked_script_writes_its_log_and_returns_its_exit_code(tmp_path):
    code, log = _run(tmp_path, "0")
    assert code == 0
    assert f"argv ['0'] cwd {tmp_path} env from-env main __main__" in log
    assert "to stderr" in log and log.rstrip().endswith("atexit ran")
    assert "STAGE_VALUE" not in os.environ and Path.cwd() != tmp_path  # the parent is untouched

    assert _run(tmp_path, "3")[0] == 3


def test_a_forked_script_that_fails_reports_it_as_an_interpreter_would(tmp_path):
    code, log = _run(tmp_path, "fail")
    assert code == 1 and "Traceback" in log and "RuntimeError: a deep error" in log and "atexit ran" in log
    code, log = _run(tmp_path, "message")
    assert code == 1 and "script: error: one line" in log and "Traceback" not in log


def test_a_module_runs_as_with_python_dash_m(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tool.py").write_text("import sys\nprint('module', __name__, sys.argv[1:])\n")
    log = tmp_path / "tool.log"
    sys.path.insert(0, str(tmp_path))
    try:
        code = preloaded.run_forked(["-m", "pkg.tool", "--config", "x.yaml"], dict(os.environ), tmp_path, log)
    finally:
        sys.path.remove(str(tmp_path))
    assert code == 0 and "module __main__ ['--config', 'x.yaml']" in log.read_text()


def test_a_forked_script_in_a_subfolder_imports_its_siblings_as_python_script_py_would(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    (folder / "sibling.py").write_text("VALUE = 'from the sibling'\n")
    (folder / "stage.py").write_text("import sys, sibling\nprint(sibling.VALUE, sys.path[0])\n")
    log = tmp_path / "stage.log"
    code = preloaded.run_forked(["scripts/stage.py"], dict(os.environ), tmp_path, log)
    assert code == 0 and f"from the sibling {folder}" in log.read_text()
