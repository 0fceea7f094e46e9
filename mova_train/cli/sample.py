"""Render clips with sound from a MOVA checkpoint plus LoRA adapters: `python -m mova_train.cli.sample --help`.

Writes one mp4 (H.264 + AAC 48 kHz) and one PNG contact sheet per prompt, and renders.json describing the run.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

EPILOG = """\
examples:
  python -m mova_train.cli.sample --checkpoint checkpoints/MOVA-360p --image ref.png \\
      --prompt "a woman says hello in a quiet kitchen" --out renders/
  python -m mova_train.cli.sample --checkpoint checkpoints/MOVA-360p --lora runs/voice/checkpoints/step-002000:0.8 \\
      --lora exported/style:0.5 --prompts prompts.jsonl --offload-experts --out renders/

MOVA generates video+audio from an image and text: --image is required, either on the command line or per entry
of a .json/.jsonl prompts file ({"prompt": ..., "image": "ref.png", "seed": 3, "negative_prompt": ...}).
--grey-reference instead conditions on a mid-grey first frame; the model was trained image-conditioned only, so
such clips open on grey.  Prompt i uses seed + i unless its entry sets a seed; the same seed gives identical files.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.sample",
        description="Sample MOVA (image + text -> video + audio) with optional LoRA adapters and write mp4 files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="base checkpoint folder (released MOVA layout)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="DIR[:SCALE]",
        help="adapter to merge with a scale (default 1.0); repeat for several (they add up). DIR is an adapter "
        "folder or .safetensors file (save_adapters / export --format mova), a training checkpoint folder "
        "(step-XXXXXX), or a run folder (its latest checkpoint)",
    )
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", help="one text prompt")
    prompts.add_argument(
        "--prompts", metavar="FILE", help="prompts file: .txt (one per line), .json or .jsonl"
    )
    parser.add_argument(
        "--negative-prompt", default=None, help="default: the reference (Wan) negative prompt"
    )
    parser.add_argument(
        "--image", metavar="REF.png", help="reference first frame (centre-cropped and resized)"
    )
    parser.add_argument(
        "--grey-reference", action="store_true", help="no image: condition on a mid-grey frame"
    )
    parser.add_argument(
        "--frames", type=int, default=193, help="number of frames, 1 mod 4 (default 193 = 8 s)"
    )
    parser.add_argument("--size", default="352x640", help="HEIGHTxWIDTH, multiples of 16 (default 352x640)")
    parser.add_argument("--fps", type=float, default=24.0, help="frame rate (default 24)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps (default 50)")
    parser.add_argument(
        "--cfg", type=float, default=5.0, help="text guidance scale (default 5.0; 1 = no CFG)"
    )
    parser.add_argument("--cfg-audio", type=float, default=None, help="audio guidance scale (default: --cfg)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first prompt (default 0)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--offload-experts",
        action="store_true",
        help="keep one 14B video expert resident at a time (load high-noise, run, free, load low-noise)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=("bf16", "fp16", "fp32"),
        default=None,
        help="model dtype (default bf16 on GPU, fp32 on CPU)",
    )
    parser.add_argument("--no-contact-sheet", action="store_true", help="skip the PNG contact sheets")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s"
    )
    try:
        return _run(args)
    except ValueError as exc:  # every user error in mova_train is a ValueError subclass naming the culprit
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    # Imported here on purpose: torch and the sampling code take seconds to load, and `--help` should not wait.
    import torch

    from mova_train.checkpoint_io import write_json_atomic
    from mova_train.sampling.inputs import (
        PromptItem,
        SamplingError,
        check_sample_shape,
        load_prompts_file,
        load_reference_image,
        parse_lora_spec,
        parse_size,
    )

    height, width = parse_size(args.size)
    check_sample_shape(args.frames, height, width, args.fps)  # fail before loading 70 GB of weights
    if args.steps < 1:
        raise SamplingError(f"--steps must be >= 1, got {args.steps}")
    items = load_prompts_file(args.prompts) if args.prompts else [PromptItem(args.prompt)]
    if args.image and args.grey_reference:
        raise SamplingError("--image and --grey-reference exclude each other")
    for item in items:
        image = item.image or args.image
        if image is None and not args.grey_reference:
            raise SamplingError(
                f"no reference image for prompt {item.prompt[:60]!r}: MOVA is image+text -> video+audio; pass "
                "--image REF.png (or an 'image' per prompt in a .jsonl file), or --grey-reference to start from grey"
            )
        if image is not None:
            load_reference_image(image, height, width)  # unreadable image -> clear error now
    loras = [parse_lora_spec(text) for text in args.lora]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]

    from mova_train.sampling.pipeline import load_pipeline
    from mova_train.sampling.render import render_stem, save_render
    from mova_train.sampling.sampler import generate

    started = time.perf_counter()
    pipeline = load_pipeline(
        args.checkpoint, loras=loras, offload_experts=args.offload_experts, device=device, dtype=dtype
    )
    out_dir = Path(args.out)
    records = []
    for i, item in enumerate(items):
        seed = item.seed if item.seed is not None else args.seed + i
        negative = item.negative_prompt if item.negative_prompt is not None else args.negative_prompt
        (render,) = generate(
            pipeline,
            None,
            [item.prompt],
            negative_prompt=negative,
            image=item.image or args.image,
            num_frames=args.frames,
            height=height,
            width=width,
            steps=args.steps,
            cfg_scale=args.cfg,
            cfg_scale_audio=args.cfg_audio,
            seed=seed,
            fps=args.fps,
            progress=not args.quiet,
        )
        record = save_render(
            render, out_dir, render_stem(i, item.prompt, seed), contact_sheet=not args.no_contact_sheet
        )
        records.append(record)
        logging.info("wrote %s", record["mp4"])
    summary = {
        "checkpoint": str(args.checkpoint),
        "loras": [{"path": a.path, "scale": a.scale} for a in pipeline.adapters],
        "sampling": {
            "num_frames": args.frames,
            "height": height,
            "width": width,
            "fps": args.fps,
            "steps": args.steps,
            "cfg_scale": args.cfg,
            "cfg_scale_audio": args.cfg_audio,
            "offload_experts": args.offload_experts,
            "dtype": dtype_name,
        },
        "renders": records,
    }
    write_json_atomic(out_dir / "renders.json", summary)
    if not args.quiet:
        print(f"{len(records)} render(s) in {out_dir} ({time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
