"""What runs write, and how: atomically, only where they may, and never over a user's files.

- Files are written through a temporary file and a rename (:func:`atomic_write_text`), so a reader never sees half
  a file and a killed run leaves the previous version.
- Every entry point checks its output paths before loading a model or reading data (:func:`check_output_dir`), so a
  path that is a file or cannot be written costs one line, not a finished computation.
- A folder a run replaces whole (a prepared dataset, an exported model) is replaced only when it is empty or holds
  the marker file this project writes into such folders (:func:`check_replaceable`); anything else is a user's and is
  refused. The replacement is built beside it and swapped in (:func:`replace_directory`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from longrope.errors import LongRopeError


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, payload: Any) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=False) + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_save_figure(figure: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure through a temporary file and a rename, then close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        figure.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if tmp.exists():
            tmp.unlink()


def check_output_dir(path: str | os.PathLike | None, key: str = "output_dir") -> Path:
    """``path`` as a folder this process can create or write into; one-line LongRopeError naming ``key`` otherwise.

    Creates nothing: writability is probed with an unnamed temporary file in the nearest existing folder.
    """
    if path is None or str(path) == "":
        raise LongRopeError(f"{key}: required; the folder this run writes into")
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise LongRopeError(f"{key}: {target} is a file, not a folder; give a folder path")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise LongRopeError(f"{key}: {target} cannot be created, {existing} is a file; give a folder path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise LongRopeError(
            f"{key}: {target} is not writable ({existing}: {error.strerror or error}); choose a folder you can write"
        ) from None
    return target


def check_replaceable(path: str | os.PathLike | None, key: str, marker: str, writer: str) -> Path:
    """``path`` as a folder a run may replace whole: absent, empty, or holding ``marker`` (so written by ``writer``)."""
    target = check_output_dir(path, key)
    if target.is_dir() and not (target / marker).is_file():
        foreign = sorted(entry.name for entry in target.iterdir())
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise LongRopeError(
                f"{key}: {target} holds files {writer} did not write ({shown}) and would be replaced whole; "
                "choose a new folder or move those files"
            )
    return target


def replace_directory(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Swap the finished folder ``staging`` into ``target`` (which may exist): readers see the old or the new one."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)


def staging_directory(target: str | os.PathLike) -> Path:
    """A new hidden folder beside ``target`` to build its replacement in (same filesystem, so the swap is atomic)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    # mkdtemp creates 0700 folders; give the result the permissions a plain mkdir would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    return staging
