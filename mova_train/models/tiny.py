"""The tiny MOVA checkpoint: the released folder layout with random weights (a few MB), for tests and demos.

`python -m mova_train.cli.make_tiny OUT_DIR` is its command line; the test fixtures and the benchmarks call
`write_tiny_checkpoint` directly.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..codecs.tiny import write_tiny_codecs
from .checkpoint import save_mova
from .mova import build_mova


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
