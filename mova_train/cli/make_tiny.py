"""Write a complete tiny MOVA checkpoint (released layout, random weights, a few MB) for tests and demos.

python -m mova_train.cli.make_tiny OUT_DIR [--seed N]
python -m mova_train.cli.make_tiny OUT_DIR --codecs-only [--seed N]   # video_vae/, audio_vae/, text_encoder/, tokenizer/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.make_tiny",
        description="Write a tiny random MOVA checkpoint in exactly the released folder layout (model_index.json, "
        "scheduler/, tokenizer/, text_encoder/, video_dit/ and video_dit_2/ in 3 shards with an index, audio_dit/, "
        "dual_tower_bridge/, video_vae/, audio_vae/). Used by the tests and the demo.",
    )
    parser.add_argument("out_dir", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument(
        "--codecs-only",
        action="store_true",
        help="write only the codec folders (video_vae/, audio_vae/, text_encoder/, tokenizer/) into OUT_DIR, "
        "which may exist; they replace folders of the same name",
    )
    args = parser.parse_args(argv)
    # Imported here on purpose: the writers pull in torch, diffusers and transformers, and `--help` should not wait.
    from mova_train.codecs.tiny import write_tiny_codecs
    from mova_train.models.tiny import write_tiny_checkpoint

    if args.codecs_only:
        try:
            write_tiny_codecs(Path(args.out_dir), args.seed)
        except OSError as e:
            print(f"make_tiny: error: cannot write {args.out_dir}: {e}", file=sys.stderr)
            return 2
        print(f"wrote tiny codecs to {args.out_dir}")
        return 0
    try:
        path = write_tiny_checkpoint(args.out_dir, seed=args.seed)
    except (FileExistsError, ValueError, OSError) as e:
        print(f"make_tiny: error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"wrote tiny MOVA checkpoint to {path} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
