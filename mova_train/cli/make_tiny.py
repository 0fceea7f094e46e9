"""Write a complete tiny MOVA checkpoint (released layout, random weights, a few MB) for tests and demos.

python -m mova_train.cli.make_tiny OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.cli.make_tiny",
        description="Write a tiny random MOVA checkpoint in exactly the released folder layout (model_index.json, "
        "scheduler/, tokenizer/, text_encoder/, video_dit/ and video_dit_2/ in 3 shards with an index, audio_dit/, "
        "dual_tower_bridge/, video_vae/, audio_vae/). Used by the tests and the demo.",
    )
    parser.add_argument("out_dir", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
    # Imported here on purpose: the writer pulls in torch, diffusers and transformers, and `--help` should not wait.
    from mova_train.models.tiny import write_tiny_checkpoint

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
