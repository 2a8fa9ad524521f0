"""Write a model folder that stock transformers (so vLLM and lm-eval) loads with the LongRoPE factors, no custom code.

    python -m longrope.export --model_name_or_path models/tiny --rope_factors_path factors.json --output_dir outputs/tiny-2k

The same keys as every script (``model_name_or_path``, ``rope_factors_path``, ``target_length`` for an official CSV,
``allow_start_tokens``, ``allow_shared_mscale``, ``output_dir``); ``--config file.yaml`` works too. The output folder is replaced whole, so it
must be new, empty, or an earlier export (it holds ``longrope_factors.json``); anything else is refused.
"""

from __future__ import annotations

import sys

from longrope.args import RENAMED_KEYS, ExportArguments, ModelArguments, OutputArguments, RopeArguments
from longrope.config_parser import parse_config
from longrope.errors import LongRopeError, exit_on_user_error

# This command's own earlier flags (python -m longrope.factors export --model --factors --output).
RENAMED_FLAGS = {**RENAMED_KEYS, "model": "model_name_or_path", "factors": "rope_factors_path", "output": "output_dir"}


def main(argv: list[str] | None = None) -> str:
    from longrope import factors
    from longrope.io import check_replaceable
    from longrope.modeling import build_model, load_config, load_tokenizer
    from longrope.rope_config import resolve_rope

    with exit_on_user_error("python -m longrope.export"):
        model_args, rope_args, export_args, output_args = parse_config(
            (ModelArguments, RopeArguments, ExportArguments, OutputArguments), argv, RENAMED_FLAGS
        )
        name = model_args.require_checkpoint("python -m longrope.export")
        if rope_args.method == "none":
            raise LongRopeError("rope_factors_path: required; the factors (or rope_method) the export should carry")
        check_replaceable(output_args.output_dir, "output_dir", factors.FACTORS_FILE_NAME, "an export")
        resolved = resolve_rope(rope_args, load_config(model_args))
        # Before any weights load: the one-line refusal naming --allow_start_tokens or --allow_shared_mscale.
        factors.to_rope_parameters(resolved.scaling, export_args.allow_start_tokens, export_args.allow_shared_mscale)
        for note in resolved.notes:
            print(f"warning: {note}", file=sys.stderr)
        model = build_model(model_args)
        try:
            tokenizer = load_tokenizer(model_args.tokenizer_path)
        except LongRopeError:
            tokenizer = None  # a weights-only folder exports without one
        provenance = {"factors_sha256": resolved.sha256, "exported_from": name}
        notes = factors.export_model(
            model,
            resolved.scaling,
            output_args.output_dir,
            tokenizer,
            provenance,
            export_args.allow_start_tokens,
            export_args.allow_shared_mscale,
        )
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    message = (
        f"exported {output_args.output_dir} (rope_type longrope, {resolved.scaling.max_position_embeddings} positions)"
    )
    print(message)
    return message


if __name__ == "__main__":
    main()
