"""Session fixtures of the data_tools tests: one synthetic input folder (good clips with A/V stream offsets, a
44.1 kHz stereo clip and one file per kind of bad input) and one `prepare` run over it with the tiny checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
FRAMES = 17
BUCKETS = "32x64,64x32,48x48"
# about two samples per shard at these sizes, so runs have several shards and shards hold several samples
SHARD_MB = "0.06"
AUDIO_OFFSETS_MS = (0, 120, -80)
# every bad input: file name -> words its skip reason must contain
BAD_INPUTS = {
    "notes.mp4": "not a readable video",
    "truncated.mp4": "truncated",
    "silent_film.mp4": "no audio track",
    "short.mp4": "shorter than one clip",
    "vfr.mp4": "variable frame rate",
    "uncaptioned.mp4": "no caption",
    "latin1.mp4": "not UTF-8",
}


def run_data_tools(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m data_tools ...` in a fresh process with one compute thread (so byte-for-byte comparisons between
    runs do not depend on what other tests did to torch's thread pool)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "data_tools", *args], cwd=REPO, env=full_env, capture_output=True, text=True
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"data_tools {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _small_video(seed: int, num_frames: int, height: int = 64, width: int = 64) -> np.ndarray:
    from data_tools.synth import render_frames

    return render_frames(np.random.default_rng(seed), num_frames, height, width, [])


def _tone(seconds: float, sample_rate: int = 48000) -> np.ndarray:
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    return (0.2 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def write_bad_inputs(root: Path) -> None:
    from data_tools.synth import write_media

    caption = "A test clip.\n"
    (root / "notes.mp4").write_bytes(b"these are meeting notes, not a video\n" * 20)
    (root / "notes.txt").write_text(caption, encoding="utf-8")
    good = (root / "synth_000.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(good[: len(good) * 2 // 5])
    (root / "truncated.txt").write_text(caption, encoding="utf-8")
    write_media(root / "silent_film.mp4", _small_video(1, 48), 24.0, None)
    (root / "silent_film.txt").write_text(caption, encoding="utf-8")
    write_media(root / "short.mp4", _small_video(2, 10), 24.0, _tone(10 / 24))
    (root / "short.txt").write_text(caption, encoding="utf-8")
    times = np.cumsum([0.0] + [0.03 if i % 2 else 0.055 for i in range(47)])
    write_media(root / "vfr.mp4", _small_video(3, 48), 24.0, _tone(2.2), frame_times_s=times)
    (root / "vfr.txt").write_text(caption, encoding="utf-8")
    write_media(root / "uncaptioned.mp4", _small_video(4, 48), 24.0, _tone(2.0))
    write_media(root / "latin1.mp4", _small_video(5, 48), 24.0, _tone(2.0))
    (root / "latin1.txt").write_bytes("Un café au lait.".encode("latin-1"))


@pytest.fixture(scope="session")
def data_input(tmp_path_factory) -> Path:
    """The raw input folder: 3 synthetic clips (audio stream +0/+120/-80 ms from video), one 44.1 kHz stereo
    clip (audio +60 ms), and the bad inputs of BAD_INPUTS."""
    from data_tools.synth import synthesize

    base = tmp_path_factory.mktemp("data_input")
    root = base / "videos"
    synthesize(root, num_clips=3, seconds=2.0, seed=3, audio_offsets_ms=AUDIO_OFFSETS_MS)
    synthesize(
        base / "hifi",
        num_clips=1,
        seconds=2.0,
        seed=4,
        sample_rate=44100,
        channels=2,
        prefix="hifi",
        audio_offsets_ms=(60,),
    )
    for path in (base / "hifi").iterdir():
        shutil.move(str(path), root / path.name)
    write_bad_inputs(root)
    return root


def prepare_args(data_input: Path, checkpoint: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prepare",
        str(data_input),
        "--checkpoint",
        str(checkpoint),
        "--out",
        str(out),
        "--frames",
        str(FRAMES),
        "--buckets",
        BUCKETS,
        "--shard-size-mb",
        SHARD_MB,
        *extra,
    ]


@dataclass
class Prepared:
    input_dir: Path
    checkpoint: Path
    out: Path
    clips_dir: Path
    stdout: str
    stderr: str

    def plan(self) -> list[dict]:
        return [json.loads(x) for x in (self.out / "plan.jsonl").read_text(encoding="utf-8").splitlines()]

    def sources(self) -> list[dict]:
        return [json.loads(x) for x in (self.out / "sources.jsonl").read_text(encoding="utf-8").splitlines()]

    def report(self) -> list[dict]:
        return [json.loads(x) for x in (self.out / "report.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="session")
def prepared(data_input, tiny_checkpoint, tmp_path_factory) -> Prepared:
    """One uninterrupted `prepare` run (with --export-clips) over data_input."""
    base = tmp_path_factory.mktemp("prepared")
    out, clips = base / "shards", base / "clips"
    proc = run_data_tools(*prepare_args(data_input, tiny_checkpoint, out, "--export-clips", str(clips)))
    return Prepared(data_input, tiny_checkpoint, out, clips, proc.stdout, proc.stderr)


def shard_files(folder: Path) -> dict[str, bytes]:
    """Every shard and the manifest of a shard folder, by name."""
    files = {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.tar"))}
    files["manifest.json"] = (folder / "manifest.json").read_bytes()
    return files
