"""Shared pieces of the data_tools stages: the user-error type, buckets, atomic JSONL tables, hashing, progress.

Every table a stage writes (sources, clip plan, report) is JSON Lines, one object per row, written atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mova_train.progress import track

DATA_TOOLS_VERSION = "0.1.0"
VIDEO_EXTENSIONS = (".mp4", ".mov", ".m4v", ".mkv", ".webm", ".avi")
DEFAULT_FPS = 24.0
DEFAULT_FRAMES = 193
DEFAULT_BUCKETS = "352x640,640x352,480x480"
TARGET_SAMPLE_RATE = 48000
SOURCES_NAME = "sources.jsonl"
PLAN_NAME = "plan.jsonl"
REPORT_NAME = "report.jsonl"

_ID_BAD_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


class DataToolsError(ValueError):
    """A user error (bad option, unreadable input, unwritable output): the CLI prints it and exits with 2."""


@dataclass(frozen=True)
class Bucket:
    """One target frame size; every clip is resized (cover) and centre-cropped to exactly height x width."""

    height: int
    width: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        return self.width / self.height


def parse_buckets(text: str) -> tuple[Bucket, ...]:
    """'352x640,640x352' -> buckets; H and W must be positive multiples of 16 (VAE /8 times patch 2)."""
    buckets: list[Bucket] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if not m:
            raise DataToolsError(f"--buckets: {part!r} is not of the form HxW (e.g. 352x640)")
        height, width = int(m.group(1)), int(m.group(2))
        if height <= 0 or width <= 0 or height % 16 or width % 16:
            raise DataToolsError(
                f"--buckets: {part} must have height and width that are positive multiples of 16 "
                "(VAE stride 8 x patch 2)"
            )
        bucket = Bucket(height, width)
        if bucket in buckets:
            raise DataToolsError(f"--buckets: {part} is listed twice")
        buckets.append(bucket)
    if not buckets:
        raise DataToolsError("--buckets: give at least one HxW size")
    return tuple(buckets)


def check_frames(num_frames: int) -> int:
    """The causal video VAE needs 4k + 1 frames."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise DataToolsError(
            f"--frames {num_frames}: the frame count must be 4k + 1 (e.g. 17, 33, 49, 193) for the video VAE"
        )
    return num_frames


def check_fps(fps: float) -> float:
    if not (fps > 0 and math.isfinite(fps)):
        raise DataToolsError(f"--fps {fps}: must be a positive number")
    return float(fps)


def choose_bucket(width: int, height: int, buckets: Iterable[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is closest (in log ratio) to the source's; ties go to the first listed."""
    aspect = width / height
    return min(buckets, key=lambda b: abs(math.log(b.aspect / aspect)))


def sanitize_id(text: str) -> str:
    """A WebDataset key: letters, digits, '_' and '-' only (other runs of characters become '_')."""
    cleaned = _ID_BAD_CHARS.sub("_", text).strip("_")
    return cleaned or "clip"


# checkpoint_io imports torch; these two are imported on use so `python -m data_tools --help` stays light.
def sha256_file(path: str | os.PathLike) -> str:
    from mova_train.checkpoint_io import sha256_file as sha256

    return sha256(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    from mova_train.checkpoint_io import write_bytes_atomic as write

    write(path, data)


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    lines = [json.dumps(row, sort_keys=True, ensure_ascii=False) + "\n" for row in rows]
    write_bytes_atomic(path, "".join(lines).encode("utf-8"))


def read_jsonl(path: str | os.PathLike, *, what: str = "table") -> list[dict]:
    """Rows of a JSON Lines file; a clear DataToolsError naming the file and line when it is broken."""
    path = Path(path)
    if not path.is_file():
        raise DataToolsError(f"{what} {path} does not exist")
    rows: list[dict] = []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataToolsError(f"{what} {path} is not UTF-8 ({e})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataToolsError(f"{what} {path}, line {number}: not valid JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataToolsError(f"{what} {path}, line {number}: each line must be a JSON object")
        rows.append(row)
    return rows


def ensure_writable_dir(path: str | os.PathLike, *, what: str = "output folder") -> Path:
    """Create the folder if needed and prove we can write there, before any expensive work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DataToolsError(f"{what} {path} is not writable: {e.strerror or e}") from None
    return path


def progress(iterable: Iterable, *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator:
    """A tqdm bar on a terminal; elsewhere (nohup, SLURM, a pipe) a plain line every MOVA_PROGRESS_EVERY_S seconds
    with done/total, rate and ETA, and a final line (`mova_train.progress`)."""
    return track(iterable, total=total, desc=desc, unit=unit)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
