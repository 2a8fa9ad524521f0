"""Run a script's ``__main__`` in a child forked from a process that has already imported torch and transformers.

A fresh ``python evaluate.py`` spends about 8 s of CPU importing torch, transformers, datasets, trl and matplotlib
before it reads its config; the CI-sized demo runs 17 stages, most of them seconds long. A child forked after
:func:`preload` starts with those modules loaded and nothing else: the parent has only imported them (no torch
operation ran, no thread started), so each stage still starts from the state of a new interpreter, its output goes to
its own log and its exit code is the script's. torch's thread pool starts lazily, in the child, with the usual number
of threads.
"""

from __future__ import annotations

import atexit
import importlib
import os
import runpy
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path

# What the four entries import before they do anything (measured with python -X importtime evaluate.py): the public
# names, so that transformers' lazy modules really load.
PRELOAD_MODULES = (
    "torch",
    "datasets",
    "matplotlib.pyplot",
    "trl",
    "longrope.args",
    "longrope.evaluation",
    "longrope.search_stages",
    "longrope.train_args",
)
PRELOAD_ATTRIBUTES = (("transformers", "AutoModelForCausalLM"), ("transformers", "Trainer"))


def can_fork() -> bool:
    return hasattr(os, "fork") and sys.platform != "darwin"  # macOS: fork after importing its frameworks can crash


def preload() -> bool:
    """Import what the entries import; False if a thread is running afterwards (forking it would be unsafe)."""
    for name in PRELOAD_MODULES:
        importlib.import_module(name)
    for module, attribute in PRELOAD_ATTRIBUTES:
        getattr(importlib.import_module(module), attribute)
    return threading.active_count() == 1


def _exit_code(error: SystemExit) -> int:
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)  # what the interpreter does with sys.exit("message")
    return 1


def run_forked(arguments: Sequence[str], env: Mapping[str, str], cwd: Path, log_path: Path) -> int:
    """Run ``python *arguments`` (``script.py ...`` or ``-m module ...``) in a child forked from this process, with
    ``env``, in ``cwd``, its stdout and stderr into ``log_path``; returns its exit code as ``subprocess.run`` would."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    code = 1
    try:  # the child: never returns into the caller's stack
        log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        # New streams on the log, line-buffered: the parent's may be buffered, or not on its file descriptors at all.
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 (they live until os._exit)
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        if arguments[0] == "-m":
            sys.argv = [arguments[1], *arguments[2:]]
            runpy.run_module(arguments[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(arguments)
            sys.path[0] = str((cwd / arguments[0]).parent)  # the script's folder, as the interpreter sets it
            runpy.run_path(str(cwd / arguments[0]), run_name="__main__")
        code = 0
    except SystemExit as error:
        code = _exit_code(error)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what the interpreter runs on exit (W&B, logging); os._exit skips it
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
