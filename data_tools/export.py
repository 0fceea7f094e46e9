"""`data_tools export-clips`: write every kept clip of a plan as an aligned mp4 (the exact frames and audio the
model will see: bucket size, target fps, 48 kHz mono, audio sample 0 at frame 0), to watch before encoding.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data_tools.align import AlignedClip, load_clip
from data_tools.common import DataToolsError, ensure_writable_dir, log, progress, read_jsonl
from mova_train.media import write_mp4


def export_clip(out_dir: str | Path, row: dict, clip: AlignedClip) -> Path:
    """Write one aligned clip as `<clip_id>.mp4` (H.264 + AAC, both streams starting at 0)."""
    return write_mp4(
        Path(out_dir) / f"{row['clip_id']}.mp4", clip.frames, float(row["fps"]), clip.audio, clip.sample_rate
    )


def export_plan(plan_rows: list[dict], out_dir: str | Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(written paths, [(clip_id, reason)] for clips that could not be decoded)."""
    out = ensure_writable_dir(out_dir, what="--export-clips folder")
    kept = [r for r in plan_rows if r.get("status") == "kept"]
    written: list[Path] = []
    failed: list[tuple[str, str]] = []
    for row in progress(kept, total=len(kept), desc="export", unit="clip"):
        try:
            clip = load_clip(row)
        except DataToolsError as e:
            failed.append((row["clip_id"], str(e)))
            continue
        written.append(export_clip(out, row, clip))
    return written, failed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plan", required=True, help="clip plan written by `plan` (plan.jsonl)")
    parser.add_argument("--out", required=True, help="folder for the aligned mp4 clips")


def run(args: argparse.Namespace) -> int:
    rows = read_jsonl(args.plan, what="clip plan")
    written, failed = export_plan(rows, args.out)
    for clip_id, reason in failed:
        log(f"export: skipped {clip_id}: {reason}")
    log(f"export: wrote {len(written)} aligned clips to {args.out}")
    return 0
