"""Parameter names, shapes and counts of a MOVA checkpoint folder or a named config (built on `meta`).

python -m mova_train.cli.inspect --config mova_360p
python -m mova_train.cli.inspect --checkpoint checkpoints/MOVA-360p --json
python -m mova_train.cli.inspect --config mova_360p --lora voice_lora
"""

from __future__ import annotations

import argparse
import sys

from mova_train.models.config import CONFIG_PRESETS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.inspect",
        description="Print per-component parameter counts (and total / active = one expert + audio + bridge) of a "
        "MOVA checkpoint folder (read from safetensors headers, no weights loaded) or of a named config (built on "
        "the meta device). With --json print {component: {param_name: shape}}.",
    )
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", metavar="DIR", help="a MOVA checkpoint folder (released layout)")
    src.add_argument("--config", choices=CONFIG_PRESETS, help="a named architecture")
    parser.add_argument("--json", action="store_true", help="print {component: {param_name: shape}} as JSON")
    parser.add_argument(
        "--lora",
        metavar="NAME",
        help="also list the modules a LoRA setup targets and its trainable parameters per component: preset names "
        "(comma-separated, e.g. self_attn,bridge_a2v), a configs/lora bundle (voice), an experiment (voice_lora) "
        "or a YAML file",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Imported after parsing on purpose: the inspection builds models and codecs (torch, diffusers, transformers),
    # and `--help` should not wait for them.
    from mova_train.models.inspect import format_counts, inspect_checkpoint, inspect_config, shapes_json

    try:
        insp = inspect_checkpoint(args.checkpoint) if args.checkpoint else inspect_config(args.config)
    except ValueError as e:  # CheckpointError and ConfigError are ValueErrors
        print(f"inspect: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(shapes_json(insp.shapes))
    else:
        print(format_counts(insp))
    for n in insp.notes:
        if args.json:
            print(f"note: {n}", file=sys.stderr)
    if args.lora:
        # Only --lora needs the LoRA code (peft); plain counts do not load it.
        from mova_train.lora.inspect import lora_config_from_name, print_lora_summary

        try:
            print()
            print_lora_summary(insp.model, lora_config_from_name(args.lora))
        except ValueError as e:  # LoraError names the preset, component or field
            print(f"inspect: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
