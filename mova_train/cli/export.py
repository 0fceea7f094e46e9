"""Export trained LoRA adapters for other tools: `python -m mova_train.cli.export --help`.

Thin CLI over mova_train.lora.export; user errors exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import logging
import sys

EPILOG = """\
formats (README "5. Export and sample" has the table of tools, how each loads these files and what was checked):
  peft           OUT/<component>/adapter_config.json + adapter_model.safetensors, one folder per trained component
                 (video_dit, video_dit_2, audio_dit, dual_tower_bridge); peft.PeftModel.from_pretrained (PEFT >= 0.13)
  mova           OUT/adapters.safetensors (+ adapter_config.json): keys <component>.<module path>.lora_A/.lora_B.weight,
                 rank/alpha/targets in the metadata
  mova-official  OUT/lora_weights.pt + lora_config.pt for the official MOVALoRA.load_lora(OUT) (true rank and alpha;
                 attention layers only), and the same tensors as adapters.safetensors
  diffsynth      OUT/diffsynth_lora.safetensors for DiffSynth-Studio: pipe.load_lora(pipe, FILE) (alpha baked in)
  comfyui        OUT/<component>.safetensors: the video experts as Wan 2.1 LoRAs (diffusion_model.<path> + .alpha);
                 audio_dit / dual_tower_bridge keep their component prefix (ComfyUI has no MOVA audio or bridge)
  merged         OUT/ = the base checkpoint with the adapters merged in, released layout, written tensor by tensor;
                 the base is --checkpoint, or the run's model.checkpoint

SOURCE is a run dir (its latest checkpoint), a checkpoint dir (runs/x/checkpoints/step-00001000), its adapter/
folder, or an adapter in any of the formats above. Exporting twice gives byte-identical files. Every format is
read by `python -m mova_train.cli.sample --lora` (merged: pass it as --checkpoint).

examples:
  python -m mova_train.cli.export runs/voice_lora --out exports/voice_peft --format peft
  python -m mova_train.cli.export runs/voice_lora/checkpoints/step-00002000 --out exports/voice.mova --format mova
  python -m mova_train.cli.export runs/voice_lora --out exports/voice_official --format mova-official
  python -m mova_train.cli.export runs/voice_lora --out checkpoints/MOVA-360p-voice --format merged
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.export",
        description="Export LoRA adapters trained by mova-train to PEFT, MOVA (ours or the official loader's), "
        "DiffSynth, ComfyUI or a merged checkpoint.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT", help="run dir, checkpoint dir or adapter")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--format", required=True, dest="fmt", metavar="{peft,mova,mova-official,diffsynth,comfyui,merged}"
    )
    parser.add_argument(
        "--checkpoint",
        metavar="BASE_DIR",
        help="merged: the base to merge into (default: the run's model.checkpoint)",
    )
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
