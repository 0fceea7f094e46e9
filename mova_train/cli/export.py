"""Export trained LoRA adapters for other tools: `python -m mova_train.cli.export --help`.

Thin CLI over mova_train.lora.export; user errors exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys

EPILOG = """\
formats:
  peft     OUT/<component>/adapter_config.json + adapter_model.safetensors, one folder per trained component
           (video_dit, video_dit_2, audio_dit, dual_tower_bridge); load with peft.PeftModel.from_pretrained
  mova     OUT/adapters.safetensors (+ adapter_config.json): keys <component>.<module path>.lora_A/.lora_B.weight,
           rank/alpha/targets in the metadata; what `python -m mova_train.cli.sample --lora` reads
  comfyui  OUT/<component>.safetensors: diffusion_model.<module path>.lora_A/.lora_B.weight + .alpha per module
  merged   OUT/ = the base checkpoint (--checkpoint) with the adapters merged in, released layout

SOURCE is a run dir (its latest checkpoint), a checkpoint dir (runs/x/checkpoints/step-00001000), its
adapter/ folder, or an adapters .safetensors file. Exporting twice gives byte-identical files.

examples:
  python -m mova_train.cli.export runs/voice_lora --out exports/voice_peft --format peft
  python -m mova_train.cli.export runs/voice_lora/checkpoints/step-00002000 --out exports/voice.mova --format mova
  python -m mova_train.cli.export runs/voice_lora --out checkpoints/MOVA-360p-voice --format merged \\
      --checkpoint checkpoints/MOVA-360p
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.export",
        description="Export LoRA adapters trained by mova-train to PEFT, MOVA, ComfyUI or a merged checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run dir, checkpoint dir or adapter")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument("--format", required=True, dest="fmt", metavar="{peft,mova,comfyui,merged}")
    parser.add_argument("--checkpoint", metavar="BASE_DIR", help="base checkpoint folder (needed for merged)")
    parser.add_argument("--scale", type=float, default=1.0, help="adapter scale for merged (default 1.0)")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="cast adapter weights (default: as trained)",
    )
    parser.add_argument(
        "--from-zero",
        action="store_true",
        help="if the checkpoint has no adapter/ folder, consolidate its DeepSpeed ZeRO state (unpickles "
        "DeepSpeed's .pt files: only for checkpoints you trust)",
    )
    parser.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="merged: merge even if the adapter records another base identity (shapes are still checked)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    # Imported after parsing on purpose: the LoRA code loads torch, peft and DeepSpeed, and `--help` should not wait.
    from mova_train.checkpoint_io import CheckpointError
    from mova_train.lora.config import LoraError
    from mova_train.lora.export import export_adapter

    try:
        written = export_adapter(
            args.source,
            args.out,
            args.fmt,
            checkpoint=args.checkpoint,
            scale=args.scale,
            dtype=args.dtype,
            from_zero=args.from_zero,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    except (LoraError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
