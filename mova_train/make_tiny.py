"""Write a complete tiny MOVA checkpoint (released layout, random weights, a few MB) for tests and demos.

python -m mova_train.make_tiny OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from .models.checkpoint import save_mova
from .models.mova import build_mova


def write_tiny_checkpoint(out_dir: str | os.PathLike, seed: int = 0, *, include_codecs: bool = True) -> Path:
    """Write the tiny checkpoint to `out_dir` (must not exist, or be an empty folder) and return its path.

    Everything is written into a temporary sibling folder first and renamed at the end, so an interrupted run
    leaves no half-written checkpoint behind.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; choose a new OUT_DIR")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model = build_mova("tiny", device="cpu", seed=seed)
        save_mova(model, tmp)
        if include_codecs:
            from .codecs.tiny import write_tiny_codecs

            write_tiny_codecs(tmp, seed)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mova_train.make_tiny",
        description="Write a tiny random MOVA checkpoint in exactly the released folder layout (model_index.json, "
        "scheduler/, tokenizer/, text_encoder/, video_dit/ and video_dit_2/ in 3 shards with an index, audio_dit/, "
        "dual_tower_bridge/, video_vae/, audio_vae/). Used by the tests and the demo.",
    )
    parser.add_argument("out_dir", help="folder to create (must not exist, or be empty)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(argv)
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
